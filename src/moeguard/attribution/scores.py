"""Criteria: from summed statistics to one score per (MoE layer, expert).

Higher score = more responsible for the task = kept first. Notation per layer:
``N`` selected tokens, ``k`` experts per token, ``S_t`` the experts token ``t`` is
routed to with weights ``w_{t,i}``, ``y_{t,i}`` expert ``i``'s output on token ``t``,
``R_i = {t : i in S_t}`` the tokens routed to expert ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moeguard.attribution.record import ABLATION_SUMS, NORM_SUMS, Attribution
from moeguard.errors import InputError


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` in float64, 0 where the denominator is 0."""
    numerator, denominator = numerator.to(torch.float64), denominator.to(torch.float64)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.zeros_like(numerator))


def frequency(routed: torch.Tensor, tokens: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The paper's attribution ``A_i = |R_i| / (N k)``: the share of routing decisions that go to ``i``.

    ``routed [L, E]``, ``tokens [L]``, ``top_k [L]``; each layer's row sums to 1.
    """
    return _ratio(routed, (tokens * top_k).unsqueeze(-1).expand_as(routed))


def gate_mass(gate_sums: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Router weight per token: ``G_i = (1/N) sum_{t in R_i} w_{t,i}``.

    The ranking within a layer is that of the raw sum; dividing by ``N`` makes
    tasks of different sizes comparable.
    """
    return _ratio(gate_sums, tokens.unsqueeze(-1).expand_as(gate_sums))


def reap(weighted_norm_sums: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """REAP (router-weighted expert activation): ``(1/|R_i|) sum_{t in R_i} w_{t,i} ||y_{t,i}||``; 0 if ``R_i`` is empty."""
    return _ratio(weighted_norm_sums, routed)


def ean(output_norm_sums: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """Expert activation norm: ``(1/|R_i|) sum_{t in R_i} ||y_{t,i}||``; 0 if ``R_i`` is empty."""
    return _ratio(output_norm_sums, routed)


def ablation(masked_loss: torch.Tensor, base_loss: torch.Tensor, loss_tokens: torch.Tensor) -> torch.Tensor:
    """Knowledge loss: ``(1/M) (sum_t l_t^{-i} - sum_t l_t)``, the rise of the mean task loss
    when expert ``i`` alone is masked in its layer.

    ``l_t`` is the task loss of loss token ``t`` (``M`` of them) and ``l_t^{-i}`` the
    same with expert ``i`` masked. ``masked_loss [L, E]``, ``base_loss`` and
    ``loss_tokens`` scalars.
    """
    return _ratio(masked_loss - base_loss, loss_tokens.expand_as(masked_loss))


def random_scores(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Uniform ``[0, 1)`` scores from a CPU generator seeded with ``seed`` (the same on every machine)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------- the criteria, by name


@dataclass(frozen=True)
class Criterion:
    """One attribution criterion: ``score(attribution, seed)`` gives ``[moe_layers, experts]`` scores
    (higher = more needed by the task) from the sums named in ``needs``.

    ``help`` is the one-line description shown in the command line help and in figure
    titles; ``default`` criteria are collected when none are named; a ``baseline``
    (random) ranks nothing and is never an attack criterion; ``signed`` scores can be
    negative (their heatmaps are centred on 0).
    """

    name: str
    help: str
    needs: tuple[str, ...]
    score: Callable[[Attribution, int], torch.Tensor]
    default: bool = False
    baseline: bool = False
    signed: bool = False


# Adding a criterion is one entry here: the sums it reads (moeguard.attribution.record)
# and its score. What is collected, the command line's choices and help, and the
# figures all follow this table.
CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("frequency", "routing frequency A_i", ("routed", "tokens"),
              lambda a, seed: frequency(a.total("routed"), a.total("tokens"), torch.tensor(a.top_k)), default=True),
    Criterion("gate_mass", "gate mass per token", ("gate_mass", "tokens"),
              lambda a, seed: gate_mass(a.total("gate_mass"), a.total("tokens")), default=True),
    Criterion("reap", "REAP (mean weight x output norm)", ("weighted_norm", "routed"),
              lambda a, seed: reap(a.total("weighted_norm"), a.total("routed")), default=True),
    Criterion("ean", "EAN (mean output norm)", ("output_norm", "routed"),
              lambda a, seed: ean(a.total("output_norm"), a.total("routed")), default=True),
    Criterion("ablation", "knowledge loss (loss rise when masked)", ABLATION_SUMS,
              lambda a, seed: ablation(a.total("masked_loss"), a.total("base_loss"), a.total("loss_tokens")), signed=True),
    Criterion("random", "random", (), lambda a, seed: random_scores((a.num_layers, a.width), seed), baseline=True),
)}
# The criteria collected when none are named.
DEFAULT_CRITERIA: tuple[str, ...] = tuple(name for name, c in CRITERIA.items() if c.default)


def check_criterion(criterion: str, attribution: Attribution | None = None) -> Criterion:
    """The criterion named ``criterion``; refuse an unknown one, or one whose statistics
    ``attribution`` was collected without."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown attribution criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}.")
    entry = CRITERIA[criterion]
    if attribution is not None:
        missing = [name for name in entry.needs if name not in attribution.sums]
        if missing:
            raise InputError(
                f"criterion {criterion!r} needs statistics {missing}, which this attribution was collected without; "
                f"collect it again with criteria including {criterion!r}."
            )
    return entry


def collected_statistics(criteria: Sequence[str]) -> tuple[bool, bool]:
    """``(norms, ablation)``: whether collecting for ``criteria`` needs expert output norms, and masked passes."""
    needed = {name for criterion in criteria for name in check_criterion(criterion).needs}
    return bool(needed & set(NORM_SUMS)), bool(needed & set(ABLATION_SUMS))


def available_criteria(attribution: Attribution) -> list[str]:
    """The criteria whose statistics ``attribution`` holds, in :data:`CRITERIA` order."""
    return [name for name, c in CRITERIA.items() if all(needed in attribution.sums for needed in c.needs)]


def ranking_criteria(attribution: Attribution) -> list[str]:
    """:func:`available_criteria` without the baselines (what heatmaps and stability are computed for)."""
    return [name for name in available_criteria(attribution) if not CRITERIA[name].baseline]


def scores(attribution: Attribution, criterion: str, *, seed: int = 0) -> torch.Tensor:
    """``[moe_layers, experts]`` float64 scores of ``criterion``; higher = more needed by the task.

    Padding slots (layers with fewer experts than the widest one) score ``-inf``.
    ``seed`` only affects ``random``.
    """
    result = check_criterion(criterion, attribution).score(attribution, seed)
    return result.masked_fill(~attribution.valid(), float("-inf"))
