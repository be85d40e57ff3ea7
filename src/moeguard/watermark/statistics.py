"""The verification statistics: how likely are the matches by accident?

Null hypothesis: the suspect was made without the key. A task's response ``s`` is
drawn uniformly from ``N`` strings by a keyed stream of its own, independent of the
trigger prompts and of everything the suspect knows. Whatever the suspect answers to
the task's ``n`` trigger prompts (answers ``o_1..o_n``, any function of the
prompts), at most ``floor(n / m)`` distinct strings occur ``m`` or more times among
them, and ``m`` matches need ``s`` to be one of those strings, so

    P(M >= m) <= floor(n / m) / N      (m >= 1; 1 for m = 0)

is a valid, conservative p-value for ``m`` matches, however the answers depend on
each other. Tasks have independent responses; the verdict over ``T`` tasks is the
Bonferroni combination ``min(1, T * min_t p_t)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeguard.errors import InputError


def task_p_value(matches: int, trials: int, space: int) -> float:
    """``min(1, floor(n / m) / N)`` for ``m`` of ``n`` answers equal to a response drawn from ``N`` strings."""
    if space < 1 or trials < 0 or not 0 <= matches <= trials:
        raise InputError(f"need 0 <= matches <= trials and a response space of at least 1 string, got "
                         f"matches={matches}, trials={trials}, space={space}.")
    if matches == 0:
        return 1.0
    return min(1.0, (trials // matches) / space)


def bonferroni(p_values: Sequence[float]) -> float:
    """``min(1, T * min_t p_t)``: the family-wise p-value of ``T`` tests."""
    if not p_values:
        raise InputError("no test to combine: give at least one p-value.")
    return min(1.0, len(p_values) * min(p_values))


def matches_needed(trials: int, space: int, alpha: float, tests: int = 1) -> int | None:
    """The fewest matches whose p-value, times ``tests``, is at most ``alpha`` (None if even all do not)."""
    for matches in range(1, trials + 1):
        if tests * task_p_value(matches, trials, space) <= alpha:
            return matches
    return None
