"""Task evaluation for any causal LM: exact match, multiple-choice accuracy, perplexity.

- generate data: batched greedy generation with the KV cache, prompts padded on the
  left (generation appends on the right; positions come from the attention mask),
  stopping when every row has produced eos. The prediction is the decoded text up
  to eos or the first newline, stripped; it is right when it equals the stripped answer.
- choice data: the choice with the highest summed log-likelihood after the prompt.
- lm data: token perplexity ``exp(total NLL / total tokens)``.

Inputs longer than the model's context are handled as :mod:`moeguard.data.batching`
says: lm texts are cut to it (with a warning), a prompt whose answer (or choice) would
not fit after it is refused with its file and line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeguard.data.batching import (
    EncodedExample,
    collate,
    context_length,
    cut_to_context,
    encode_continuations,
    encode_examples,
    encode_prompts,
    model_inputs,
    pad_id_of,
    pad_sequences,
    refuse_beyond_context,
    to_device,
    truncate,
)
from moeguard.data.examples import TaskData, require_examples
from moeguard.errors import InputError
from moeguard.eval.metrics import bootstrap_perplexity_interval, perplexity, target_log_likelihoods, wilson_interval
from moeguard.models import MoEModel

log = logging.getLogger("moeguard.eval")

METRICS = {"generate": "exact_match", "choice": "choice_accuracy", "lm": "perplexity"}
# Generation steps allowed beyond each answer's length: a hub tokenizer may split a
# generated answer into more tokens than the reference answer.
ANSWER_TOKEN_MARGIN = 3


@dataclass
class TaskResult:
    """The score of a model on one task.

    ``value`` is an accuracy in [0, 1] (exact_match, choice_accuracy) or a perplexity;
    ``ci_low``/``ci_high`` bound it at 95% (Wilson for accuracies, example bootstrap
    for perplexity). ``correct`` and ``predictions`` are per example, in data order
    (accuracies only).
    """

    task: str
    metric: str
    value: float
    n: int
    ci_low: float
    ci_high: float
    correct: list[bool] | None = None
    predictions: list[str] | None = None
    seconds: float = 0.0

    def to_dict(self, *, per_example: bool = False) -> dict[str, Any]:
        fields = {k: getattr(self, k) for k in ("task", "metric", "value", "n", "ci_low", "ci_high", "seconds")}
        if per_example:
            fields.update(correct=self.correct, predictions=self.predictions)
        return fields


def causal_lm(model: Any) -> nn.Module:
    """The transformers model inside an ``MoEModel``, or ``model`` itself."""
    return model.model if isinstance(model, MoEModel) else model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients; its previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def length_sorted_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to keep padding small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def prediction_text(tokenizer: Any, generated: Sequence[int]) -> str:
    """Decoded generated tokens up to eos, cut at the first newline, stripped."""
    eos = tokenizer.eos_token_id
    tokens = list(generated)
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0].strip()


def greedy_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations of left-padded ``prompts`` with the KV cache; stops when all rows hit eos."""
    from transformers import GenerationConfig

    pad_id = pad_id_of(tokenizer)
    input_ids, attention_mask = pad_sequences(prompts, pad_id, side="left")
    device = device_of(model)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    output = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
    )
    return output[:, input_ids.shape[1] :].tolist()


def exact_match(model: nn.Module, tokenizer: Any, data: TaskData, *, batch_size: int, max_new_tokens: int | None) -> TaskResult:
    examples = data.examples
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples])
    answers = encode_continuations(tokenizer, [e.answer for e in examples], eos=False)
    predictions: list[str] = [""] * len(examples)
    # Each example gets its own token budget, so a prediction never depends on its batch.
    budgets = [max_new_tokens or len(answer) + ANSWER_TOKEN_MARGIN for answer in answers]
    refuse_beyond_context(data, [len(p) + b for p, b in zip(prompts, budgets)], context_length(model),
                          what="its prompt with the tokens generated after it")
    for chunk in length_sorted_chunks([len(p) for p in prompts], batch_size):
        generated = greedy_generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max(budgets[i] for i in chunk))
        for i, tokens in zip(chunk, generated):
            predictions[i] = prediction_text(tokenizer, tokens[: budgets[i]])
    correct = [p == e.answer.strip() for p, e in zip(predictions, examples)]
    return accuracy_result(data.name, "exact_match", correct, predictions)


def accuracy_result(task: str, metric: str, correct: list[bool], predictions: list[str]) -> TaskResult:
    hits = sum(correct)
    low, high = wilson_interval(hits, len(correct))
    return TaskResult(task, metric, hits / len(correct), len(correct), low, high, correct, predictions)


def scored_sequences(
    model: nn.Module, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-likelihood of each target, its token count)``, each ``[len(encoded)]``."""
    device = device_of(model)
    log_likelihood = torch.zeros(len(encoded), dtype=torch.float64)
    counts = torch.zeros(len(encoded), dtype=torch.long)
    for chunk in length_sorted_chunks([len(e.prompt) + len(e.target) for e in encoded], batch_size):
        batch = to_device(collate([encoded[i] for i in chunk], chunk, pad_id), device)
        logits = model(**model_inputs(batch)).logits
        sums, n = target_log_likelihoods(logits, batch["labels"])
        log_likelihood[chunk] = sums.double().cpu()
        counts[chunk] = n.cpu()
    return log_likelihood, counts


def choice_accuracy(model: nn.Module, tokenizer: Any, data: TaskData, *, batch_size: int) -> TaskResult:
    examples = data.examples
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples])
    pairs = [(i, c) for i, e in enumerate(examples) for c in range(len(e.choices))]
    choices = encode_continuations(tokenizer, [examples[i].choices[c] for i, c in pairs], eos=False)
    encoded = [EncodedExample(prompts[i], target) for (i, _), target in zip(pairs, choices)]
    empty = [(i, examples[i].choices[c]) for (i, c), e in zip(pairs, encoded) if not e.target]
    if empty:
        raise InputError(f"{data.origin(empty[0][0])}: choice {empty[0][1]!r} encodes to no tokens; every choice must be non-empty.")
    needed = [len(prompt) for prompt in prompts]
    for (i, _), e in zip(pairs, encoded):
        needed[i] = max(needed[i], len(e.prompt) + len(e.target))
    refuse_beyond_context(data, needed, context_length(model), what="its prompt with its longest choice")
    scores, _ = scored_sequences(model, encoded, pad_id_of(tokenizer), batch_size)
    best: dict[int, tuple[float, int]] = {}
    for (i, c), score in zip(pairs, scores.tolist()):
        if i not in best or score > best[i][0]:
            best[i] = (score, c)
    picked = [best[i][1] for i in range(len(examples))]
    correct = [p == e.label for p, e in zip(picked, examples)]
    return accuracy_result(data.name, "choice_accuracy", correct, [e.choices[p] for p, e in zip(picked, examples)])


def text_perplexity(model: nn.Module, tokenizer: Any, data: TaskData, *, batch_size: int, max_length: int | None) -> TaskResult:
    encoded = [truncate(e, max_length) for e in encode_examples(tokenizer, data.examples)]
    encoded = cut_to_context(data, encoded, context_length(model))
    log_likelihood, counts = scored_sequences(model, encoded, pad_id_of(tokenizer), batch_size)
    if int(counts.sum()) == 0:
        raise InputError(f"task {data.name!r}: the texts have no token to predict (each needs at least two tokens).")
    low, high = bootstrap_perplexity_interval(-log_likelihood, counts)
    return TaskResult(data.name, "perplexity", perplexity(-log_likelihood, counts), len(encoded), low, high)


def evaluate(
    model: Any,
    tokenizer: Any,
    data: TaskData,
    *,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
) -> TaskResult:
    """Score ``model`` (an ``MoEModel`` or any transformers causal LM) on ``data``.

    The metric follows ``data.kind`` (see the module docstring). ``tokenizer=None``
    uses the tokenizer of an ``MoEModel``. ``max_new_tokens`` caps generation (default:
    the longest answer plus a small margin); ``max_length`` truncates lm texts.
    The model's train/eval mode is restored afterwards.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("evaluation needs a tokenizer; the model has none saved with it, pass one explicitly.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    require_examples(data)
    lm = causal_lm(model)
    start = time.perf_counter()
    with eval_mode(lm):
        if data.kind == "generate":
            result = exact_match(lm, tokenizer, data, batch_size=batch_size, max_new_tokens=max_new_tokens)
        elif data.kind == "choice":
            result = choice_accuracy(lm, tokenizer, data, batch_size=batch_size)
        else:
            result = text_perplexity(lm, tokenizer, data, batch_size=batch_size, max_length=max_length)
    result.seconds = time.perf_counter() - start
    log.debug("%s: %s %.4f (n=%d) in %.2fs", data.name, result.metric, result.value, result.n, result.seconds)
    return result


def evaluate_tasks(
    model: Any, tokenizer: Any, datas: Sequence[TaskData] | Mapping[str, TaskData], **kwargs: Any
) -> dict[str, TaskResult]:
    """:func:`evaluate` on each task; results keyed by task name, in the given order."""
    items = list(datas.values()) if isinstance(datas, Mapping) else list(datas)
    names = [data.name for data in items]
    if len(set(names)) != len(names):
        raise InputError(f"tasks to evaluate must have distinct names, got {names}.")
    return {data.name: evaluate(model, tokenizer, data, **kwargs) for data in items}
