"""Which experts the carver keeps: attribution on the model under attack, or a search over subsets.

The search treats the loss of the masked model on a batch of teacher-labelled
examples, ``L(S)`` for keep sets ``S = (S_1, ..., S_L)``, as a black box:

- backward elimination: start from every expert; at each step remove the
  (layer, expert) whose removal raises ``L`` least, among the layers that still keep
  more than ``k``, until every layer keeps ``k`` (the whole set is re-scored after
  each removal, so experts that only work together are seen together);
- swaps: then, layer by layer, exchange a kept expert for a removed one whenever that
  lowers ``L``, until a full pass finds no better swap (or ``max_passes``).

Every evaluation of ``L`` is a forward pass the attacker pays for; the result
counts them. Attribution (``method="attribution"``) scores experts by each criterion
of :data:`moeguard.attribution.scores.CRITERIA` it is given, on the model under
attack, and keeps the criterion whose plan has the lowest ``L``; ``random`` keeps a
uniformly random set (what a defense tuned against attribution cannot anticipate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moeguard.attribution import collect_attribution, scores
from moeguard.attribution.scores import CRITERIA
from moeguard.data import TaskData, batches
from moeguard.data.batching import context_length
from moeguard.errors import InputError
from moeguard.models import MoEModel
from moeguard.pruning.plans import LayerLimits, make_plan, uniform_keep
from moeguard.training import lm_loss

KeepList = list[list[int]]
LossOfKeep = Callable[[KeepList], float]

SELECTIONS = ("search", "attribution", "random")
ATTRIBUTION_CRITERIA = ("frequency", "reap", "ablation")


@dataclass
class SearchResult:
    """The kept experts per layer, their loss, and how many loss evaluations the search made."""

    kept: KeepList
    loss: float
    evaluations: int


def backward_elimination(loss_of: LossOfKeep, num_experts: Sequence[int], keep: int) -> SearchResult:
    """Greedy backward elimination down to ``keep`` experts per layer (see the module docstring).

    Ties go to the lower layer, then the lower expert index.
    """
    if any(keep > count for count in num_experts) or keep < 1:
        raise InputError(f"cannot keep {keep} experts per layer of {list(num_experts)}.", arguments=("keep",))
    kept = [list(range(count)) for count in num_experts]
    evaluations, loss = 0, float("nan")
    while any(len(layer) > keep for layer in kept):
        best: tuple[float, int, int] | None = None
        for layer, experts in enumerate(kept):
            if len(experts) <= keep:
                continue
            for expert in experts:
                trial = [list(e) for e in kept]
                trial[layer].remove(expert)
                value = loss_of(trial)
                evaluations += 1
                if best is None or value < best[0]:
                    best = (value, layer, expert)
        loss, layer, expert = best
        kept[layer].remove(expert)
    if evaluations == 0:
        loss, evaluations = loss_of(kept), 1
    return SearchResult(kept, loss, evaluations)


def swap_refinement(loss_of: LossOfKeep, start: SearchResult, num_experts: Sequence[int], *, max_passes: int = 2) -> SearchResult:
    """Improve a keep set by single swaps (kept <-> removed, one layer at a time), first improvement taken."""
    kept = [list(e) for e in start.kept]
    loss, evaluations = start.loss, start.evaluations
    for _ in range(max_passes):
        improved = False
        for layer, count in enumerate(num_experts):
            for out in list(kept[layer]):
                for candidate in range(count):
                    if candidate in kept[layer] or out not in kept[layer]:
                        continue
                    trial = [list(e) for e in kept]
                    trial[layer] = sorted([e for e in trial[layer] if e != out] + [candidate])
                    value = loss_of(trial)
                    evaluations += 1
                    if value < loss:
                        kept, loss, improved = trial, value, True
                        break
        if not improved:
            break
    return SearchResult([sorted(e) for e in kept], loss, evaluations)


@dataclass
class Selection:
    """The experts an attack keeps and what choosing them cost (forward tokens through the full model)."""

    method: str
    kept: KeepList
    loss: float
    evaluations: int
    forward_tokens: int
    detail: str = ""

    def keep_sets(self) -> dict[int, list[int]]:
        return {layer: list(experts) for layer, experts in enumerate(self.kept)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MaskedLoss:
    """``L(S)``: the teacher-answer loss of ``moe`` masked to ``S`` on one fixed batch, counting tokens."""

    def __init__(self, moe: MoEModel, batch: dict[str, torch.Tensor]) -> None:
        self.moe, self.batch = moe, batch
        self.tokens_per_call = int(batch["attention_mask"].sum())
        self.calls = 0

    @torch.no_grad()
    def __call__(self, kept: KeepList) -> float:
        self.calls += 1
        with self.moe.mask_experts(dict(enumerate(kept))):
            return lm_loss(self.moe, self.batch).item()


def random_keep(moe: MoEModel, keep: int, seed: int) -> KeepList:
    """``keep`` experts per layer drawn uniformly at random from ``seed`` (group limits respected)."""
    limits = [LayerLimits.of(layer) for layer in moe.layers]
    noise = torch.rand(len(limits), max(moe.num_experts), generator=torch.Generator().manual_seed(seed))
    return uniform_keep(noise, limits, keep)


def _search_batch(moe: MoEModel, data: TaskData) -> dict[str, torch.Tensor]:
    return next(batches(moe.tokenizer, data, batch_size=len(data), context=context_length(moe)))


def attribution_tokens(data: TaskData, moe: MoEModel, criteria: Sequence[str]) -> int:
    """Forward tokens of an attribution over ``data``: one pass, plus one per routed expert for ablation."""
    passes = 1 + (sum(moe.num_experts) if "ablation" in criteria else 0)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches(moe.tokenizer, data, batch_size=256, context=context_length(moe)))
    return passes * tokens


def subset_search(loss_of: LossOfKeep, num_experts: Sequence[int], keep: int) -> SearchResult:
    """Backward elimination, then swaps (see the module docstring)."""
    return swap_refinement(loss_of, backward_elimination(loss_of, num_experts, keep), num_experts)


def best_attribution_plan(moe: MoEModel, attribution: Any, keep: int, criteria: Sequence[str],
                          loss_of: LossOfKeep) -> tuple[str, KeepList, float]:
    """``(criterion, kept, loss)``: the plan of the criterion whose keep sets have the lowest loss (ties: listed first)."""
    plans = {c: make_plan(scores(attribution, c), moe.layers, keep=keep, criterion=c).kept for c in criteria}
    losses = {c: loss_of(plan) for c, plan in plans.items()}
    best = min(criteria, key=lambda c: (losses[c], list(criteria).index(c)))
    return best, plans[best], losses[best]


def select_batch_experts(moe: MoEModel, method: str, keep: int, batch: dict[str, torch.Tensor],
                         criteria: Sequence[str] = ATTRIBUTION_CRITERIA) -> KeepList:
    """The experts ``method`` (search or attribution) keeps, measured on one batch of labelled examples."""
    loss_of = MaskedLoss(moe, batch)
    if method == "search":
        return subset_search(loss_of, moe.num_experts, keep).kept
    if method != "attribution":
        raise InputError(f"{method!r} is not chosen from a batch; use search or attribution.", arguments=("selection",))
    attribution = collect_attribution(moe, [batch], criteria=tuple(criteria), progress=False)
    return best_attribution_plan(moe, attribution, keep, criteria, loss_of)[1]


def select_experts(
    moe: MoEModel, method: str, keep: int, *, search_data: TaskData, attribution_data: TaskData | None = None,
    criteria: Sequence[str] = ATTRIBUTION_CRITERIA, seed: int = 0, progress: bool = False,
) -> Selection:
    """The keep sets of ``method`` (one of :data:`SELECTIONS`) at ``keep`` experts per layer of ``moe``.

    ``search_data`` are teacher-labelled examples the loss ``L`` is measured on;
    ``attribution_data`` (default: the same) what attribution routes. ``seed`` draws
    the random selection.
    """
    if method not in SELECTIONS:
        raise InputError(f"unknown expert selection {method!r}; choose one of {', '.join(SELECTIONS)}.",
                         arguments=("selection",))
    loss_of = MaskedLoss(moe, _search_batch(moe, search_data))
    if method == "random":
        kept = random_keep(moe, keep, seed)
        return Selection(method, kept, loss_of(kept), 0, 0, f"seed {seed}")
    if method == "search":
        result = subset_search(loss_of, moe.num_experts, keep)
        return Selection(method, result.kept, result.loss, result.evaluations, result.evaluations * loss_of.tokens_per_call)
    for criterion in criteria:
        if criterion not in CRITERIA or CRITERIA[criterion].baseline:
            raise InputError(f"{criterion!r} is not an attribution criterion; choose from {', '.join(ATTRIBUTION_CRITERIA)}.",
                             arguments=("criteria",))
    routed = attribution_data if attribution_data is not None else search_data
    attribution = collect_attribution(moe, batches(moe.tokenizer, routed, batch_size=64, context=context_length(moe)), criteria=tuple(criteria),
                                      progress=progress)
    best, kept, loss = best_attribution_plan(moe, attribution, keep, criteria, loss_of)
    tokens = attribution_tokens(routed, moe, criteria) + len(criteria) * loss_of.tokens_per_call
    return Selection(method, kept, loss, len(criteria), tokens, f"criterion {best}")

