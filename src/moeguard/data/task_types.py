"""The three task types, one entry each: how their examples are read and validated, what they
are scored by, how retention is measured, what attribution reads and what re-alignment trains on.

Retention is the one number every stage compares against a target (90% by default): the
share of the full model's *gain over a no-knowledge reference* that a pruned (or re-aligned)
model keeps,

    retention = (score - reference) / (full - reference)

which is direction-free: for an accuracy-like score (higher is better) the reference is 0
and this is ``accuracy / full accuracy``, the paper's definition; for a language-modelling
loss (lower is better) the reference is the loss of the best model that ignores context
(the unigram entropy of the scored tokens, :func:`unigram_entropy`), so 90% means "keeps
90% of what the full model learned beyond token frequencies", and a model no better than
token frequencies retains 0. A per-token loss ratio ``L_full / L_pruned`` was not chosen:
it has no zero point (a model that knows only token frequencies still "retains" L_full /
L_unigram, e.g. 45%), so 90% would not mean what it means for accuracy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moeguard.data.examples import Example
from moeguard.errors import DataError

# ---------------------------------------------------------------- reading one JSON object
CONTRACT = (
    '{"prompt": str, "answer": str} (generate), {"prompt": str, "choices": [str, ...], "label": int} (choice) '
    'or {"text": str} (lm)'
)


def type_name(value: Any) -> str:
    """The JSON name of ``value``'s type, for error messages."""
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def read_field(obj: Mapping[str, Any], field: str, expected: type, where: str) -> Any:
    """``obj[field]``, refused unless present and of the ``expected`` type (``where`` starts the error)."""
    if field not in obj:
        raise DataError(f"{where}: missing field {field!r}; each line must be {CONTRACT}.")
    value = obj[field]
    if not isinstance(value, expected) or isinstance(value, bool) and expected is not bool:
        expected_name = {str: "a string", int: "an integer", list: "a list of strings"}[expected]
        raise DataError(f"{where}: field {field!r} must be {expected_name}, got {type_name(value)} {value!r:.60}.")
    return value


def read_generate(obj: Mapping[str, Any], where: str) -> Example:
    prompt, answer = read_field(obj, "prompt", str, where), read_field(obj, "answer", str, where)
    if not answer.strip():
        raise DataError(f"{where}: field 'answer' is empty; every example needs an answer to produce and score.")
    return Example(prompt=prompt, answer=answer)


def read_choice(obj: Mapping[str, Any], where: str) -> Example:
    prompt = read_field(obj, "prompt", str, where)
    choices = read_field(obj, "choices", list, where)
    if len(choices) < 2:
        raise DataError(f"{where}: field 'choices' is {'empty' if not choices else 'a single choice'}; give at least two choices.")
    for position, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise DataError(f"{where}: field 'choices' item {position} must be a string, got {type_name(choice)} {choice!r:.60}.")
    label = read_field(obj, "label", int, where)
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: field 'label' is {label}, but it must index 'choices' (0..{len(choices) - 1}).")
    return Example(prompt=prompt, choices=tuple(choices), label=label)


def read_lm(obj: Mapping[str, Any], where: str) -> Example:
    text = read_field(obj, "text", str, where)
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty; a language-modelling line needs text to score (drop the line).")
    return Example(text=text)


def kind_of_object(obj: Mapping[str, Any]) -> str:
    """The task type a contract object is written in, from its fields."""
    if "text" in obj:
        return "lm"
    if "choices" in obj or "label" in obj:
        return "choice"
    return "generate"


# ---------------------------------------------------------------- retention and references
def retention(value: float, full: float, reference: float = 0.0, *, higher_is_better: bool = True) -> float:
    """``(value - reference) / (full - reference)``: the share of the full model's gain over the
    no-knowledge ``reference`` that ``value`` keeps (see the module docstring).

    NaN when the full model is no better than the reference (nothing to keep).
    """
    gain = (full - reference) if higher_is_better else (reference - full)
    if not gain > 0:
        return math.nan
    return (value - reference) / (full - reference)


def unigram_entropy(token_ids: Iterable[int]) -> float:
    """``H = -sum_v p(v) log p(v)`` (nats) with ``p(v)`` the frequency of token ``v`` among ``token_ids``:
    the per-token loss of the best model that ignores context, on exactly these tokens.

    This is the language-modelling reference: a model that predicts every token from the
    empirical token frequencies of the scored text scores exactly this loss on it.
    """
    counts = Counter(token_ids)
    total = sum(counts.values())
    if total == 0:
        return math.nan
    return -sum(c / total * math.log(c / total) for c in counts.values())


def zero_reference(targets: Sequence[Sequence[int]]) -> float:
    """The no-knowledge score of an accuracy-like metric: 0 (nothing answered right)."""
    return 0.0


def unigram_reference(targets: Sequence[Sequence[int]]) -> float:
    """:func:`unigram_entropy` of every scored token (each text's tokens after its first)."""
    return unigram_entropy(token for target in targets for token in target[1:])


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class TaskType:
    """One task type (see the module docstring for retention).

    ``read(obj, where)`` validates one JSON object of ``contract`` into an :class:`Example`;
    ``metrics`` are the metrics it can be scored by (the first is the default, the
    metric functions are :data:`moeguard.eval.METRICS`); ``reference(targets)`` is the
    no-knowledge score retention is measured from, computed from the token ids of the
    scored targets; ``attribution_reads`` is what a batch's ``answer_mask`` marks (the
    tokens ``tokens="answer"`` attributes); ``trains_on`` what re-alignment (and any
    fine-tune) computes the loss on; ``needs_answers`` whether the attacker's pool must be
    answered (labelled) before it can be trained on.
    """

    name: str
    help: str
    contract: str
    read: Callable[[Mapping[str, Any], str], Example]
    metrics: tuple[str, ...]
    higher_is_better: bool
    reference: Callable[[Sequence[Sequence[int]]], float]
    retention_help: str
    attribution_reads: str
    trains_on: str
    needs_answers: bool

    @property
    def default_metric(self) -> str:
        return self.metrics[0]


GENERATION_METRICS = ("exact_match", "normalized_match", "token_f1", "rouge_l")

# Adding a task type is one entry here (plus its Example fields and its scorer in moeguard.eval).
TASK_TYPES: dict[str, TaskType] = {t.name: t for t in (
    TaskType(
        "generate", "free-form generation (question answering, summarisation): greedy answer vs reference",
        '{"prompt": str, "answer": str}', read_generate, GENERATION_METRICS, True, zero_reference,
        "score / full score (the metric's no-knowledge score is 0)",
        "the reference answer's tokens (and the closing eos)", "the reference answer after the prompt, + eos", True,
    ),
    TaskType(
        "choice", "classification / multiple choice: the choice with the highest log-likelihood",
        '{"prompt": str, "choices": [str, ...], "label": int}', read_choice, ("choice_accuracy",), True, zero_reference,
        "accuracy / full accuracy (as the paper; note that guessing among k choices scores 1/k)",
        "the correct choice's tokens (and the closing eos)", "the correct choice after the prompt, + eos", True,
    ),
    TaskType(
        "lm", "language modelling: mean next-token loss of the text (nats per token; perplexity = exp)",
        '{"text": str}', read_lm, ("loss",), False, unigram_reference,
        "(L_unigram - L) / (L_unigram - L_full): the share of the full model's loss improvement over the unigram "
        "entropy of the scored tokens",
        "every token of the text", "every token of the text (the text is its own label: no answers needed)", False,
    ),
)}


def task_type(kind: str) -> TaskType:
    """The task type named ``kind`` (refused when unknown)."""
    if kind not in TASK_TYPES:
        raise DataError(f"unknown task type {kind!r}; task types: {', '.join(TASK_TYPES)}.")
    return TASK_TYPES[kind]


def check_metric(kind: str, metric: str | None, where: str) -> str:
    """The metric a task of ``kind`` is scored by: ``metric`` if given (checked), else the type's default."""
    entry = task_type(kind)
    if metric is None:
        return entry.default_metric
    if metric not in entry.metrics:
        raise DataError(f"{where}: metric {metric!r} does not score {kind} examples; choose one of "
                        f"{', '.join(entry.metrics)}.")
    return metric
