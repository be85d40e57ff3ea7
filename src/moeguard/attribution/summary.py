"""How specialised a task's routing is: effective experts, overlap between tasks, stability.

- effective number of experts: ``exp(H(A))`` of the routing frequencies ``A`` of a
  layer; ``E`` for uniform routing, ``k`` when a task always uses the same ``k`` experts;
- overlap: Jaccard index of the top-``m`` expert sets of two tasks, per layer;
- stability: Spearman rank correlation between the scores measured on the even and
  on the odd examples, per layer (1 = the ranking does not depend on the sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from moeguard.attribution.record import Attribution
from moeguard.attribution.scores import check_criterion, ranking_criteria, scores
from moeguard.errors import FingerprintMismatchError, InputError
from moeguard.models.fingerprint import short


def effective_experts(frequency: torch.Tensor) -> torch.Tensor:
    """``[L]``: ``exp(-sum_i A_i log A_i)`` per layer of ``frequency [L, E]`` (rows sum to 1; ``0 log 0 = 0``)."""
    p = frequency.to(torch.float64).clamp_min(0)
    entropy = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)
    return entropy.exp()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..n`` of a 1-D tensor, tied values sharing the mean of their ranks."""
    ordered, order = values.sort()
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)
    mean_rank = last - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(mean_rank[group])
    ranks[order] = mean_rank[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two 1-D tensors: the Pearson correlation of their average ranks.

    NaN when either is constant (no ranking to compare).
    """
    ra, rb = average_ranks(a) - (a.numel() + 1) / 2, average_ranks(b) - (b.numel() + 1) / 2
    denominator = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denominator if denominator > 0 else math.nan


def top_set_jaccard(a: torch.Tensor, b: torch.Tensor, top_m: Sequence[int]) -> torch.Tensor:
    """``[L]``: ``|T_a ∩ T_b| / |T_a ∪ T_b|`` with ``T`` the ``top_m[l]`` highest-scoring experts of layer ``l``.

    Ties are broken by expert index (lower first), so equal scores give equal sets.
    """
    result = []
    for layer, m in enumerate(top_m):
        first = set(_top(a[layer], m))
        second = set(_top(b[layer], m))
        result.append(len(first & second) / len(first | second))
    return torch.tensor(result, dtype=torch.float64)


def _top(row: torch.Tensor, m: int) -> list[int]:
    # A stable descending sort gives the lower index first among equal scores.
    return row.argsort(descending=True, stable=True)[:m].tolist()


def default_top_m(attribution: Attribution) -> list[int]:
    """A quarter of each layer's experts (at least top-k): a typical keep count."""
    return [max(k, e // 4) for k, e in zip(attribution.top_k, attribution.num_experts)]


def stability(attribution: Attribution, criterion: str) -> torch.Tensor:
    """``[L]``: Spearman's rho between ``criterion`` scores of the even and of the odd examples.

    NaN in a layer where a half gives every expert the same score (e.g. too few samples).
    """
    check_criterion(criterion, attribution)
    even, odd = (scores(half, criterion) for half in attribution.halves())
    return torch.tensor(
        [spearman(even[l, :e], odd[l, :e]) for l, e in enumerate(attribution.num_experts)], dtype=torch.float64
    )


def overlap(attributions: Sequence[Attribution], criterion: str, *, top_m: int | Sequence[int] | None = None) -> torch.Tensor:
    """``[T, T, L]``: Jaccard index of the top-``m`` expert sets of every pair of tasks, per layer.

    All attributions must come from the same model. ``top_m`` is one count, one per
    layer, or None for :func:`default_top_m`.
    """
    if not attributions:
        raise InputError("overlap needs at least one attribution.")
    first = attributions[0]
    for other in attributions[1:]:
        if other.model_fingerprint != first.model_fingerprint:
            raise FingerprintMismatchError(
                f"cannot compare expert sets of different models: {other.task!r} was attributed on model "
                f"{short(other.model_fingerprint)}, {first.task!r} on {short(first.model_fingerprint)}."
            )
    counts = default_top_m(first) if top_m is None else [top_m] * first.num_layers if isinstance(top_m, int) else list(top_m)
    if len(counts) != first.num_layers:
        raise InputError(f"top_m gives {len(counts)} counts for {first.num_layers} MoE layers.")
    for layer, (m, e) in enumerate(zip(counts, first.num_experts)):
        if not 1 <= m <= e:
            raise InputError(f"top_m={m} for layer {layer}, which has {e} experts; choose 1..{e}.")
    table = [scores(a, criterion) for a in attributions]
    n = len(table)
    result = torch.empty(n, n, first.num_layers, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            result[i, j] = top_set_jaccard(table[i], table[j], counts)
    return result


@dataclass
class Specialisation:
    """Per-layer specialisation of one task: effective experts and stability of each criterion."""

    task: str | None
    num_experts: list[int]
    top_k: list[int]
    effective_experts: list[float]
    stability: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON values (NaN, an undefined correlation, becomes null)."""
        data = asdict(self)
        data["stability"] = {c: [None if math.isnan(v) else v for v in values] for c, values in self.stability.items()}
        return data

    def describe(self) -> str:
        """One line: mean effective experts and mean stability per criterion."""
        mean_effective = sum(self.effective_experts) / len(self.effective_experts)
        parts = [f"effective experts {mean_effective:.1f} of {max(self.num_experts)} (mean over layers)"]
        for criterion, values in self.stability.items():
            finite = [v for v in values if not math.isnan(v)]
            parts.append(f"{criterion} stability {sum(finite) / len(finite):.2f}" if finite else f"{criterion} stability n/a")
        return ", ".join(parts)


def specialisation(attribution: Attribution, criteria: Sequence[str] | None = None) -> Specialisation:
    """Effective experts per layer, and the half-sample stability of each criterion.

    ``criteria`` defaults to every criterion the attribution holds except the baselines
    (random's halves are identical by construction).
    """
    names = ranking_criteria(attribution) if criteria is None else list(criteria)
    return Specialisation(
        task=attribution.task,
        num_experts=list(attribution.num_experts),
        top_k=list(attribution.top_k),
        effective_experts=effective_experts(scores(attribution, "frequency").clamp_min(0)).tolist(),
        stability={c: stability(attribution, c).tolist() for c in names},
    )
