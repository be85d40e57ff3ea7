"""Re-alignment: active-learning-driven fine-tuning of a pruned model, and its recovery curves.

:func:`realign` runs the loop (seed set, then per round: acquire, fine-tune,
measure) on a pruned model directory or, in mask mode, on the unpruned model with
a keep set. ``acquisition`` holds the pure scoring functions, ``scopes`` what is
trained, ``metrics`` retention, recovery and labels-to-threshold.
"""

from moeguard.realign.acquisition import ACQUISITIONS, Acquisition
from moeguard.realign.inputs import RealignData, builtin_data, file_data, held_out
from moeguard.realign.loop import realign
from moeguard.realign.metrics import Threshold, labels_to_reach, recovery, retention
from moeguard.realign.result import RealignConfig, RealignResult, RoundRecord, label_schedule
from moeguard.realign.scopes import TRAIN_SCOPES, Scope

__all__ = [
    "ACQUISITIONS",
    "Acquisition",
    "TRAIN_SCOPES",
    "RealignConfig",
    "RealignData",
    "RealignResult",
    "RoundRecord",
    "Scope",
    "Threshold",
    "builtin_data",
    "file_data",
    "held_out",
    "label_schedule",
    "labels_to_reach",
    "realign",
    "recovery",
    "retention",
]
