"""The carver's head start: pure functions over training curves.

A training run is evaluated every few steps; its curve is the points
``(s_i, c_i, a_i)``: optimizer steps done, cumulative compute after them, and test
accuracy there (``s_0 = 0``: before any training). The run reaches the absolute
target accuracy ``t`` at the first point with ``a_i >= t``; between that point and
the one before it the crossing step is interpolated linearly,

    s* = s_{i-1} + (t - a_{i-1}) / (a_i - a_{i-1}) * (s_i - s_{i-1}),

and its compute ``c*`` likewise (compute is linear in the steps between two points).
A run that never reaches ``t`` is *censored*: its cost is at least what it spent.

Compute comes in two units. ``tokens``: training tokens, i.e. optimizer steps x
tokens per step. ``flops``: from parameter counts, ``6 N T`` for training ``T``
tokens through a model with ``N`` active parameters and ``2 N T`` for forward-only
work (teacher labels and logits, attribution, the subset search), plus a fixed
``overhead`` paid before training (the carve itself).

The head start of a carve is ``H = C_scratch / C_carve``: the compute a freshly
initialised model of the carved architecture needs to reach the target on the same
data, over the compute of carving and re-aligning. Over seeds it is the ratio of the
mean costs, ``H = mean_s C_scratch(s) / mean_s C_carve(s)``, with a percentile
bootstrap interval that resamples each arm's seeds independently. Censored runs enter
at what they spent, so H is then a bound: a lower one when only scratch runs were
censored, an upper one when only carve runs were, and unknown when both were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

UNITS = ("tokens", "flops")


def training_flops(active_parameters: int, tokens: float) -> float:
    """``6 N T``: forward and backward of ``T`` tokens through ``N`` active parameters."""
    return 6.0 * active_parameters * tokens


def forward_flops(active_parameters: int, tokens: float) -> float:
    """``2 N T``: a forward pass of ``T`` tokens through ``N`` active parameters."""
    return 2.0 * active_parameters * tokens


def crossing_step(steps: Sequence[float], accuracies: Sequence[float], target: float) -> float | None:
    """The interpolated step at which the curve first reaches ``target`` (None: never; see the module docstring).

    A curve that starts at or above the target crosses at its first step.
    """
    if len(steps) != len(accuracies) or not steps:
        raise ValueError("a curve needs one accuracy per step and at least one point")
    for i, accuracy in enumerate(accuracies):
        if accuracy >= target:
            if i == 0:
                return float(steps[0])
            before, after = accuracies[i - 1], accuracy
            share = (target - before) / (after - before)
            return float(steps[i - 1] + share * (steps[i] - steps[i - 1]))
    return None


def value_at(step: float, steps: Sequence[float], values: Sequence[float]) -> float:
    """``values`` (cumulative compute at ``steps``) linearly interpolated at ``step``, within the curve."""
    if not steps[0] <= step <= steps[-1]:
        raise ValueError(f"step {step} lies outside the curve ({steps[0]}..{steps[-1]})")
    for i in range(1, len(steps)):
        if step <= steps[i]:
            span = steps[i] - steps[i - 1]
            share = (step - steps[i - 1]) / span if span else 1.0
            return float(values[i - 1] + share * (values[i] - values[i - 1]))
    return float(values[0])


@dataclass(frozen=True)
class RunCost:
    """What one run spent to reach the target, or (``reached`` False) everything it spent without reaching it.

    ``steps`` may be fractional (interpolated); ``tokens`` are training tokens and
    ``flops`` all compute, overhead included.
    """

    reached: bool
    steps: float
    tokens: float
    flops: float

    def value(self, unit: str) -> float:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        return self.tokens if unit == "tokens" else self.flops

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_cost(
    steps: Sequence[int], tokens: Sequence[float], flops: Sequence[float], accuracies: Sequence[float], target: float,
    *, overhead: float = 0.0,
) -> RunCost:
    """The cost of a curve to ``target``: interpolated at the crossing, or the whole run when censored.

    ``tokens`` and ``flops`` are cumulative at each point (training only);
    ``overhead`` FLOPs are paid before the first step.
    """
    at = crossing_step(steps, accuracies, target)
    if at is None:
        return RunCost(False, float(steps[-1]), float(tokens[-1]), overhead + float(flops[-1]))
    return RunCost(True, at, value_at(at, steps, tokens), overhead + value_at(at, steps, flops))


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def ratio_of_means(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """``mean(numerators) / mean(denominators)`` (inf when the denominators are all zero and the numerators not)."""
    top, bottom = _mean(numerators), _mean(denominators)
    if bottom > 0:
        return top / bottom
    return math.inf if top > 0 else math.nan


def bootstrap_ratio_interval(
    numerators: Sequence[float], denominators: Sequence[float], *, resamples: int = 4000, level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of :func:`ratio_of_means`, each side's values resampled independently.

    With one value per side the interval is that single ratio.
    """
    if not numerators or not denominators:
        raise ValueError("both arms need at least one run")
    generator = torch.Generator().manual_seed(seed)
    top = torch.tensor(numerators, dtype=torch.float64)
    bottom = torch.tensor(denominators, dtype=torch.float64)
    top_means = top[torch.randint(len(top), (resamples, len(top)), generator=generator)].mean(1)
    bottom_means = bottom[torch.randint(len(bottom), (resamples, len(bottom)), generator=generator)].mean(1)
    ratios = torch.where(bottom_means > 0, top_means / bottom_means.clamp_min(1e-300), torch.full_like(top_means, math.inf))
    tail = (1 - level) / 2
    low, high = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(low, high)


BOUNDS = ("exact", "lower", "upper", "unknown")
# How a ratio's kind is shown before its value.
BOUND_MARKS = {"exact": "", "lower": ">= ", "upper": "<= ", "unknown": "? "}


def censoring_bound(numerator_censored: bool, denominator_censored: bool) -> str:
    """What a ratio of means is when some runs were censored (counted at what they spent): ``exact``; ``lower`` when
    only numerator runs were (the ratio is at least this); ``upper`` when only denominator runs were; ``unknown``."""
    return {(False, False): "exact", (True, False): "lower", (False, True): "upper", (True, True): "unknown"}[
        (numerator_censored, denominator_censored)]


def describe_ratio(value: float, interval: Interval, bound: str, suffix: str = "") -> str:
    """``">= 4.10x [3.20, 5.00]"``: the ratio with its kind and interval."""
    return f"{BOUND_MARKS[bound]}{value:.2f}{suffix} [{interval.low:.2f}, {interval.high:.2f}]"


@dataclass(frozen=True)
class HeadStart:
    """``H = mean C_scratch / mean C_carve`` in ``unit``, its bootstrap interval, and what kind of number it is.

    ``bound`` is ``exact`` (every run reached the target), ``lower`` (some scratch
    runs were censored: H is at least this), ``upper`` (some carve runs were
    censored: H is at most this) or ``unknown`` (both were).
    """

    unit: str
    value: float
    interval: Interval
    bound: str
    scratch_mean: float
    carve_mean: float
    scratch_reached: int
    carve_reached: int
    scratch_runs: int
    carve_runs: int

    def describe(self) -> str:
        return describe_ratio(self.value, self.interval, self.bound)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["interval"] = [self.interval.low, self.interval.high]
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in data.items()}


def head_start(
    scratch: Sequence[RunCost], carve: Sequence[RunCost], unit: str = "flops", *, resamples: int = 4000,
    level: float = 0.95, seed: int = 0,
) -> HeadStart:
    """The head start of the carve over training from scratch, from one :class:`RunCost` per seed and arm."""
    if not scratch or not carve:
        raise ValueError("the head start needs at least one scratch run and one carve run")
    top, bottom = [r.value(unit) for r in scratch], [r.value(unit) for r in carve]
    bound = censoring_bound(not all(r.reached for r in scratch), not all(r.reached for r in carve))
    return HeadStart(
        unit=unit,
        value=ratio_of_means(top, bottom),
        interval=bootstrap_ratio_interval(top, bottom, resamples=resamples, level=level, seed=seed),
        bound=bound,
        scratch_mean=_mean(top),
        carve_mean=_mean(bottom),
        scratch_reached=sum(r.reached for r in scratch),
        carve_reached=sum(r.reached for r in carve),
        scratch_runs=len(scratch),
        carve_runs=len(carve),
    )
