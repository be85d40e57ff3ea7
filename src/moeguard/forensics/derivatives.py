"""Making suspects: what an adversary does to a parent's experts, for tests and benchmarks.

Detection must hold up when a suspect keeps any subset of a parent's experts, per
layer, in any order. :func:`reindex_experts` produces exactly that from a parent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moeguard.errors import PlanError
from moeguard.models import MoEModel
from moeguard.models.keep_sets import check_group_feasible
from moeguard.models.surgery import prune_in_place


def reindex_experts(moe: MoEModel, orders: Sequence[Sequence[int]]) -> None:
    """In place: MoE layer ``l`` keeps the parent experts ``orders[l]``, in that order.

    Every expert-indexed tensor (router rows and biases, fused expert weights) is
    gathered with the same order, so a permutation alone changes nothing about what
    the model computes. Counts may differ between layers; such a model lives in
    memory only (a stock config holds one expert count), and its config keeps the
    parent's count.
    """
    if len(orders) != moe.num_layers:
        raise PlanError(f"reindex_experts needs one order per MoE layer ({moe.num_layers}), got {len(orders)}.")
    orders = [list(map(int, order)) for order in orders]
    for layer, order in zip(moe.layers, orders):
        if len(set(order)) != len(order) or not all(0 <= i < layer.num_experts for i in order):
            raise PlanError(
                f"layer {layer.index}: {order} is not a list of distinct expert indices in 0..{layer.num_experts - 1}."
            )
        if len(order) < layer.top_k:
            raise PlanError(f"layer {layer.index}: keeping {len(order)} experts, fewer than top_k={layer.top_k}.")
        check_group_feasible(layer, order)
    if len({len(order) for order in orders}) == 1:
        prune_in_place(moe.model, moe.layers, orders)
    else:
        for layer, order in zip(moe.layers, orders):
            # A config-less stand-in: the tensors and module counters change, the shared config cannot.
            prune_in_place(nn.Module(), [layer], [order])
    moe.expert_ids = [[ids[i] for i in order] for ids, order in zip(moe.expert_ids, orders)]


def random_orders(moe: MoEModel, keep: Sequence[int], *, seed: int = 0) -> list[list[int]]:
    """For each MoE layer, ``keep[l]`` distinct experts drawn at random, in random order.

    Group-limited routers (DeepSeek-V3) get the same number from every group, and
    experts stay in their group's block (whole groups are shuffled), so the suspect
    routes exactly like the masked parent.
    """
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for layer, count in zip(moe.layers, keep):
        routing = layer.group_routing
        if routing is None:
            chosen = torch.randperm(layer.num_experts, generator=generator)[:count]
        else:
            if count % routing.num_groups:
                raise PlanError(
                    f"layer {layer.index}: keep {count} is not a multiple of its {routing.num_groups} expert groups."
                )
            size = layer.num_experts // routing.num_groups
            per_group = count // routing.num_groups
            # Groups are contiguous blocks: whole groups may move, experts may not leave theirs.
            groups = torch.randperm(routing.num_groups, generator=generator).tolist()
            chosen = torch.cat([g * size + torch.randperm(size, generator=generator)[:per_group] for g in groups])
        orders.append(chosen.tolist())
    return orders
