"""Prune plans: which experts of each MoE layer survive, chosen from scores.

Everything here is a pure function of a ``[moe_layers, experts]`` score tensor
(higher = more needed by the task, see :func:`moeguard.attribution.scores`) and of
each layer's routing limits. Three ways to size a plan:

- **uniform** (``keep=m``): the top ``m`` experts of every layer;
- **coverage** (``coverage=p``): per layer, the smallest set whose normalised score
  mass reaches ``p`` (different counts per layer, so usually mask mode only);
- **global** (``budget=B``): ``B`` experts over all layers, given to the layers
  where they carry the most normalised mass.

A layer with a group-limited router (DeepSeek-V3 style) keeps the same number of
experts in every group, its best ones, so that routing stays valid. Protected
experts are always kept. ``least_used=True`` ranks from the other end ("keep the
least used", the baseline a good criterion must beat). Every plan passes the
guards of :func:`moeguard.models.keep_sets.normalize_keep_sets`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moeguard.errors import InputError, PlanError
from moeguard.models.keep_sets import normalize_keep_sets
from moeguard.models.layers import GroupRouting

METHODS = ("uniform", "coverage", "global")


@dataclass(frozen=True)
class LayerLimits:
    """What a plan must respect in one MoE layer (the routing side of :class:`MoELayer`)."""

    index: int
    num_experts: int
    top_k: int
    group_routing: GroupRouting | None = None

    @classmethod
    def of(cls, layer: Any) -> "LayerLimits":
        """The limits of an :class:`~moeguard.models.MoELayer` (or anything with the same fields)."""
        return cls(layer.index, layer.num_experts, layer.top_k, layer.group_routing)


@dataclass(frozen=True)
class PrunePlan:
    """The experts to keep in each MoE layer, and how they were chosen.

    ``kept[l]`` are layer ``l``'s surviving expert indices (sorted, numbered as in
    the model the scores were computed on). Exactly one of ``keep`` / ``coverage``
    / ``budget`` is set, matching ``method``.
    """

    kept: list[list[int]]
    num_experts: list[int]
    method: str
    criterion: str
    least_used: bool = False
    keep: int | None = None
    coverage: float | None = None
    budget: int | None = None
    protect: list[tuple[int, int]] = field(default_factory=list)
    attribution_fingerprint: str | None = None
    task: str | None = None

    @property
    def keep_counts(self) -> list[int]:
        return [len(k) for k in self.kept]

    @property
    def is_uniform(self) -> bool:
        """True when every layer keeps the same number of experts (a physical prune is possible)."""
        return len(set(self.keep_counts)) == 1

    @property
    def fraction_kept(self) -> float:
        return sum(self.keep_counts) / sum(self.num_experts)

    @property
    def label(self) -> str:
        """A short name for tables: ``frequency``, ``least_used:frequency``, ``random``."""
        return f"least_used:{self.criterion}" if self.least_used else self.criterion

    def keep_sets(self) -> dict[int, list[int]]:
        """``{layer: kept}`` for :meth:`MoEModel.mask_experts` / :meth:`MoEModel.prune` (layers keeping all omitted)."""
        return {layer: list(k) for layer, (k, e) in enumerate(zip(self.kept, self.num_experts)) if len(k) < e}

    def selection(self) -> dict[str, Any]:
        """How the experts were chosen, as stored in ``moeguard_manifest.json``."""
        size = {"uniform": ("keep", self.keep), "coverage": ("coverage", self.coverage), "global": ("budget", self.budget)}
        name, value = size[self.method]
        return {
            "method": self.method,
            "criterion": self.criterion,
            "ranking": "least_used" if self.least_used else "most_used",
            name: value,
            "keep_counts": self.keep_counts,
            "protect": [list(p) for p in self.protect],
            "attribution_fingerprint": self.attribution_fingerprint,
            "task": self.task,
        }


# ---------------------------------------------------------------------------- pure selection


def normalised_mass(scores: torch.Tensor) -> torch.Tensor:
    """Per-layer score shares ``w_i = max(s_i, 0) / sum_j max(s_j, 0)`` of a ``[E]`` score row.

    Negative scores (an expert whose removal helps the task) carry no mass. A row
    with no positive score gives every expert the same share ``1/E``.
    """
    positive = scores.to(torch.float64).nan_to_num(nan=0.0, neginf=0.0).clamp_min(0.0)
    total = positive.sum()
    if total <= 0:
        return torch.full_like(positive, 1.0 / positive.numel())
    return positive / total


def priority_order(scores: torch.Tensor, protected: Iterable[int] = (), *, least_used: bool = False) -> list[int]:
    """Expert indices in the order a plan takes them.

    Protected experts first, then by score, highest first (lowest first with
    ``least_used``); ties go to the lower index.
    """
    ranked = torch.sort(scores.to(torch.float64), descending=not least_used, stable=True).indices.tolist()
    protected = set(protected)
    return [e for e in ranked if e in protected] + [e for e in ranked if e not in protected]


def take(order: Sequence[int], count: int, group_routing: GroupRouting | None = None) -> list[int]:
    """The first ``count`` experts of ``order``, sorted; spread evenly over groups for a group-limited router.

    With ``G`` contiguous groups each group takes its first ``count // G`` experts in
    ``order``; the ``count % G`` left over go, one per group, to the groups whose next
    expert comes first (an uneven set, which the guards then refuse). Sets grow by
    nesting: ``take(order, c)`` is contained in ``take(order, c + G)``.
    """
    if group_routing is None:
        return sorted(order[:count])
    groups = group_routing.num_groups
    group_size = len(order) // groups
    quota = count // groups
    taken: list[int] = []
    per_group = [0] * groups
    for expert in order:
        if per_group[expert // group_size] < quota:
            taken.append(expert)
            per_group[expert // group_size] += 1
    extra_groups: set[int] = set()
    for expert in order:
        if len(extra_groups) == count % groups:
            break
        group = expert // group_size
        if expert not in taken and group not in extra_groups:
            taken.append(expert)
            extra_groups.add(group)
    return sorted(taken)


def _feasible(limits: LayerLimits, kept: list[int], protected: Sequence[int]) -> bool:
    """Whether ``kept`` passes the model's guards and holds every protected expert."""
    if not set(protected) <= set(kept):
        return False
    try:
        normalize_keep_sets([limits], {0: kept}, physical=False)  # type: ignore[list-item]
    except PlanError:
        return False
    return True


def _candidates(scores: torch.Tensor, limits: LayerLimits, protected: Sequence[int], least_used: bool) -> list[list[int]]:
    """Every feasible kept set of the layer, smallest first, each containing the previous."""
    order = priority_order(_row(scores, limits), protected, least_used=least_used)
    step = limits.group_routing.num_groups if limits.group_routing else 1
    sets = [take(order, count, limits.group_routing) for count in range(step, limits.num_experts + 1, step)]
    feasible = [kept for kept in sets if _feasible(limits, kept, protected)]
    if not feasible:
        raise PlanError(
            f"layer {limits.index}: no set of its {limits.num_experts} experts can be routed while keeping the protected "
            f"experts {sorted(protected)}; protect fewer experts in this layer."
        )
    return feasible


def _row(scores: torch.Tensor, limits: LayerLimits) -> torch.Tensor:
    return scores[limits.index, : limits.num_experts]


def _refuse_missing_protect(limits: LayerLimits, kept: list[int], protected: Sequence[int], size: str) -> None:
    missing = sorted(set(protected) - set(kept))
    if not missing:
        return
    reason = (
        f"{len(protected)} protected experts do not fit"
        if limits.group_routing is None
        else f"the protected experts {sorted(protected)} do not fit in an even share of its "
        f"{limits.group_routing.num_groups} groups"
    )
    raise PlanError(
        f"layer {limits.index}: {size} keeps {len(kept)} experts, but {reason}; experts {missing} would be dropped. "
        "Keep more experts or protect fewer in this layer."
    )


def uniform_keep(
    scores: torch.Tensor,
    limits: Sequence[LayerLimits],
    keep: int,
    protect: dict[int, list[int]] | None = None,
    *,
    least_used: bool = False,
) -> list[list[int]]:
    """The top ``keep`` experts of every layer (by score; protected first).

    ``kept_l = take(order_l, m)`` with ``order_l`` from :func:`priority_order`.
    """
    protect = protect or {}
    result = []
    for layer in limits:
        if not 0 < keep <= layer.num_experts:
            raise PlanError(f"keep={keep} experts per layer, but layer {layer.index} has {layer.num_experts}; "
                            f"choose 1..{layer.num_experts}.")
        protected = protect.get(layer.index, [])
        kept = take(priority_order(_row(scores, layer), protected, least_used=least_used), keep, layer.group_routing)
        _refuse_missing_protect(layer, kept, protected, f"keep={keep}")
        result.append(kept)
    return result


def coverage_keep(
    scores: torch.Tensor,
    limits: Sequence[LayerLimits],
    coverage: float,
    protect: dict[int, list[int]] | None = None,
    *,
    least_used: bool = False,
) -> list[list[int]]:
    """Per layer, the smallest feasible kept set whose normalised score mass reaches ``coverage``.

    ``kept_l = argmin |S|`` over the nested candidate sets ``S`` of the layer with
    ``sum_{i in S} w_i >= p`` (``w`` from :func:`normalised_mass`); candidates are
    prefixes of the priority order, at least top-k long, group-balanced when the
    router is group-limited, and contain the protected experts.
    """
    if not 0 < coverage <= 1:
        raise PlanError(f"coverage must be a fraction in (0, 1], got {coverage}.")
    protect = protect or {}
    result = []
    for layer in limits:
        weights = normalised_mass(_row(scores, layer))
        candidates = _candidates(scores, layer, protect.get(layer.index, []), least_used)
        # Rounding: a mass of exactly p summed in another order may land a hair below p.
        chosen = next((s for s in candidates if float(weights[s].sum()) >= coverage - 1e-12), candidates[-1])
        result.append(chosen)
    return result


def global_keep(
    scores: torch.Tensor,
    limits: Sequence[LayerLimits],
    budget: int,
    protect: dict[int, list[int]] | None = None,
    *,
    least_used: bool = False,
) -> list[list[int]]:
    """``budget`` experts over all layers, placed where they carry the most normalised mass.

    Every layer starts at its smallest feasible set. Then, greedily, the layer whose
    next feasible set adds the most mass per added expert,
    ``(W_l(S') - W_l(S)) / (|S'| - |S|)`` with ``W_l(S) = sum_{i in S} w_{l,i}``, grows
    to it, as long as it fits in the budget (the least mass with ``least_used``).
    Normalising per layer makes layers comparable whatever the criterion's scale.
    The total is exactly ``budget`` unless group-balanced steps cannot fill it.
    """
    protect = protect or {}
    candidates = [_candidates(scores, layer, protect.get(layer.index, []), least_used) for layer in limits]
    weights = [normalised_mass(_row(scores, layer)) for layer in limits]
    position = [0] * len(limits)
    used = sum(len(c[0]) for c in candidates)
    total = sum(layer.num_experts for layer in limits)
    if not used <= budget <= total:
        raise PlanError(
            f"budget={budget} experts, but this model needs at least {used} (top-k per layer, group balance and "
            f"protected experts) and has {total}; choose a budget in {used}..{total}."
        )
    sign = -1.0 if least_used else 1.0
    open_layers = set(range(len(limits)))
    while open_layers:
        best, best_gain = None, None
        for l in sorted(open_layers):
            if position[l] + 1 >= len(candidates[l]):
                open_layers.discard(l)
                continue
            now, nxt = candidates[l][position[l]], candidates[l][position[l] + 1]
            gain = sign * float(weights[l][nxt].sum() - weights[l][now].sum()) / (len(nxt) - len(now))
            if best_gain is None or gain > best_gain:
                best, best_gain = l, gain
        if best is None:
            break
        grow = len(candidates[best][position[best] + 1]) - len(candidates[best][position[best]])
        if used + grow > budget:
            open_layers.discard(best)
            continue
        position[best] += 1
        used += grow
    return [c[p] for c, p in zip(candidates, position)]


# ---------------------------------------------------------------------------- plans


def check_protect(protect: Iterable[tuple[int, int]], limits: Sequence[LayerLimits]) -> dict[int, list[int]]:
    """``[(layer, expert), ...]`` -> ``{layer: [experts]}``, refusing entries outside the model."""
    result: dict[int, list[int]] = {}
    for entry in protect:
        try:
            layer, expert = (int(v) for v in entry)
        except (TypeError, ValueError):
            raise PlanError(f"a protected expert is a (MoE layer, expert) pair, got {entry!r}.") from None
        if not 0 <= layer < len(limits):
            raise PlanError(f"protected expert {layer}:{expert} names MoE layer {layer}, but the model has "
                            f"{len(limits)} (0..{len(limits) - 1}).")
        if not 0 <= expert < limits[layer].num_experts:
            raise PlanError(f"protected expert {layer}:{expert}: layer {layer} has {limits[layer].num_experts} experts "
                            f"(0..{limits[layer].num_experts - 1}).")
        result.setdefault(layer, [])
        if expert not in result[layer]:
            result[layer].append(expert)
    return result


def make_plan(
    scores: torch.Tensor,
    layers: Sequence[Any],
    *,
    keep: int | None = None,
    coverage: float | None = None,
    budget: int | None = None,
    protect: Iterable[tuple[int, int]] = (),
    least_used: bool = False,
    criterion: str = "frequency",
    attribution_fingerprint: str | None = None,
    task: str | None = None,
) -> PrunePlan:
    """Choose the experts to keep from ``scores [moe_layers, experts]``.

    ``layers`` are the model's :class:`MoELayer` s (or :class:`LayerLimits`). Give
    exactly one of ``keep`` (uniform), ``coverage`` (per-layer mass) or ``budget``
    (global count). The result passes :func:`normalize_keep_sets`; a plan that
    cannot is refused with a :class:`PlanError` naming the layer and the fix.
    """
    limits = [LayerLimits.of(layer) for layer in layers]
    sizes = {"uniform": keep, "coverage": coverage, "global": budget}
    chosen = [method for method, value in sizes.items() if value is not None]
    if len(chosen) != 1:
        raise InputError("give exactly one of keep (experts per layer), coverage (score mass per layer) or budget "
                         f"(experts over all layers); got {', '.join(chosen) or 'none'}.")
    if not torch.is_tensor(scores) or scores.ndim != 2:
        raise InputError(f"scores must be a [moe_layers, experts] tensor, got {getattr(scores, 'shape', type(scores))}.")
    if scores.shape[0] != len(limits) or scores.shape[1] < max(layer.num_experts for layer in limits):
        raise InputError(
            f"scores have shape {tuple(scores.shape)}, but the model has {len(limits)} MoE layers of up to "
            f"{max(layer.num_experts for layer in limits)} experts; were they computed on another model?"
        )
    protect_list = sorted({(int(l), int(e)) for l, e in protect}) if protect else []
    protected = check_protect(protect_list, limits)
    scores = scores.detach().cpu()
    method = chosen[0]
    if method == "uniform":
        kept = uniform_keep(scores, limits, int(keep), protected, least_used=least_used)  # type: ignore[arg-type]
    elif method == "coverage":
        kept = coverage_keep(scores, limits, float(coverage), protected, least_used=least_used)  # type: ignore[arg-type]
    else:
        kept = global_keep(scores, limits, int(budget), protected, least_used=least_used)  # type: ignore[arg-type]
    normalize_keep_sets(limits, dict(enumerate(kept)), physical=False)  # type: ignore[arg-type]
    return PrunePlan(
        kept=kept,
        num_experts=[layer.num_experts for layer in limits],
        method=method,
        criterion=criterion,
        least_used=least_used,
        keep=keep,
        coverage=coverage,
        budget=budget,
        protect=protect_list,
        attribution_fingerprint=attribution_fingerprint,
        task=task,
    )
