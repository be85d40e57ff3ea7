"""Task evaluation for any causal LM, one scorer per task type (:data:`moeguard.data.task_types.TASK_TYPES`).

- generate data: batched greedy generation with the KV cache, prompts padded on the
  left (generation appends on the right; positions come from the attention mask),
  stopping when every row has produced eos. The prediction is the decoded text up
  to eos or the first newline, stripped (with an ``answer_pattern``: the pattern's match
  in the whole decoded text); it is scored against the answer by the task's metric
  (exact_match by default, normalized_match, token_f1 or rouge_l:
  :mod:`moeguard.eval.text_metrics`) and the task's score is the mean.
- choice data: the choice with the highest summed log-likelihood after the prompt.
- lm data: the mean next-token loss ``total NLL / total tokens`` (nats; the perplexity
  is its exp), with the unigram entropy of the scored tokens as its reference.

Prompts are written as the model's :class:`~moeguard.models.PromptFormat` says (the chat
template when the tokenizer has one, unless turned off). Inputs longer than the model's
context are handled as :mod:`moeguard.data.batching` says: lm texts are cut to it (with
a warning), a prompt whose answer (or choice) would not fit after it is refused with its
file and line.
"""

from __future__ import annotations

import logging
import math
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
from moeguard.data.examples import MIXED, TaskData, require_examples
from moeguard.data.task_types import TASK_TYPES, check_metric, task_type
from moeguard.errors import InputError
from moeguard.eval.metrics import bootstrap_mean_interval, bootstrap_ratio_interval, target_log_likelihoods, wilson_interval
from moeguard.eval.text_metrics import ANSWER_METRICS, extract_answer
from moeguard.models import MoEModel, PromptFormat

log = logging.getLogger("moeguard.eval")

# Every metric a task type can be scored by (data.task_types.TASK_TYPES[...].metrics), with its help.
METRICS: dict[str, str] = {
    **{name: metric.help for name, metric in ANSWER_METRICS.items()},
    "choice_accuracy": "the share of examples whose most likely choice is the labelled one",
    "loss": "mean next-token loss of the text (nats per token; perplexity = exp(loss))",
}
# Generation steps allowed beyond each answer's length: a hub tokenizer may split a
# generated answer into more tokens than the reference answer.
ANSWER_TOKEN_MARGIN = 3
# With an answer pattern the answer is found inside a longer generation (an instruct model's sentence).
EXTRACTION_TOKEN_MARGIN = 48


@dataclass
class TaskResult:
    """The score of a model on one task, in its metric.

    ``value`` is the task's score: a mean in [0, 1] (exact_match, normalized_match,
    token_f1, rouge_l, choice_accuracy; higher is better) or a mean token loss (``loss``,
    nats; lower is better; ``perplexity`` is its exp). ``ci_low``/``ci_high`` bound it
    at 95% (Wilson for 0/1 scores, an example bootstrap otherwise). ``reference`` is the
    no-knowledge score retention is measured from (0, or the unigram entropy of an lm
    task's scored tokens; see :mod:`moeguard.data.task_types`). Per example, in data
    order: ``scores`` (an lm text's summed token loss, with its token count in
    ``weights``: ``value = sum(scores) / sum(weights)``), ``correct`` (0/1 metrics) and
    ``predictions`` (generated answers, picked choices).
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
    kind: str = "generate"
    scores: list[float] | None = None
    weights: list[int] | None = None
    reference: float = 0.0
    higher_is_better: bool = True

    @property
    def perplexity(self) -> float | None:
        """``exp(loss)`` for a language-modelling task, else None."""
        return math.exp(self.value) if self.metric == "loss" else None

    def to_dict(self, *, per_example: bool = False) -> dict[str, Any]:
        fields = {k: getattr(self, k) for k in ("task", "kind", "metric", "value", "n", "ci_low", "ci_high", "reference",
                                                 "higher_is_better", "seconds")}
        if self.perplexity is not None:
            fields["perplexity"] = self.perplexity
        if per_example:
            fields.update(scores=self.scores, weights=self.weights, correct=self.correct, predictions=self.predictions)
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


def prediction_text(tokenizer: Any, generated: Sequence[int], answer_pattern: str | None = None) -> str:
    """Decoded generated tokens up to eos, stripped: cut at the first newline, or (with ``answer_pattern``)
    the pattern's match anywhere in them (:func:`moeguard.eval.text_metrics.extract_answer`)."""
    eos = tokenizer.eos_token_id
    tokens = list(generated)
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if answer_pattern is not None:
        return extract_answer(text, answer_pattern).strip()
    return text.split("\n", 1)[0].strip()


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


def generated_answers(
    model: nn.Module, tokenizer: Any, data: TaskData, *, batch_size: int, max_new_tokens: int | None,
    prompt_format: PromptFormat,
) -> TaskResult:
    """Greedy answers scored by the task's metric (see the module docstring)."""
    examples = data.examples
    metric = ANSWER_METRICS[check_metric(data.kind, data.metric, f"task {data.name!r}")]
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples], prompt_format)
    answers = encode_continuations(tokenizer, [e.answer for e in examples], eos=False)
    predictions: list[str] = [""] * len(examples)
    margin = ANSWER_TOKEN_MARGIN if data.answer_pattern is None else EXTRACTION_TOKEN_MARGIN
    # Each example gets its own token budget, so a prediction never depends on its batch.
    budgets = [max_new_tokens or len(answer) + margin for answer in answers]
    refuse_beyond_context(data, [len(p) + b for p, b in zip(prompts, budgets)], context_length(model),
                          what="its prompt with the tokens generated after it")
    for chunk in length_sorted_chunks([len(p) for p in prompts], batch_size):
        generated = greedy_generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max(budgets[i] for i in chunk))
        for i, tokens in zip(chunk, generated):
            predictions[i] = prediction_text(tokenizer, tokens[: budgets[i]], data.answer_pattern)
    scores = [metric.score(p, e.answer) for p, e in zip(predictions, examples)]
    if metric.binary:
        return accuracy_result(data.name, metric.name, [s == 1.0 for s in scores], predictions)
    low, high = bootstrap_mean_interval(torch.tensor(scores, dtype=torch.float64))
    return TaskResult(data.name, metric.name, sum(scores) / len(scores), len(scores), low, high, None, predictions,
                      scores=scores)


def accuracy_result(task: str, metric: str, correct: list[bool], predictions: list[str]) -> TaskResult:
    hits = sum(correct)
    low, high = wilson_interval(hits, len(correct))
    return TaskResult(task, metric, hits / len(correct), len(correct), low, high, correct, predictions,
                      scores=[float(c) for c in correct])


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


def choice_accuracy(model: nn.Module, tokenizer: Any, data: TaskData, *, batch_size: int,
                    prompt_format: PromptFormat) -> TaskResult:
    """The share of examples whose highest-likelihood choice is the labelled one."""
    examples = data.examples
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples], prompt_format)
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


def encoded_texts(tokenizer: Any, data: TaskData, max_length: int | None, context: int | None = None) -> list[EncodedExample]:
    """An lm task's texts as scored: encoded, cut to ``max_length`` tokens and to the model's ``context``."""
    return cut_to_context(data, [truncate(e, max_length) for e in encode_examples(tokenizer, data.examples)], context)


def reference_score(tokenizer: Any, data: TaskData, *, max_length: int | None = None, context: int | None = None) -> float:
    """The no-knowledge score of ``data`` that retention is measured from (its task type's ``reference``):
    0 for accuracy-like metrics, the unigram entropy of the scored tokens for lm texts."""
    targets = [e.target for e in encoded_texts(tokenizer, data, max_length, context)] if data.kind == "lm" else []
    return task_type(data.kind).reference(targets)


def scoring(tokenizer: Any, data: TaskData, *, max_length: int | None = None, context: int | None = None) -> dict[str, Any]:
    """How ``data`` is scored, before any model is run: its ``kind``, ``metric``, ``reference`` score
    (:func:`reference_score`; ``context`` is the model's) and whether ``higher_is_better`` (what retention needs)."""
    entry = task_type(data.kind)
    return {"kind": data.kind, "metric": check_metric(data.kind, data.metric, f"task {data.name!r}"),
            "reference": reference_score(tokenizer, data, max_length=max_length, context=context),
            "higher_is_better": entry.higher_is_better}


def text_loss(model: nn.Module, tokenizer: Any, data: TaskData, *, batch_size: int, max_length: int | None) -> TaskResult:
    """The mean next-token loss of the texts (nats), with its bootstrap interval and unigram reference."""
    encoded = encoded_texts(tokenizer, data, max_length, context_length(model))
    log_likelihood, counts = scored_sequences(model, encoded, pad_id_of(tokenizer), batch_size)
    if int(counts.sum()) == 0:
        raise InputError(f"task {data.name!r}: the texts have no token to predict (each needs at least two tokens).")
    nll = -log_likelihood
    low, high = bootstrap_ratio_interval(nll, counts)
    return TaskResult(data.name, "loss", float(nll.sum() / counts.sum()), len(encoded), low, high, scores=nll.tolist(),
                      weights=counts.tolist(), reference=task_type("lm").reference([e.target for e in encoded]))


def evaluate(
    model: Any,
    tokenizer: Any,
    data: TaskData,
    *,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    prompt_format: PromptFormat | None = None,
) -> TaskResult:
    """Score ``model`` (an ``MoEModel`` or any transformers causal LM) on ``data``.

    The metric follows ``data.kind`` and ``data.metric`` (see the module docstring).
    ``tokenizer=None`` uses the tokenizer of an ``MoEModel``; ``prompt_format`` defaults
    to the ``MoEModel``'s (else the chat template when the tokenizer has one).
    ``max_new_tokens`` caps generation (default: each answer's length plus a small
    margin); ``max_length`` truncates lm texts. The model's train/eval mode is restored
    afterwards.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("evaluation needs a tokenizer; the model has none saved with it, pass one explicitly.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    require_examples(data)
    if data.kind == MIXED:
        raise InputError(f"task {data.name!r} mixes examples of several kinds; evaluate each task on its own.")
    prompt_format = prompt_format or getattr(model, "prompt_format", None) or PromptFormat()
    lm = causal_lm(model)
    start = time.perf_counter()
    with eval_mode(lm):
        if data.kind == "generate":
            result = generated_answers(lm, tokenizer, data, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       prompt_format=prompt_format)
        elif data.kind == "choice":
            result = choice_accuracy(lm, tokenizer, data, batch_size=batch_size, prompt_format=prompt_format)
        else:
            result = text_loss(lm, tokenizer, data, batch_size=batch_size, max_length=max_length)
    result.kind, result.higher_is_better = data.kind, TASK_TYPES[data.kind].higher_is_better
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
