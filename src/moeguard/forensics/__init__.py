"""Forensics: is a suspect model a pruned (and re-aligned) derivative of a parent?"""

from moeguard.forensics.detect import DEFAULT_ALPHA, DEFAULT_GROUP_SIZE, DEFAULT_PROBES, DEFAULT_WEIGHT_ROWS, detect
from moeguard.forensics.verdict import ExpertMatch, LayerVerdict, Verdict

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_PROBES",
    "DEFAULT_WEIGHT_ROWS",
    "ExpertMatch",
    "LayerVerdict",
    "Verdict",
    "detect",
]
