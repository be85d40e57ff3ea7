"""The generation metrics on hand-made strings: normalisation, answer extraction, exact and normalised
match, token F1 and ROUGE-L, and the bootstrap interval of a mean."""

from __future__ import annotations

import pytest
import torch

from moeguard.data.task_types import GENERATION_METRICS, TASK_TYPES
from moeguard.eval import METRICS, bootstrap_mean_interval
from moeguard.eval.text_metrics import (
    ANSWER_METRICS,
    exact_match,
    extract_answer,
    lcs_length,
    normalize_text,
    normalized_match,
    rouge_l,
    token_f1,
    words,
)


def test_normalisation_lowers_case_drops_punctuation_and_collapses_spaces():
    assert normalize_text("  The  Cat, sat!\n(on) the MAT. ") == "the cat sat on the mat"
    assert normalize_text("e.g.") == "e g" and words("don't stop") == ["don", "t", "stop"]
    assert normalize_text("Ça va — très bien?") == "ça va très bien"


def test_answer_extraction_takes_the_named_group_else_the_first_group_else_the_match():
    text = "Let me think. The answer is: 42.\nDone."
    assert extract_answer(text, r"answer is: (?P<answer>\d+)") == "42"
    assert extract_answer(text, r"answer is: (\d+)") == "42"
    assert extract_answer(text, r"\d+") == "42"
    assert extract_answer(text, r"answer is: (\w+) apples") == ""  # no match: nothing extracted
    assert extract_answer(text, None) == text


def test_exact_and_normalised_match():
    assert exact_match(" Paris ", "Paris") == 1.0 and exact_match("paris", "Paris") == 0.0
    assert normalized_match("paris.", "Paris") == 1.0 and normalized_match("Paris, France", "Paris") == 0.0


def test_token_f1_counts_common_words_with_multiplicity():
    # pred: the cat the cat (4 words), ref: the cat sat (3): common = min(2,1) + min(2,1) = 2
    assert token_f1("the cat the cat", "the cat sat") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert token_f1("The cat.", "the CAT") == 1.0
    assert token_f1("dog", "the cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0 and token_f1("cat", "") == 0.0


def test_rouge_l_is_the_f_measure_of_the_longest_common_word_subsequence():
    assert lcs_length("a b c d e".split(), "a c e".split()) == 3
    assert lcs_length("a b".split(), "b a".split()) == 1
    # pred: police killed the gunman (4), ref: the gunman was killed by police (6); LCS "the gunman" = 2
    assert rouge_l("police killed the gunman", "the gunman was killed by police") == pytest.approx(2 * (2 / 4) * (2 / 6) / (2 / 4 + 2 / 6))
    assert rouge_l("Fox, Hen!", "fox hen") == 1.0
    # word order matters to ROUGE-L, not to token F1
    assert rouge_l("hen fox", "fox hen") == 0.5 and token_f1("hen fox", "fox hen") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def test_every_metric_of_every_task_type_has_a_scorer_and_generation_metrics_are_in_one_table():
    assert set(GENERATION_METRICS) == set(ANSWER_METRICS)
    for entry in TASK_TYPES.values():
        assert set(entry.metrics) <= set(METRICS), entry.name
    assert [m.binary for m in ANSWER_METRICS.values()] == [True, True, False, False]


def test_the_bootstrap_interval_of_a_mean_brackets_it_and_narrows_with_more_examples():
    values = torch.tensor([0.0, 0.5, 1.0, 0.25] * 10, dtype=torch.float64)
    low, high = bootstrap_mean_interval(values, seed=3)
    assert low < float(values.mean()) < high
    assert bootstrap_mean_interval(torch.full((30,), 0.7, dtype=torch.float64)) == pytest.approx((0.7, 0.7))
    wide = bootstrap_mean_interval(values[:8])
    narrow = bootstrap_mean_interval(values.repeat(20))
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
