"""Attack cost over an attacker grid: pure functions over finished attack runs.

One attack run (a criterion, a trainable scope, a learning rate, a seed) reaches
the target retention after ``c`` labels (or steps), or not within its budget ``B``;
an unreached run counts as ``B`` and is flagged, so every figure derived from it is
a lower bound. For a configuration ``g`` (criterion, scope, learning rate) with
seeds ``s``:

    cost(g) = mean_s c(g, s)
    worst case (the attacker's best configuration) = min_g cost(g)
    mean over the grid = mean_g cost(g)

and the cost multiplier of a defense is ``cost(defended) / cost(undefended)``,
for the worst case and for the mean alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttackRun:
    """What one attack run cost: labels and optimizer steps to the target (None: not reached)."""

    criterion: str
    scope: str
    lr: float
    seed: int
    labels: int | None
    steps: int | None
    budget_labels: int
    budget_steps: int
    final_retention: float

    @property
    def reached(self) -> bool:
        return self.labels is not None

    @property
    def configuration(self) -> tuple[str, str, float]:
        return (self.criterion, self.scope, self.lr)

    def cost(self, unit: str) -> float:
        """Labels or steps to the target; the budget when it was not reached."""
        value = self.labels if unit == "labels" else self.steps
        return float(value) if value is not None else float(self.budget_labels if unit == "labels" else self.budget_steps)


@dataclass
class GridCost:
    """The grid summarised in one unit (``labels`` or ``steps``).

    ``best`` is the attacker's best configuration and ``best_cost`` its mean cost
    over seeds; ``mean_cost`` averages every configuration. ``censored`` says that
    the best configuration did not always reach the target (its cost is a lower
    bound); ``reached`` counts runs that did.
    """

    unit: str
    best: tuple[str, str, float] | None
    best_cost: float
    mean_cost: float
    censored: bool
    reached: int
    runs: int
    per_configuration: dict[str, float] = field(default_factory=dict)


def configuration_label(configuration: tuple[str, str, float]) -> str:
    criterion, scope, lr = configuration
    return f"{criterion}/{scope}/lr={lr:g}"


def grid_cost(runs: Sequence[AttackRun], unit: str = "labels") -> GridCost:
    """Worst-case and mean attack cost over ``runs`` (see the module docstring)."""
    if unit not in ("labels", "steps"):
        raise ValueError(f"unit must be labels or steps, got {unit!r}")
    if not runs:
        return GridCost(unit, None, math.nan, math.nan, False, 0, 0)
    grouped: dict[tuple[str, str, float], list[AttackRun]] = {}
    for run in runs:
        grouped.setdefault(run.configuration, []).append(run)
    costs = {config: sum(r.cost(unit) for r in group) / len(group) for config, group in grouped.items()}
    best = min(costs, key=lambda config: (costs[config], configuration_label(config)))
    return GridCost(
        unit=unit,
        best=best,
        best_cost=costs[best],
        mean_cost=sum(costs.values()) / len(costs),
        censored=not all(r.reached for r in grouped[best]),
        reached=sum(r.reached for r in runs),
        runs=len(runs),
        per_configuration={configuration_label(config): cost for config, cost in costs.items()},
    )


def cost_multiplier(defended: float, undefended: float) -> float:
    """``defended / undefended`` (inf when the undefended attack was free and the defended one is not)."""
    if undefended > 0:
        return defended / undefended
    return math.inf if defended > 0 else 1.0
