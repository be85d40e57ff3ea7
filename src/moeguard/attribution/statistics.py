"""Routing statistics as sums: what one routing event adds to the totals.

Every statistic is a sum over routed ``(token, slot)`` pairs, so totals over a
dataset are sums of per-batch contributions, and totals over several processes are
sums of per-process totals (one all-reduce). Each token belongs to a *part* (its
example's index modulo 2) so that two disjoint halves of the samples are kept apart
for the stability measure; the total is the sum over parts.

Notation for one MoE layer: token ``t`` is routed to experts ``S_t`` (``|S_t| = k``)
with weights ``w_{t,i}``; ``y_{t,i}`` is expert ``i``'s output on token ``t``;
``p_t`` is the token's part.
"""

from __future__ import annotations

import torch

PARTS = 2  # even and odd examples


def sum_by_expert(
    top_k_index: torch.Tensor,
    part: torch.Tensor,
    num_experts: int,
    values: torch.Tensor | None = None,
    *,
    parts: int = PARTS,
) -> torch.Tensor:
    """``[parts, num_experts]`` sums over routed pairs, split by part.

    ``out[p, i] = sum_t sum_{i in S_t} [p_t = p] * v_{t,i}``, with ``v = 1`` when
    ``values`` is None (then the result counts routing decisions, as int64);
    otherwise ``values`` is ``[n, k]`` aligned with ``top_k_index`` and the sums
    are float64.

    ``top_k_index`` is ``[n, k]``, ``part`` is ``[n]`` with values in ``0..parts-1``.
    """
    slots = top_k_index.shape[1]
    flat = (top_k_index.long() + part.long().unsqueeze(1) * num_experts).reshape(-1)
    if values is None:
        return torch.bincount(flat, minlength=parts * num_experts).view(parts, num_experts)
    out = torch.zeros(parts * num_experts, dtype=torch.float64, device=top_k_index.device)
    out.index_add_(0, flat, values.reshape(-1, slots).to(torch.float64).reshape(-1))
    return out.view(parts, num_experts)


def tokens_by_part(part: torch.Tensor, *, parts: int = PARTS) -> torch.Tensor:
    """``[parts]`` number of tokens of each part: ``out[p] = sum_t [p_t = p]``."""
    return torch.bincount(part.long(), minlength=parts)


def coactivation_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E, E]`` int64: ``C[i, j] = sum_t [i in S_t] [j in S_t]``.

    The diagonal holds each expert's routing count. Computed from the ``k x k``
    index pairs of every token, never from a dense ``[n, E]`` one-hot.
    """
    index = top_k_index.long()
    pairs = (index.unsqueeze(2) * num_experts + index.unsqueeze(1)).reshape(-1)
    return torch.bincount(pairs, minlength=num_experts * num_experts).view(num_experts, num_experts)


def output_norms(expert_outputs: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` float32 L2 norms ``||y_{t,i}||`` of unweighted expert outputs ``[n, k, H]``."""
    return torch.linalg.vector_norm(expert_outputs.float(), dim=-1)
