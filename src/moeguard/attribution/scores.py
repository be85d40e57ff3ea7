"""Criteria: from summed statistics to one score per (MoE layer, expert).

Higher score = more responsible for the task = kept first. Notation per layer:
``N`` selected tokens, ``k`` experts per token, ``S_t`` the experts token ``t`` is
routed to with weights ``w_{t,i}``, ``y_{t,i}`` expert ``i``'s output on token ``t``,
``R_i = {t : i in S_t}`` the tokens routed to expert ``i``.
"""

from __future__ import annotations

import torch

from moeguard.attribution.record import ABLATION_SUMS, Attribution
from moeguard.errors import InputError

CRITERIA = ("frequency", "gate_mass", "reap", "ean", "ablation", "random")
# The sums each criterion is computed from.
NEEDS: dict[str, tuple[str, ...]] = {
    "frequency": ("routed", "tokens"),
    "gate_mass": ("gate_mass", "tokens"),
    "reap": ("weighted_norm", "routed"),
    "ean": ("output_norm", "routed"),
    "ablation": ABLATION_SUMS,
    "random": (),
}


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


def check_criterion(criterion: str, attribution: Attribution | None = None) -> None:
    """Refuse an unknown criterion, or one whose statistics ``attribution`` was collected without."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown attribution criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}.")
    if attribution is not None:
        missing = [name for name in NEEDS[criterion] if name not in attribution.sums]
        if missing:
            flag = "--ablation" if criterion == "ablation" else f"--criteria {criterion}"
            raise InputError(
                f"criterion {criterion!r} needs statistics {missing}, which this attribution was collected without; "
                f"run `moeguard attribute` again with {flag}."
            )


def available_criteria(attribution: Attribution) -> list[str]:
    """The criteria whose statistics ``attribution`` holds, in :data:`CRITERIA` order."""
    return [c for c in CRITERIA if all(name in attribution.sums for name in NEEDS[c])]


def scores(attribution: Attribution, criterion: str, *, seed: int = 0) -> torch.Tensor:
    """``[moe_layers, experts]`` float64 scores of ``criterion``; higher = more needed by the task.

    Padding slots (layers with fewer experts than the widest one) score ``-inf``.
    ``seed`` only affects ``random``.
    """
    check_criterion(criterion, attribution)
    total = attribution.total
    top_k = torch.tensor(attribution.top_k)
    if criterion == "frequency":
        result = frequency(total("routed"), total("tokens"), top_k)
    elif criterion == "gate_mass":
        result = gate_mass(total("gate_mass"), total("tokens"))
    elif criterion == "reap":
        result = reap(total("weighted_norm"), total("routed"))
    elif criterion == "ean":
        result = ean(total("output_norm"), total("routed"))
    elif criterion == "ablation":
        result = ablation(total("masked_loss"), total("base_loss"), total("loss_tokens"))
    else:
        result = random_scores((attribution.num_layers, attribution.width), seed)
    return result.masked_fill(~attribution.valid(), float("-inf"))
