"""Pruning: prune plans from scores, physical and streaming prunes, the knowledge-loss sweep."""

from moeguard.pruning.plans import METHODS, LayerLimits, PrunePlan, make_plan

__all__ = ["METHODS", "LayerLimits", "PrunePlan", "make_plan"]
