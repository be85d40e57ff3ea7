"""Recovery metrics: how much of the unpruned model's score re-alignment gives back.

Retention is :func:`moeguard.data.task_types.retention` (the share of the unpruned model's
gain over the task's no-knowledge reference), the same for every task type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from moeguard.data.task_types import retention

__all__ = ["Threshold", "labels_to_reach", "recovery", "retention"]


def recovery(after: float, pruned: float, unpruned: float, *, higher_is_better: bool = True) -> float:
    """``(after - pruned) / (unpruned - pruned)``: the share of the pruning loss won back.

    1 means back to the unpruned score, 0 no better than right after pruning,
    negative worse; nan when pruning lost nothing (the pruned model scores as well as
    the unpruned one: ``unpruned <= pruned``, or ``>=`` for a lower-is-better loss).
    """
    gap = unpruned - pruned
    return (after - pruned) / gap if (gap > 0 if higher_is_better else gap < 0) else math.nan


@dataclass(frozen=True)
class Threshold:
    """The first point of a curve that reaches a retention target.

    ``reached`` is False when no point does; then ``labels``/``steps`` are None and
    :meth:`describe` says "not reached within budget".
    """

    target: float
    reached: bool
    labels: int | None = None
    steps: int | None = None

    def describe(self) -> str:
        if not self.reached:
            return f"{self.target:.0%} retention not reached within budget"
        return f"{self.target:.0%} retention at {self.labels} labels ({self.steps} optimizer steps)"


def labels_to_reach(
    labels: Sequence[int], steps: Sequence[int], retentions: Sequence[float], target: float = 0.9
) -> Threshold:
    """The first point (in curve order) whose retention is at least ``target``.

    ``labels[i]``, ``steps[i]`` and ``retentions[i]`` describe point i of a recovery
    curve (labels used and optimizer steps so far, retention measured there).
    """
    if not len(labels) == len(steps) == len(retentions):
        raise ValueError("labels, steps and retentions must have one entry per point")
    for used, taken, kept in zip(labels, steps, retentions):
        if kept >= target:
            return Threshold(target, True, int(used), int(taken))
    return Threshold(target, False)
