"""The verification statistics on hand-made counts."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from moeguard.errors import InputError
from moeguard.watermark.statistics import bonferroni, matches_needed, task_p_value


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


def test_bonferroni_multiplies_the_smallest_p_value_by_the_number_of_tests_and_caps_at_one():
    assert bonferroni([0.5, 1e-8, 0.2]) == pytest.approx(3e-8)
    assert bonferroni([0.6, 0.9]) == 1.0
    with pytest.raises(InputError):
        bonferroni([])


def test_matches_needed_is_the_first_count_at_or_below_alpha():
    assert matches_needed(32, 10**8, 1e-6, tests=6) == 2
    assert 6 * task_p_value(2, 32, 10**8) <= 1e-6 < 6 * task_p_value(1, 32, 10**8)
    assert matches_needed(32, 10**8, 1e-6, tests=1) == 1
    assert matches_needed(32, 1000, 1e-6) is None
