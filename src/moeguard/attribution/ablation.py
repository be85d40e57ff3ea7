"""Knowledge loss by ablation: the task loss with one expert masked.

Masking expert ``i`` of layer ``l`` (``MoEModel.mask_experts({l: all but i})``)
makes its tokens go to their next-best experts, exactly what pruning it would do,
so the rise of the loss is the causal cost of removing that expert alone.

Every expert is masked on every batch, even one no token of the batch reached:
where router weights are a softmax over all experts (Qwen2-MoE, OLMoE), removing
an unused expert still raises the weights of the selected ones, as pruning it would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeguard.attribution.statistics import PARTS
from moeguard.data import IGNORE_INDEX
from moeguard.errors import InputError, PlanError
from moeguard.models import MoEModel, normalize_keep_sets
from moeguard.training import token_cross_entropy


@dataclass(frozen=True)
class AblationUnit:
    """Expert ``expert`` of MoE layer ``layer`` masked; ``keep`` is the keep set that does it."""

    layer: int
    expert: int
    keep: dict[int, list[int]]


def ablation_units(moe: MoEModel) -> list[AblationUnit]:
    """One unit per (layer, expert), checked up front so no pass is wasted on an impossible mask."""
    units = []
    for layer in moe.layers:
        for expert in range(layer.num_experts):
            keep = {layer.index: [i for i in range(layer.num_experts) if i != expert]}
            try:
                normalize_keep_sets(moe.layers, keep, physical=False)
            except PlanError as error:
                raise InputError(
                    f"ablation masks one expert at a time, which layer {layer.index} cannot route around: {error} "
                    "Use the routing criteria (frequency, gate_mass, reap, ean) for this model."
                ) from None
            units.append(AblationUnit(layer.index, expert, keep))
    return units


def loss_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's ``labels``, or (plain text) every non-pad token, -100 elsewhere."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    attention = batch.get("attention_mask")
    labels = batch["input_ids"].clone()
    if attention is not None:
        labels[attention == 0] = IGNORE_INDEX
    return labels


def loss_by_part(logits: torch.Tensor, labels: torch.Tensor, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Task-loss sums and loss-token counts of each part, ``([PARTS] float64, [PARTS] int64)``.

    ``sum_p = M_p * token_cross_entropy(examples of part p)`` with ``M_p`` their
    labelled next tokens: the training loss, summed instead of averaged so that
    parts, batches and processes add up.
    """
    labels = labels.to(logits.device)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    sums = torch.zeros(PARTS, dtype=torch.float64, device=logits.device)
    totals = torch.zeros(PARTS, dtype=torch.int64, device=logits.device)
    for p in range(PARTS):
        rows = part == p
        count = int(counts[rows].sum())
        if count:
            sums[p] = token_cross_entropy(logits[rows], labels[rows]).double() * count
            totals[p] = count
    return sums, totals
