"""Choosing the attacker's configuration on tuning seeds only.

A configuration is one value per axis of a grid (``{"lr": (3e-3, 1e-3), "loss":
("logits", "answers")}``). Its score on the tuning seeds orders configurations by

    (runs that did not reach the target, mean cost, -mean final accuracy)

so one that always reaches the target beats one that sometimes does, a cheaper one
beats a dearer one, and among those that never reach it the one that got closest
wins. ``coordinate`` tuning starts at the first value of every axis and, axis by
axis, keeps the best value with the others fixed (one pass: ``1 + sum(len(axis) - 1)``
configurations); ``grid`` tries every combination. Only the tuning seeds are ever
measured here; the chosen configuration is then reported on fresh seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moeguard.errors import InputError

STRATEGIES = ("coordinate", "grid")

Configuration = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What one run of a configuration gave: whether it reached the target, its cost (what it spent when it did
    not) and its final accuracy."""

    reached: bool
    cost: float
    final_accuracy: float


def configuration_label(configuration: Mapping[str, Any]) -> str:
    """``"lr=0.003/loss=logits"``: the axes in their order."""
    return "/".join(f"{axis}={value:g}" if isinstance(value, float) else f"{axis}={value}"
                    for axis, value in configuration.items())


def rank(outcomes: Sequence[Outcome]) -> tuple[int, float, float]:
    """The sort key of a configuration's outcomes (lower is better; see the module docstring)."""
    if not outcomes:
        raise ValueError("a configuration is ranked on at least one outcome")
    unreached = sum(not o.reached for o in outcomes)
    mean_cost = sum(o.cost for o in outcomes) / len(outcomes)
    mean_accuracy = sum(o.final_accuracy for o in outcomes) / len(outcomes)
    return (unreached, mean_cost, -mean_accuracy)


@dataclass
class Tuning:
    """The configurations tried on the tuning seeds (label -> configuration and outcomes) and the one chosen."""

    chosen: Configuration
    tried: dict[str, tuple[Configuration, list[Outcome]]] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": configuration_label(self.chosen),
            "seeds": list(self.seeds),
            "tried": {label: {"rank": list(rank(outcomes)), "reached": [o.reached for o in outcomes],
                              "cost": [o.cost for o in outcomes], "final_accuracy": [o.final_accuracy for o in outcomes]}
                      for label, (_, outcomes) in self.tried.items()},
        }


def choose_configuration(tried: Mapping[str, tuple[Configuration, Sequence[Outcome]]]) -> Configuration:
    """The best configuration by :func:`rank`; ties go to the one tried first."""
    if not tried:
        raise ValueError("no configuration was tried")
    order = list(tried)
    best = min(order, key=lambda label: (rank(tried[label][1]), order.index(label)))
    return dict(tried[best][0])


def check_grid(grid: Mapping[str, Sequence[Any]]) -> None:
    empty = [axis for axis, values in grid.items() if not values]
    if empty:
        raise InputError(f"the attacker grid needs at least one value of {', '.join(empty)}.", arguments=tuple(empty))


def tune(
    grid: Mapping[str, Sequence[Any]],
    measure: Callable[[Configuration, int], Outcome],
    tuning_seeds: Sequence[int],
    *,
    strategy: str = "coordinate",
) -> Tuning:
    """Tune over ``grid`` with ``measure(configuration, seed)`` called on ``tuning_seeds`` only.

    A grid with one value per axis is not tuned: its configuration is chosen without a run.
    """
    check_grid(grid)
    if strategy not in STRATEGIES:
        raise InputError(f"unknown tuning strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.",
                         arguments=("tuning",))
    axes = list(grid)
    start = {axis: grid[axis][0] for axis in axes}
    if all(len(grid[axis]) == 1 for axis in axes):
        return Tuning(start, {}, tuple(tuning_seeds))
    if not tuning_seeds:
        raise InputError("tuning the attacker needs at least one tuning seed.", arguments=("tuning_seeds",))
    tried: dict[str, tuple[Configuration, list[Outcome]]] = {}

    def score(configuration: Configuration) -> tuple[int, float, float]:
        label = configuration_label(configuration)
        if label not in tried:
            tried[label] = (dict(configuration), [measure(dict(configuration), seed) for seed in tuning_seeds])
        return rank(tried[label][1])

    if strategy == "grid":
        for values in itertools.product(*(grid[axis] for axis in axes)):
            score(dict(zip(axes, values)))
    else:
        current = start
        for axis in axes:
            candidates = [{**current, axis: value} for value in grid[axis]]
            current = min(candidates, key=lambda c: (score(c), candidates.index(c)))
    return Tuning(choose_configuration(tried), tried, tuple(tuning_seeds))
