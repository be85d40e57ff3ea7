"""Acquisition functions: which unlabelled examples to label next.

Every function here is pure torch over the model's outputs on one batch and reduces
on the device of its inputs: the logits are read only at the positions that predict
answer tokens, and what leaves is ``[B]`` or ``[B, D]``, never pool x length x
vocabulary. The logits may be given as ``[B, T, V]`` or, as the scorer asks the
model for them (``logits_to_keep=answer_predictors(answer_mask)``), as ``[N, V]``
already taken at the N answer-predicting positions, so a batch never holds more
than its answer tokens x vocabulary. Scores are "higher = label first".

The answer of an unlabelled example is the model's own prediction (its greedy
continuation, or its most likely choice), so ``answer_mask`` marks predicted tokens;
a language-modelling text is its own answer (every token of it is read). As
everywhere in moeguard, ``logits[b, t]`` predicts token ``t + 1``.

Score-based functions rank examples one by one (least confidence, margin,
entropy, sequence NLL, and the routing share lost to pruning); the set-based ones
pick a diverse batch jointly (core-set's k-center greedy, BADGE's k-means++ seeding
on gradient embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


def answer_token_positions(answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(example, position)`` of the logits that predict answer tokens.

    Answer token ``t`` of row ``b`` is predicted by ``logits[b, t - 1]``, so the
    positions are the true entries of ``answer_mask[:, 1:]``.
    """
    example, position = answer_mask[:, 1:].nonzero(as_tuple=True)
    return example, position


def answer_predictors(answer_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose logits predict an answer token (``answer_mask`` shifted left by one).

    Passed to a causal LM as ``logits_to_keep``, the model returns logits ``[N, V]``
    at exactly these positions, in the order of :func:`answer_token_positions`.
    """
    predictors = torch.zeros_like(answer_mask, dtype=torch.bool)
    predictors[:, :-1] = answer_mask[:, 1:]
    return predictors


def per_example_mean(values: torch.Tensor, example: torch.Tensor, num_examples: int) -> torch.Tensor:
    """``[B]`` mean of ``values [N]`` over the entries of each example (0 where it has none)."""
    sums = torch.zeros(num_examples, dtype=values.dtype, device=values.device).index_add_(0, example, values)
    counts = torch.zeros(num_examples, dtype=values.dtype, device=values.device).index_add_(0, example, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def per_example_sum(values: torch.Tensor, example: torch.Tensor, num_examples: int) -> torch.Tensor:
    """``[B]`` sum of ``values [N]`` over the entries of each example."""
    return torch.zeros(num_examples, dtype=values.dtype, device=values.device).index_add_(0, example, values)


def answer_logits(logits: torch.Tensor, answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, V], example [N])`` at the N answer-predicting positions.

    ``logits`` is ``[B, T, V]`` or already ``[N, V]`` (taken at those positions, in
    :func:`answer_token_positions` order).
    """
    example, position = answer_token_positions(answer_mask)
    if logits.dim() == 3:
        return logits[example, position], example
    if logits.dim() != 2 or len(logits) != len(example):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} are neither [B, T, V] nor [N, V] at the {len(example)} "
            "answer-predicting positions"
        )
    return logits, example


def answer_log_probs(logits: torch.Tensor, answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p [N, V], example [N])``: the float32 log-softmax at the N answer-predicting positions."""
    token_logits, example = answer_logits(logits, answer_mask)
    return torch.log_softmax(token_logits.float(), dim=-1), example


def least_confidence(logits: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """``LC(x) = mean_t (1 - max_v p_t(v))`` over the answer tokens t of each example; ``[B]``."""
    log_probs, example = answer_log_probs(logits, answer_mask)
    return per_example_mean(1 - log_probs.max(dim=-1).values.exp(), example, answer_mask.shape[0])


def margin(logits: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """``M(x) = mean_t (1 - (p_t^(1) - p_t^(2)))``, p^(1) >= p^(2) the two largest probabilities; ``[B]``.

    A small gap between the two best tokens is a high score.
    """
    log_probs, example = answer_log_probs(logits, answer_mask)
    top2 = log_probs.topk(2, dim=-1).values.exp()
    return per_example_mean(1 - (top2[:, 0] - top2[:, 1]), example, answer_mask.shape[0])


def entropy(logits: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """``H(x) = mean_t -sum_v p_t(v) log p_t(v)`` over the answer tokens t (nats); ``[B]``."""
    log_probs, example = answer_log_probs(logits, answer_mask)
    token_entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return per_example_mean(token_entropy, example, answer_mask.shape[0])


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """``NLL(x) = -sum_t log p_t(y_t)``, y_t the answer tokens in ``input_ids`` (nats); ``[B]``.

    On the model's own greedy answer this is ``-log P(answer | prompt)``; unlike the
    per-token means above it grows with the answer's length.
    """
    log_probs, example = answer_log_probs(logits, answer_mask)
    targets = input_ids[:, 1:][answer_mask[:, 1:]]
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return per_example_sum(-picked, example, answer_mask.shape[0])


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``f(x) = sum_t m_t h_t / sum_t m_t``: ``[B, H]`` mean of ``hidden [B, T, H]`` over the masked tokens."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def k_center_greedy(candidates: torch.Tensor, centers: torch.Tensor, k: int) -> list[int]:
    """Core-set selection (Sener & Savarese, 2018): ``k`` rows of ``candidates [P, D]``.

    Each step picks ``argmax_i min_c ||x_i - c||_2`` over the current centres and makes
    the pick a centre. The first centres are ``centers [C, D]`` (the labelled set);
    with none, the first pick is the candidate farthest from the candidates' mean.
    Ties go to the lower index. Returns positions in ``candidates``.
    """
    if k > candidates.shape[0]:
        raise ValueError(f"cannot pick {k} of {candidates.shape[0]} candidates")
    points = candidates.double()
    if centers.shape[0]:
        nearest = torch.cdist(points, centers.to(points)).min(dim=1).values
    else:
        nearest = (points - points.mean(dim=0)).norm(dim=1)
    chosen: list[int] = []
    for _ in range(k):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, (points - points[pick]).norm(dim=1))
        nearest[pick] = -1.0  # never picked twice, even among duplicates
    return chosen


def gaussian_sketch(size: int, dim: int, generator: torch.Generator) -> torch.Tensor | None:
    """A ``[size, dim]`` matrix S with i.i.d. N(0, 1/dim) entries (E[S S^T] = I), or None when ``size <= dim``.

    ``<S^T a, S^T b>`` estimates ``<a, b>`` (Johnson-Lindenstrauss); None means "no
    sketch needed, use the vector as it is".
    """
    if size <= dim:
        return None
    return torch.randn(size, dim, generator=generator) / math.sqrt(dim)


def badge_embeddings(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    answer_mask: torch.Tensor,
    vocab_sketch: torch.Tensor | None = None,
    hidden_sketch: torch.Tensor | None = None,
) -> torch.Tensor:
    """BADGE gradient embeddings (Ash et al., 2020) of a batch, in factored form; ``[B, D]``.

    With pseudo-labels ``y_t = argmax_v p_t(v)`` the gradient of ``sum_t CE(p_t, y_t)``
    w.r.t. the output matrix ``W [V, H]`` (``logits = W h``) is
    ``g(x) = sum_t (p_t - e_{y_t}) h_t^T``. It is never formed at size V x H: each
    factor is sketched first, ``a_t = S_V^T (p_t - e_{y_t})`` and ``b_t = S_H^T h_t``,
    and the embedding is ``vec(sum_t a_t b_t^T) = vec(S_V^T g(x) S_H)``, whose inner
    products estimate those of g. A ``None`` sketch is the identity (exact).
    ``hidden [B, T, H]`` is the final hidden state the output layer reads.
    """
    log_probs, example = answer_log_probs(logits, answer_mask)
    _, position = answer_token_positions(answer_mask)
    probs = log_probs.exp()
    pseudo_label = probs.argmax(dim=-1)
    if vocab_sketch is None:
        residual = probs.clone()
        residual[torch.arange(residual.shape[0], device=residual.device), pseudo_label] -= 1
    else:
        sketch = vocab_sketch.to(probs)
        residual = probs @ sketch - sketch[pseudo_label]
    states = hidden[example, position].float()
    if hidden_sketch is not None:
        states = states @ hidden_sketch.to(states)
    outer = (residual.unsqueeze(-1) * states.unsqueeze(-2)).flatten(1)
    summed = torch.zeros(answer_mask.shape[0], outer.shape[1], dtype=outer.dtype, device=outer.device)
    return summed.index_add_(0, example, outer)


def kmeans_pp_seeding(embeddings: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k-means++ seeding as BADGE uses it: ``k`` rows of ``embeddings [P, D]``.

    The first pick is the row of largest norm; each next row i is drawn with
    probability ``D(i)^2 / sum_j D(j)^2``, D the distance to the nearest pick. When
    every remaining row coincides with a pick, the lowest-index unpicked row is taken.
    """
    if k > embeddings.shape[0]:
        raise ValueError(f"cannot pick {k} of {embeddings.shape[0]} rows")
    points = embeddings.double()
    first = int(points.norm(dim=1).argmax())
    chosen = [first]
    nearest = (points - points[first]).norm(dim=1)
    picked = torch.zeros(points.shape[0], dtype=torch.bool)
    picked[first] = True
    while len(chosen) < k:
        weights = nearest.pow(2).cpu().masked_fill(picked, 0.0)
        if weights.sum() > 0:
            pick = int(torch.multinomial(weights, 1, generator=generator))
        else:
            pick = int((~picked).nonzero()[0])
        chosen.append(pick)
        picked[pick] = True
        nearest = torch.minimum(nearest, (points - points[pick]).norm(dim=1))
    return chosen


def removed_routing_mass(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    example: torch.Tensor,
    removed: torch.Tensor,
    num_examples: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(removed [B], total [B])`` routing mass of one MoE layer, summed per example.

    For the tokens n of example b: ``removed_b = sum_n sum_j w_nj [e_nj removed]`` and
    ``total_b = sum_n sum_j w_nj``, with ``(e_nj, w_nj)`` the experts and weights the
    (unpruned) router handed to the experts (``top_k_index``/``top_k_weights``
    ``[N, k]``); ``example [N]`` maps tokens to examples, ``removed [E]`` is a bool mask.
    """
    weights = top_k_weights.float()
    lost = (weights * removed.to(top_k_index.device)[top_k_index]).sum(dim=-1)
    return per_example_sum(lost, example, num_examples), per_example_sum(weights.sum(dim=-1), example, num_examples)


def routing_loss_share(removed: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``s(x) = sum_l removed_l(x) / sum_l total_l(x)``: the share of x's routing mass the prune removed.

    ``removed`` and ``total`` are already summed over MoE layers; 0 where ``total`` is 0.
    """
    return torch.where(total > 0, removed / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def top_scored(scores: torch.Tensor, k: int) -> list[int]:
    """Positions of the ``k`` highest ``scores [P]``; ties go to the lower position."""
    order = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
    return order[:k].tolist()


# ---------------------------------------------------------------- the acquisition functions, by name


class Readout(NamedTuple):
    """What the model produced on one scored batch of prompt + own answer."""

    logits: torch.Tensor | None  # [B, T, V], or [N, V] at the answer-predicting positions
    hidden: torch.Tensor | None  # [B, T, H] final hidden states (when the function reads them)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    sketches: tuple[torch.Tensor | None, torch.Tensor | None]  # BADGE's vocabulary and hidden-size sketches


class Choice(NamedTuple):
    """A selection problem: pick ``k`` of ``candidates`` unlabelled examples."""

    candidates: int
    values: torch.Tensor | None  # [candidates] scores or [candidates, D] embeddings (None: nothing was scored)
    labelled_values: torch.Tensor | None  # the labelled examples' rows (functions with reads_labelled)
    k: int
    generator: torch.Generator


def highest(choice: Choice) -> list[int]:
    """The ``k`` highest scores (ties to the lower position)."""
    return top_scored(choice.values, choice.k)


def uniformly(choice: Choice) -> list[int]:
    """``k`` candidates uniformly at random."""
    return torch.randperm(choice.candidates, generator=choice.generator)[: choice.k].tolist()


@dataclass(frozen=True)
class Acquisition:
    """One acquisition function.

    ``value`` turns the model's :class:`Readout` on a batch of the pool into per-example
    values (None: nothing is read from the model); ``choose`` picks the batch to label
    from them. ``reads_logits`` / ``reads_hidden`` say what the model must return (logits
    only at the answer-predicting positions); ``reads_labelled`` that the labelled
    examples' values are needed too; ``sketched`` that BADGE's random sketches are drawn;
    ``parent_routing`` that the values are the unpruned parent's routing shares,
    measured once before the first round. ``kinds`` are the task types it applies to;
    ``why_not`` says why not to the others.
    """

    name: str
    help: str
    value: Callable[[Readout], torch.Tensor] | None = None
    choose: Callable[[Choice], list[int]] = highest
    reads_logits: bool = False
    reads_hidden: bool = False
    reads_labelled: bool = False
    sketched: bool = False
    parent_routing: bool = False
    kinds: tuple[str, ...] = ("generate", "choice", "lm")
    why_not: str = ""


# Adding an acquisition function is one entry here (and its pure function above).
ACQUISITIONS: dict[str, Acquisition] = {a.name: a for a in (
    Acquisition("random", "uniformly at random", choose=uniformly),
    Acquisition("least_confidence", "lowest mean probability of the model's own answer tokens",
                lambda r: least_confidence(r.logits, r.answer_mask), reads_logits=True),
    Acquisition("margin", "smallest mean gap between the two most likely tokens",
                lambda r: margin(r.logits, r.answer_mask), reads_logits=True),
    Acquisition("entropy", "highest mean token entropy of the model's own answer",
                lambda r: entropy(r.logits, r.answer_mask), reads_logits=True),
    Acquisition("sequence_nll", "highest negative log-likelihood of the model's own answer",
                lambda r: sequence_nll(r.logits, r.input_ids, r.answer_mask), reads_logits=True),
    Acquisition("coreset", "k-center greedy over mean-pooled final hidden states (diversity)",
                lambda r: mean_pooled(r.hidden.float(), r.attention_mask),
                lambda c: k_center_greedy(c.values, c.labelled_values, c.k), reads_hidden=True, reads_labelled=True),
    Acquisition("badge", "k-means++ seeding over sketched last-layer gradient embeddings (uncertainty + diversity)",
                lambda r: badge_embeddings(r.logits, r.hidden, r.answer_mask, *r.sketches),
                lambda c: kmeans_pp_seeding(c.values, c.k, c.generator), reads_logits=True, reads_hidden=True,
                sketched=True, kinds=("generate", "choice"),
                why_not="its embeddings are gradients for the model's own guessed labels, a stand-in for answers it "
                        "has not been given; a text is its own label, so they would not be the gradients training "
                        "follows (sequence_nll ranks texts by their actual loss)"),
    Acquisition("routing", "largest share of the unpruned parent's routing mass that went to removed experts",
                parent_routing=True),
)}
