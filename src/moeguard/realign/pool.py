"""Scoring the unlabelled pool: the model's own answers, the acquisition values, the selection.

An unlabelled example has a prompt but no answer, so the model answers it itself
(greedy generation for generate data, its most likely choice for choice data; a
language-modelling text needs no answer: it is read as it is); the acquisition
functions then read the model's outputs on prompt + own answer. The routing-aware
acquisition instead reads the unpruned parent's routing on the prompt (the text).
Under ``torch.distributed`` each process scores its share of the examples and the
shares are gathered (:mod:`moeguard.distributed`), so every process
sees every value.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from moeguard.data.batching import (
    EncodedExample,
    collate,
    encode_continuations,
    encode_examples,
    encode_prompts,
    model_inputs,
    pad_id_of,
    to_device,
)
from moeguard.data.examples import TaskData
from moeguard.distributed import gather_rows, shard
from moeguard.errors import InputError
from moeguard.eval.evaluate import (
    causal_lm,
    device_of,
    eval_mode,
    evaluate,
    greedy_generate,
    length_sorted_chunks,
)
from moeguard.models import MoEModel
from moeguard.models.routing import RoutingEvent
from moeguard.realign import acquisition as acq
from moeguard.realign.acquisition import ACQUISITIONS, Acquisition, Choice, Readout

SKETCH_DIM = 32
# The answer-token logits one scored batch may hold, as float32: with a real vocabulary
# (150k tokens: 600 kB per token) a batch is cut to about 450 answer tokens, so the
# log-softmax and its temporaries stay bounded whatever the batch size asked for.
LOGIT_BYTES = 256 * 2**20


def check_acquisition(name: str) -> Acquisition:
    """The acquisition function named ``name`` (refused when unknown)."""
    if name not in ACQUISITIONS:
        raise InputError(f"unknown acquisition function {name!r}; choose one of {', '.join(ACQUISITIONS)}.")
    return ACQUISITIONS[name]


def check_acquisition_for(name: str, kind: str, task: str) -> Acquisition:
    """The acquisition function ``name``, refused for a task type it does not apply to (``kind``)."""
    entry = check_acquisition(name)
    if kind not in entry.kinds:
        usable = [n for n, a in ACQUISITIONS.items() if kind in a.kinds]
        raise InputError(f"acquisition={name} does not apply to {kind} data (task {task!r}): {entry.why_not}. Choose one "
                         f"of {', '.join(usable)}.", arguments=("acquisition",))
    return entry


def own_answers(moe: MoEModel, data: TaskData, indices: Sequence[int], *, max_new_tokens: int, batch_size: int) -> list[EncodedExample]:
    """Prompt + the model's own answer (its target tokens) for the examples at ``indices``.

    generate: the greedy continuation up to and including eos (at most
    ``max_new_tokens``); choice: the choice with the highest log-likelihood, + eos;
    lm: the text itself (as a batch encodes it).
    """
    tokenizer = moe.tokenizer
    examples = data.subset(indices)
    if data.kind == "lm":
        return encode_examples(tokenizer, examples.examples)
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples.examples], moe.prompt_format)
    if data.kind == "choice":
        picked = evaluate(moe, tokenizer, examples, batch_size=batch_size).predictions
        answers = encode_continuations(tokenizer, picked, eos=True)
        return [EncodedExample(p, a) for p, a in zip(prompts, answers)]
    lm = causal_lm(moe)
    eos = tokenizer.eos_token_id
    answers: list[list[int]] = [[] for _ in prompts]
    with eval_mode(lm):
        for chunk in length_sorted_chunks([len(p) for p in prompts], batch_size):
            generated = greedy_generate(lm, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens)
            for i, tokens in zip(chunk, generated):
                answers[i] = tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens
    return [EncodedExample(p, a) for p, a in zip(prompts, answers)]


def batch_values(name: str, outputs: object, batch: dict[str, torch.Tensor], sketches: tuple) -> torch.Tensor:
    """The acquisition value of each example of one scored batch: ``[B]`` scores or ``[B, D]`` embeddings."""
    entry = check_acquisition(name)
    if entry.value is None:
        raise InputError(f"{name!r} is not computed from model outputs.")
    hidden = outputs.hidden_states[-1] if entry.reads_hidden else None
    return entry.value(Readout(outputs.logits, hidden, batch["input_ids"], batch["attention_mask"], batch["answer_mask"],
                               sketches))


def accepts_logits_to_keep(lm: torch.nn.Module) -> bool:
    """Whether the causal LM's forward can restrict its logits to some positions (every transformers family does)."""
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def logit_budget_chunks(chunks: Sequence[Sequence[int]], answer_tokens: Sequence[int], vocab: int) -> list[list[int]]:
    """``chunks`` split further so that no batch holds more than :data:`LOGIT_BYTES` of float32 answer-token logits.

    ``answer_tokens[i]`` is the number of answer tokens of example i; a batch keeps at
    least one example, however long its answer.
    """
    limit = max(1, LOGIT_BYTES // (4 * vocab))
    split: list[list[int]] = []
    for chunk in chunks:
        current: list[int] = []
        tokens = 0
        for i in chunk:
            if current and tokens + answer_tokens[i] > limit:
                split.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += answer_tokens[i]
        if current:
            split.append(current)
    return split


def badge_sketches(moe: MoEModel, generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The vocabulary and hidden-size sketches BADGE embeddings are computed with."""
    lm = causal_lm(moe)
    vocab, hidden = lm.get_output_embeddings().weight.shape
    return acq.gaussian_sketch(vocab, SKETCH_DIM, generator), acq.gaussian_sketch(hidden, SKETCH_DIM, generator)


@torch.no_grad()
def pool_values(
    moe: MoEModel,
    data: TaskData,
    indices: Sequence[int],
    name: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The acquisition values of ``name`` for the examples at ``indices``: ``[n]`` or ``[n, D]``.

    Computed in the model's current state (inside a ``mask_experts`` block in mask
    mode). Each process scores its shard; the result is complete on every process.
    The model computes logits only where the acquisition reads them (the positions
    that predict answer tokens; none for core-set), and batches are cut to
    :data:`LOGIT_BYTES` of answer-token logits.
    """
    entry = check_acquisition(name)
    sketches = badge_sketches(moe, generator) if entry.sketched else (None, None)
    local = shard(indices)
    encoded = own_answers(moe, data, local, max_new_tokens=max_new_tokens, batch_size=batch_size)
    lm = causal_lm(moe)
    device = device_of(lm)
    pad_id = pad_id_of(moe.tokenizer)
    restrict = accepts_logits_to_keep(lm)
    vocab = lm.get_output_embeddings().weight.shape[0]
    chunks = length_sorted_chunks([len(e.prompt) + len(e.target) for e in encoded], batch_size)
    if entry.reads_logits:
        # Without logits_to_keep the model returns logits at every position: budget those.
        counted = [len(e.target) if restrict else len(e.prompt) + len(e.target) for e in encoded]
        chunks = logit_budget_chunks(chunks, counted, vocab)
    rows: list[torch.Tensor] = [torch.empty(0)] * len(local)
    with eval_mode(lm):
        for chunk in chunks:
            batch = to_device(collate([encoded[i] for i in chunk], chunk, pad_id), device)
            kwargs = {}
            if restrict:
                kwargs["logits_to_keep"] = acq.answer_predictors(batch["answer_mask"]) if entry.reads_logits else 1
            outputs = lm(**model_inputs(batch), output_hidden_states=entry.reads_hidden, **kwargs)
            values = batch_values(name, outputs, batch, sketches).float().cpu()
            for row, i in enumerate(chunk):
                rows[i] = values[row]
    stacked = torch.stack(rows) if rows else torch.empty(0)
    return gather_rows(indices, local, stacked)


def removed_expert_masks(num_experts: Sequence[int], kept: Sequence[Sequence[int] | None]) -> list[torch.Tensor]:
    """Per MoE layer of the parent, a ``[E]`` bool mask of the experts the prune removed."""
    masks = []
    for experts, layer_kept in zip(num_experts, kept):
        removed = torch.ones(experts, dtype=torch.bool)
        removed[list(layer_kept) if layer_kept is not None else list(range(experts))] = False
        masks.append(removed)
    return masks


@torch.no_grad()
def routing_shares(
    parent: MoEModel, data: TaskData, indices: Sequence[int], removed: Sequence[torch.Tensor], *, batch_size: int
) -> torch.Tensor:
    """``[n]``: for each example, the share of the parent's routing mass on its prompt (an lm example: its
    text) that went to removed experts.

    :func:`acquisition.routing_loss_share` of the masses summed over every MoE layer
    and every prompt token, read from the routing the parent actually uses.
    """
    if len(removed) != parent.num_layers:
        raise InputError(
            f"the prune record describes {len(removed)} MoE layers, but the parent has {parent.num_layers}; "
            "pass the model the pruned model was made from."
        )
    local = shard(indices)
    if data.kind == "lm":
        prompts = [e.target for e in encode_examples(parent.tokenizer, [data.examples[i] for i in local])]
    else:
        prompts = encode_prompts(parent.tokenizer, [data.examples[i].prompt for i in local], parent.prompt_format)
    lm = causal_lm(parent)
    device = device_of(lm)
    pad_id = pad_id_of(parent.tokenizer)
    restrict = accepts_logits_to_keep(lm)
    lost = torch.zeros(len(local), dtype=torch.float64)
    total = torch.zeros(len(local), dtype=torch.float64)
    batch_rows: torch.Tensor | None = None

    def accumulate(event: RoutingEvent) -> None:
        example = batch_rows.to(event.token_positions.device)[event.token_positions[:, 0]]
        gone, mass = acq.removed_routing_mass(
            event.top_k_index, event.top_k_weights, example, removed[event.layer.index], len(local)
        )
        lost.add_(gone.double().cpu())
        total.add_(mass.double().cpu())

    with eval_mode(lm), parent.capture_routing(keep=False, on_route=accumulate):
        for chunk in length_sorted_chunks([len(p) for p in prompts], batch_size):
            batch = to_device(collate([EncodedExample(prompts[i], []) for i in chunk], chunk, pad_id), device)
            batch_rows = batch["example_index"]
            lm(**model_inputs(batch), **({"logits_to_keep": 1} if restrict else {}))  # only the routing is read
    return gather_rows(indices, local, acq.routing_loss_share(lost, total))


def select(
    name: str,
    values: torch.Tensor | None,
    candidates: Sequence[int],
    labelled: Sequence[int],
    k: int,
    generator: torch.Generator,
) -> list[int]:
    """``k`` pool indices from ``candidates`` to label next, chosen by the acquisition function ``name``.

    ``values`` holds one row per pool example (scores ``[P]`` or embeddings
    ``[P, D]``; None when the function reads no values); only the candidates' rows
    (and, for functions that read them, the labelled ones') are read.
    """
    candidates = list(candidates)
    if k > len(candidates):
        raise InputError(f"cannot label {k} more examples: only {len(candidates)} unlabelled examples are left.")
    entry = check_acquisition(name)
    choice = Choice(
        len(candidates),
        values[candidates] if values is not None else None,
        values[list(labelled)] if values is not None and entry.reads_labelled else None,
        k,
        generator,
    )
    return [candidates[i] for i in entry.choose(choice)]
