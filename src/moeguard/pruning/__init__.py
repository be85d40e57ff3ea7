"""Pruning: prune plans from scores, physical and streaming prunes, the knowledge-loss sweep."""

from moeguard.pruning.plans import METHODS, LayerLimits, PrunePlan, make_plan
from moeguard.pruning.prune import PruneSummary, prune_model
from moeguard.pruning.streaming import StreamingPruneResult, streaming_prune
from moeguard.pruning.sweep import SweepPoint, SweepResult, load_sweep, run_sweep

__all__ = [
    "METHODS",
    "LayerLimits",
    "PrunePlan",
    "PruneSummary",
    "StreamingPruneResult",
    "SweepPoint",
    "SweepResult",
    "make_plan",
    "prune_model",
    "load_sweep",
    "run_sweep",
    "streaming_prune",
]
