"""The chance of matching the watermark by accident, and how many matches make a verdict.

Null hypothesis: the suspect was made without the key. A task's response ``s`` is
drawn uniformly from ``N`` strings (its response space) by a keyed stream of its own,
independent of the trigger prompts and of everything the suspect knows. So each
trigger's answer equals ``s`` with probability exactly

    q = 1 / N                                            (:func:`chance_rate`)

whatever the suspect answers. The answers to one task's ``n`` triggers are not
independent, though: all triggers share the one response, and a model that gives the
same answer to many of them matches all of those or none. The binomial tail
``P(Bin(n, q) >= m)``, which assumes independent answers, would then be far too small
(``q^n`` for ``m = n``, where a model answering one string to every trigger has
``P(M = n) = 1 / N``). The p-value used here holds under any dependence: whatever the
answers ``o_1..o_n``, at most ``floor(n / m)`` distinct strings occur ``m`` or more
times among them, and ``m`` matches need ``s`` to be one of those, so

    P(M >= m) <= floor(n / m) / N                        (m >= 1; 1 for m = 0)

It is at least the binomial tail for every ``m`` (``n q`` bounds the tail at ``m = 1``
and ``C(n, m) q^m`` beyond), so it is conservative under both models. Tasks have
independent responses; the verdict over ``T`` tasks is the Bonferroni combination
``min(1, T * min_t p_t)``, valid under any dependence between the tasks' answers.

A small p-value alone is not a verdict: one exact match of a secret string of
``N >= 1e8`` is already ``p = 32 / 3.1e8 = 1.0e-7`` for 32 triggers over 26 letters,
and a single match is fragile evidence (a response that leaked, or was memorised from
one observed answer, without the rule). :func:`matches_needed` therefore also asks for
``min_matches`` distinct triggers answered (see :mod:`moeguard.watermark.verify`).
"""

from __future__ import annotations

from collections.abc import Sequence

from moeguard.errors import InputError

DEFAULT_ALPHA = 1e-6  # the verdict's threshold on the combined p-value
DEFAULT_MIN_MATCHES = 3  # and the fewest triggers of one task answered with its response


def chance_rate(space: int) -> float:
    """``q = 1 / N``: the chance that one answer of a model made without the key equals a response drawn
    uniformly from ``N`` strings."""
    if not isinstance(space, int) or space < 1:
        raise InputError(f"a response space holds at least 1 string, got space={space!r}.", arguments=("space",))
    return 1.0 / space


def task_p_value(matches: int, trials: int, space: int) -> float:
    """``min(1, floor(n / m) / N)`` (1 for ``m = 0``): a bound on ``P(M >= m)`` for ``m`` of ``n`` answers
    equal to a response drawn uniformly from ``N`` strings, under any dependence between the answers."""
    if space < 1 or trials < 0 or not 0 <= matches <= trials:
        raise InputError(f"need 0 <= matches <= trials and a response space of at least 1 string, got "
                         f"matches={matches}, trials={trials}, space={space}.", arguments=("matches", "trials", "space"))
    if matches == 0:
        return 1.0
    return min(1.0, (trials // matches) / space)


def bonferroni(p_values: Sequence[float]) -> float:
    """``min(1, T * min_t p_t)``: the family-wise p-value of ``T`` tests."""
    if not p_values:
        raise InputError("no test to combine: give at least one value in `p_values`.", arguments=("p_values",))
    return min(1.0, len(p_values) * min(p_values))


def matches_needed(trials: int, space: int, alpha: float, tests: int = 1, min_matches: int = 1) -> int | None:
    """The fewest matches, at least ``min_matches``, whose p-value times ``tests`` is at most ``alpha``
    (None if even ``trials`` matches are not)."""
    for matches in range(max(1, min_matches), trials + 1):
        if tests * task_p_value(matches, trials, space) <= alpha:
            return matches
    return None
