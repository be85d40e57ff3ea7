"""Forensics: is a suspect model carved out of a parent, however it was disguised?"""

from moeguard.forensics.calibration import BUILTIN_NULL, NullCalibration
from moeguard.forensics.detect import DEFAULT_ALPHA, DEFAULT_PROBES, Detector, calibrate, detect, rank_parents
from moeguard.forensics.verdict import ExpertMatch, LayerVerdict, ParentRanking, Verdict

__all__ = [
    "BUILTIN_NULL",
    "DEFAULT_ALPHA",
    "DEFAULT_PROBES",
    "Detector",
    "ExpertMatch",
    "LayerVerdict",
    "NullCalibration",
    "ParentRanking",
    "Verdict",
    "calibrate",
    "detect",
    "rank_parents",
]
