"""The audit's headline numbers: pure functions over sweep points and re-alignment runs.

For a task with full-model accuracy ``a_full``, a plan keeping ``k_l`` of ``E_l``
experts in layer ``l`` keeps the fraction ``f = sum_l k_l / sum_l E_l`` and retains
``r = a / a_full``. The attacker needs

    f_without = min { f(p) : r(p) >= target }      over the sweep's plans p (real criteria only)
    f_with    = min { f(p) : a re-alignment run of p reached r >= target within the budget }

and pays the labels, optimizer steps and tokens of the cheapest such run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from moeguard.models.moe_model import ParameterCounts
from moeguard.pruning.sweep import SweepPoint, SweepResult

BASELINE_LABELS = ("random", "least_used")


def is_attack_criterion(label: str) -> bool:
    """Real attribution criteria, not the baselines a criterion must beat (random, least used) or the full model."""
    return label != "full" and not label.startswith(BASELINE_LABELS)


@dataclass(frozen=True)
class BestPlan:
    """The attacker's best plan at one keep count: the criterion whose prune retains most."""

    keep: int
    criterion: str
    fraction_kept: float
    retained: float
    kept: list[list[int]]

    def keep_sets(self) -> dict[int, list[int]]:
        return {layer: list(experts) for layer, experts in enumerate(self.kept)}


def best_plans(sweep: SweepResult) -> list[BestPlan]:
    """Per keep count (largest first), the attack criterion with the highest target retention.

    Ties go to the lower answer loss, then to the criterion listed first.
    """
    by_keep: dict[int, list[SweepPoint]] = {}
    for point in sweep.points:
        if is_attack_criterion(point.criterion):
            by_keep.setdefault(point.keep, []).append(point)
    plans = []
    for keep in sorted(by_keep, reverse=True):
        def rank(point: SweepPoint) -> tuple[float, float]:
            retained = sweep.retained(point)
            loss = point.answer_loss if point.answer_loss is not None else math.inf
            return (-(retained if not math.isnan(retained) else -math.inf), loss)

        best = min(by_keep[keep], key=rank)
        plans.append(BestPlan(keep, best.criterion, best.fraction_kept, sweep.retained(best), best.kept))
    return plans


def smallest_retaining(plans: Sequence[BestPlan], target: float) -> BestPlan | None:
    """The plan with the fewest experts whose prune alone retains ``target`` (None if none does)."""
    passing = [p for p in plans if p.retained >= target]
    return min(passing, key=lambda p: p.fraction_kept) if passing else None


def realign_candidates(plans: Sequence[BestPlan], target: float) -> list[BestPlan]:
    """The keep counts below the smallest one that pruning alone survives, largest first:
    where an attacker needs re-alignment, in the order a search tries them."""
    without = smallest_retaining(plans, target)
    limit = without.fraction_kept if without is not None else math.inf
    return sorted((p for p in plans if p.fraction_kept < limit), key=lambda p: -p.fraction_kept)


def pruned_parameter_counts(
    full: ParameterCounts, expert_indexed_per_layer: Sequence[int], num_experts: Sequence[int],
    top_k: Sequence[int], keep_counts: Sequence[int],
) -> ParameterCounts:
    """Parameter counts after keeping ``keep_counts[l]`` experts of layer ``l``, without pruning.

    Every expert-indexed tensor of layer ``l`` (router rows, biases, fused expert
    weights) holds ``T_l = expert_indexed_per_layer[l]`` parameters, ``T_l / E_l`` per
    expert, and loses ``(E_l - k_l) T_l / E_l`` of them:

        total'  = total - sum_l (E_l - k_l) T_l / E_l
        active' = total' - sum_l (k_l - top_k_l) P_l      (P_l: one expert's own weights)
    """
    removed = sum((e - k) * t // e for t, e, k in zip(expert_indexed_per_layer, num_experts, keep_counts))
    total = full.total - removed
    inactive = sum((k - top) * per for per, k, top in zip(full.per_expert, keep_counts, top_k))
    routed = full.routed_experts - sum((e - k) * per for per, e, k in zip(full.per_expert, num_experts, keep_counts))
    return ParameterCounts(total, total - inactive, routed, list(full.per_expert))
