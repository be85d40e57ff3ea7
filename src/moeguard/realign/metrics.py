"""Recovery metrics: how much of the unpruned model's accuracy re-alignment gives back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def retention(after: float, unpruned: float) -> float:
    """``after / unpruned``: the share of the unpruned model's accuracy kept (nan if unpruned is 0)."""
    return after / unpruned if unpruned > 0 else math.nan


def recovery(after: float, pruned: float, unpruned: float) -> float:
    """``(after - pruned) / (unpruned - pruned)``: the share of the pruning loss won back.

    1 means back to the unpruned accuracy, 0 no better than right after pruning,
    negative worse; nan when pruning lost nothing (``unpruned <= pruned``).
    """
    gap = unpruned - pruned
    return (after - pruned) / gap if gap > 0 else math.nan


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
