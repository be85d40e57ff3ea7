"""Comparing a generated answer with its reference: pure functions on strings, and their table.

Every metric scores one (prediction, reference) pair in [0, 1]; a task's score is the mean
over its examples. Text is compared after :func:`normalize_text` (except by exact match):
lower case, punctuation removed, runs of white space made one space. Word tokens are the
white-space separated words of the normalised text.

- ``exact_match``: ``1[prediction.strip() == reference.strip()]``;
- ``normalized_match``: ``1[normalize(prediction) == normalize(reference)]``;
- ``token_f1``: the harmonic mean of word precision and recall, words counted with
  multiplicity (the SQuAD answer F1, without its article removal);
- ``rouge_l``: the F-measure of the longest common word subsequence (Lin, 2004), beta = 1.

An ``answer_pattern`` (a regular expression the data declares) is applied to the
prediction first (:func:`extract_answer`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


def normalize_text(text: str) -> str:
    """``text`` lower-cased, every punctuation character (Unicode category P*) removed, white space collapsed."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(kept.split())


def words(text: str) -> list[str]:
    """The word tokens of ``text``: the words of :func:`normalize_text`."""
    return normalize_text(text).split()


def extract_answer(text: str, pattern: str | None) -> str:
    """The answer inside a generation: the first match of ``pattern`` in ``text`` (its group named
    ``answer``, else its first group, else the whole match); ``""`` when nothing matches and ``text``
    itself when there is no pattern."""
    if pattern is None:
        return text
    match = re.search(pattern, text)
    if match is None:
        return ""
    if "answer" in match.re.groupindex:
        return match.group("answer") or ""
    return (match.group(1) if match.re.groups else match.group(0)) or ""


def exact_match(prediction: str, reference: str) -> float:
    """``1.0`` if the stripped strings are equal, else ``0.0``."""
    return float(prediction.strip() == reference.strip())


def normalized_match(prediction: str, reference: str) -> float:
    """``1.0`` if the normalised strings are equal (case, punctuation and spacing ignored), else ``0.0``."""
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """``F1 = 2 P R / (P + R)`` with ``P = c / |pred|``, ``R = c / |ref|``, ``c = sum_w min(n_pred(w), n_ref(w))``.

    1.0 when both have no words, 0.0 when only one has none.
    """
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(n m))."""
    previous = [0] * (len(second) + 1)
    for a in first:
        current = [0]
        for j, b in enumerate(second):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``2 P R / (P + R)`` with ``P = LCS / |pred|``, ``R = LCS / |ref|`` over word tokens.

    1.0 when both have no words, 0.0 when only one has none.
    """
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class AnswerMetric:
    """A generation metric: ``score(prediction, reference)`` in [0, 1]; ``binary`` ones score 0 or 1 only
    (their intervals are Wilson intervals, the others' a bootstrap of the mean)."""

    name: str
    help: str
    score: Callable[[str, str], float]
    binary: bool


# Adding a generation metric is one entry here (and its name in data.task_types.GENERATION_METRICS).
ANSWER_METRICS: dict[str, AnswerMetric] = {m.name: m for m in (
    AnswerMetric("exact_match", "the answer exactly (surrounding white space ignored)", exact_match, True),
    AnswerMetric("normalized_match", "the answer up to case, punctuation and spacing", normalized_match, True),
    AnswerMetric("token_f1", "F1 of the answer's words (SQuAD)", token_f1, False),
    AnswerMetric("rouge_l", "ROUGE-L: F-measure of the longest common word subsequence (summaries)", rouge_l, False),
)}
