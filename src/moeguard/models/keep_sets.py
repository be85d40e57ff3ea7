"""Validation of keep sets: which experts of each MoE layer survive.

A keep set maps an MoE layer index (its position among the model's MoE blocks) to
the expert indices that stay. Layers not named keep every expert. The guards here
are the ones every prune and mask must pass: indices in range and unique, at least
top-k per layer, equal per-group counts for group-limited routers, and (for a
physical prune) one keep count for all layers.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

from moeguard.errors import PlanError
from moeguard.models.layers import MoELayer

KeepSets = Mapping[int, Sequence[int]]


def _as_int(value: object, layer: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PlanError(f"layer {layer}: expert index {value!r} is not an integer.") from None


def _layer_key(raw: object, num_layers: int) -> int:
    try:
        key = int(raw) if isinstance(raw, str) else operator.index(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        key = None
    if isinstance(raw, bool) or key is None or not 0 <= key < num_layers:
        raise PlanError(
            f"keep set names MoE layer {raw!r}, but the model has {num_layers} MoE layers "
            f"(indices 0..{num_layers - 1}, counted among MoE blocks only)."
        )
    return key


def check_group_feasible(layer: MoELayer, kept: Sequence[int]) -> None:
    """Refuse a keep set that a group-limited router cannot route over.

    With G groups of E/G experts, every group must keep the same number m of experts
    (the router reshapes scores to ``[G, m]``), at least as many as it scores a group
    by, and the ``groups_per_token`` chosen groups must offer at least top-k experts.
    """
    routing = layer.group_routing
    if routing is None:
        return
    group_size = layer.num_experts // routing.num_groups
    per_group = [0] * routing.num_groups
    for index in kept:
        per_group[index // group_size] += 1
    counts = sorted(set(per_group))
    if len(counts) != 1:
        raise PlanError(
            f"layer {layer.index}: its router is group-limited ({routing.num_groups} groups of {group_size} experts) "
            f"and needs the same number of experts kept in every group, but this keep set keeps {per_group} per group. "
            f"Keep a multiple of {routing.num_groups} experts, evenly spread over the groups."
        )
    kept_per_group = counts[0]
    if kept_per_group < routing.experts_scored_per_group:
        raise PlanError(
            f"layer {layer.index}: its router scores each of its {routing.num_groups} groups by the group's "
            f"{routing.experts_scored_per_group} best experts, so every group must keep at least "
            f"{routing.experts_scored_per_group}; this keep set keeps {kept_per_group} per group."
        )
    if kept_per_group * routing.groups_per_token < layer.top_k:
        raise PlanError(
            f"layer {layer.index}: each token picks {routing.groups_per_token} groups and then {layer.top_k} experts "
            f"inside them, so each group must keep at least {-(-layer.top_k // routing.groups_per_token)}; "
            f"this keep set keeps {kept_per_group} per group."
        )


def normalize_keep_sets(layers: Sequence[MoELayer], keep: KeepSets, *, physical: bool) -> list[list[int] | None]:
    """Check ``keep`` against the model and return sorted kept indices per layer.

    ``None`` marks a layer that keeps all its experts. Raises :class:`PlanError`
    naming the layer and the fix for anything that cannot be routed.
    """
    if not isinstance(keep, Mapping):
        raise PlanError(f"a keep set must map MoE layer index -> expert indices, got {type(keep).__name__}.")
    result: list[list[int] | None] = [None] * len(layers)
    for raw_key, indices in keep.items():
        key = _layer_key(raw_key, len(layers))
        layer = layers[key]
        kept = [_as_int(i, key) for i in indices]
        out_of_range = [i for i in kept if not 0 <= i < layer.num_experts]
        if out_of_range:
            raise PlanError(
                f"layer {key}: expert indices {out_of_range} are out of range; this layer has "
                f"{layer.num_experts} experts (indices 0..{layer.num_experts - 1})."
            )
        repeated = sorted({i for i in kept if kept.count(i) > 1})
        if repeated:
            raise PlanError(f"layer {key}: expert indices {repeated} are listed more than once.")
        if len(kept) < layer.top_k:
            raise PlanError(
                f"layer {key}: keeping {len(kept)} experts, but every token is routed to top_k={layer.top_k} experts; "
                f"keep at least {layer.top_k} per layer."
            )
        kept.sort()
        check_group_feasible(layer, kept)
        result[key] = None if len(kept) == layer.num_experts else kept
    if physical:
        counts = {len(k) if k is not None else layer.num_experts for k, layer in zip(result, layers)}
        if len(counts) > 1:
            raise PlanError(
                f"physical pruning needs the same number of experts kept in every MoE layer, but this plan keeps "
                f"{sorted(counts)} in different layers: a stock transformers config holds one expert count for the whole "
                "model, so the pruned model could not be loaded with AutoModelForCausalLM. Use mask mode "
                "(MoEModel.mask_experts / `moeguard sweep`) for non-uniform plans, or a uniform keep count."
            )
    return result
