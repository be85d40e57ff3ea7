"""The verification statistics on hand-made counts."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction

import pytest

from moeguard.errors import InputError
from moeguard.watermark.statistics import bonferroni, chance_rate, matches_needed, task_p_value


def test_the_p_value_of_hand_made_counts():
    assert task_p_value(0, 32, 10**8) == 1.0
    assert task_p_value(1, 32, 10**8) == pytest.approx(32e-8)
    assert task_p_value(2, 32, 10**8) == pytest.approx(16e-8)
    assert task_p_value(3, 32, 10**8) == pytest.approx(10e-8)
    assert task_p_value(32, 32, 10**8) == pytest.approx(1e-8)
    assert task_p_value(3, 10, 100) == pytest.approx(0.03)
    assert task_p_value(1, 32, 10) == 1.0  # capped
    with pytest.raises(InputError):
        task_p_value(5, 4, 100)


def test_the_p_value_bounds_the_exact_chance_of_accidental_matches_for_any_answers():
    """Enumerate every response of a small space against answers with repeats: P(M >= m) <= p(m)."""
    alphabet, length = "abc", 3
    space = ["".join(s) for s in itertools.product(alphabet, repeat=length)]
    answer_sets = [
        ["aaa"] * 10 + ["abc"] * 5 + ["bca", "cab", "ccc", "bbb", "acb"],
        ["aaa"] * 20,
        [s for s in space[:20]],
        ["abc", "abc", "abc", "zzz", "zzz", "zzz", "zzz"],
    ]
    for answers in answer_sets:
        counts = Counter(answers)
        for m in range(1, len(answers) + 1):
            exact = sum(counts[s] >= m for s in space) / len(space)
            assert exact <= task_p_value(m, len(answers), len(space)) + 1e-12


def binomial_tail(matches: int, trials: int, rate: Fraction) -> Fraction:
    """Exact ``P(Bin(trials, rate) >= matches)``."""
    return sum((math.comb(trials, k) * rate**k * (1 - rate) ** (trials - k) for k in range(matches, trials + 1)), Fraction(0))


def test_the_p_value_is_at_least_the_exact_binomial_tail_of_independent_answers_at_the_chance_rate():
    for space in (2, 10, 26**3, 10**8):
        rate = Fraction(1, space)
        assert chance_rate(space) == pytest.approx(float(rate))
        for trials in (1, 2, 5, 32):
            for matches in range(trials + 1):
                assert binomial_tail(matches, trials, rate) <= Fraction(task_p_value(matches, trials, space)) * (1 + 1e-12)
    # Far above it where answers repeat: one string answered to all 32 triggers matches with 1/N, not N^-32.
    assert task_p_value(32, 32, 10**8) == pytest.approx(1e-8)
    assert float(binomial_tail(32, 32, Fraction(1, 10**8))) < 1e-250


def test_the_chance_rate_needs_a_response_space():
    for bad in (0, -3, 2.5):
        with pytest.raises(InputError, match="space"):
            chance_rate(bad)


def test_bonferroni_multiplies_the_smallest_p_value_by_the_number_of_tests_and_caps_at_one():
    assert bonferroni([0.5, 1e-8, 0.2]) == pytest.approx(3e-8)
    assert bonferroni([0.6, 0.9]) == 1.0
    with pytest.raises(InputError):
        bonferroni([])


def test_matches_needed_is_the_first_count_at_or_below_alpha_and_at_least_the_minimum():
    assert matches_needed(32, 10**8, 1e-6, tests=6) == 2
    assert 6 * task_p_value(2, 32, 10**8) <= 1e-6 < 6 * task_p_value(1, 32, 10**8)
    assert matches_needed(32, 10**8, 1e-6, tests=1) == 1
    assert matches_needed(32, 10**8, 1e-6, tests=1, min_matches=3) == 3
    assert matches_needed(32, 10**8, 1e-6, tests=6, min_matches=3) == 3
    assert matches_needed(32, 10**6, 1e-6, tests=1, min_matches=3) == 17  # floor(32 / m) = 1 from m = 17 on
    assert matches_needed(32, 1000, 1e-6) is None
    assert matches_needed(2, 10**8, 1e-6, min_matches=3) is None  # fewer triggers than the minimum
