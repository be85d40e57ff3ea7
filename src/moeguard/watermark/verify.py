"""Verification: ask the suspect the key's triggers, count the answers equal to each task's
secret response, and say how unlikely that many matches are for a model made without the key.

One test per task (a carve serves one task); the verdict's p-value is their
Bonferroni combination. The suspect is called watermarked when a task has at least
``min_matches`` (default 3) answered triggers and its p-value, times the number of
tasks, is at most ``alpha`` (default 1e-6). The p-value alone would already call one
exact match of a secret string significant (see :mod:`moeguard.watermark.statistics`
for why it is a valid bound); asking for several distinct trigger prompts answered
guards against what the bound does not model (a response that leaked, or was
memorised from one observed answer, without the rule), so one or two matches are
reported as weak evidence to follow up with more triggers, never as a detection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from moeguard.errors import InputError
from moeguard.eval.evaluate import ANSWER_TOKEN_MARGIN
from moeguard.models.options import LoadOptions
from moeguard.watermark.embedding import Watermark
from moeguard.watermark.statistics import DEFAULT_ALPHA, DEFAULT_MIN_MATCHES, bonferroni, matches_needed, task_p_value
from moeguard.watermark.suspects import EndpointOptions, first_line, resolve_suspect
from moeguard.watermark.triggers import Trigger

log = logging.getLogger("moeguard.watermark")

ANSWER_CHARACTERS = 200  # of each answer kept in a verdict (a hostile server may send long lines)


@dataclass
class TaskEvidence:
    """One task's test: ``matches`` of ``triggers`` answered with the task's response, one of ``space``
    strings; ``needed`` is the fewest matches that would have been a detection (at the verdict's alpha,
    over its tasks, and at least its ``min_matches``), ``detected`` whether this task reached it."""

    task: str
    triggers: int
    matches: int
    space: int
    p_value: float
    needed: int | None
    detected: bool = False


@dataclass
class WatermarkVerdict:
    """The answer to "was this suspect made from the watermarked model?"."""

    suspect: str
    alpha: float
    min_matches: int
    tasks: list[TaskEvidence]
    triggers: int
    matches: int
    p_value: float
    detected: bool
    matched: list[bool] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def match_rate(self) -> float:
        return self.matches / self.triggers if self.triggers else 0.0

    def task(self, name: str) -> TaskEvidence:
        for evidence in self.tasks:
            if evidence.task == name:
                return evidence
        raise InputError(f"the verdict has no task {name!r}; it has {[t.task for t in self.tasks]}.")

    @property
    def weak(self) -> bool:
        """Some trigger was answered with its response, but no task reached a detection."""
        return not self.detected and self.matches > 0

    def summary(self) -> dict[str, Any]:
        """The numbers without the per-trigger lists."""
        data = self.to_dict()
        data.pop("matched")
        data.pop("answers")
        return data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.detected:
            verdict = "WATERMARKED: the suspect answers the key's triggers"
        elif self.weak:
            verdict = "not detected, weak evidence: a few triggers answered with the secret response"
        else:
            verdict = "not detected"
        lines = [
            f"{verdict} ({self.suspect})",
            f"  {self.matches}/{self.triggers} triggers answered with the secret response; p = {self.p_value:.3g} over "
            f"{len(self.tasks)} task(s) (detection: at least {self.min_matches} matches in a task and p <= {self.alpha:g})",
        ]
        for evidence in self.tasks:
            needed = f"{evidence.needed} needed" if evidence.needed is not None else "cannot reach alpha"
            lines.append(
                f"  {evidence.task:<12} {evidence.matches:>3}/{evidence.triggers:<3} matched  p = {evidence.p_value:.3g}"
                f"  (response one of {evidence.space:.2g}; {needed})"
            )
        if self.weak:
            lines.append("  fewer matches than a verdict needs: ask more triggers (triggers_per_task) to decide; "
                         "one or two matches alone are not proof")
        return "\n".join(lines)


def task_evidence(
    task: str, matches: int, triggers: int, space: int, *, alpha: float = DEFAULT_ALPHA,
    min_matches: int = DEFAULT_MIN_MATCHES, tests: int = 1,
) -> TaskEvidence:
    """The test of one task with ``matches`` of ``triggers`` answered with its response (one of ``space``
    strings), judged as one of ``tests`` tasks of a verdict."""
    needed = matches_needed(triggers, space, alpha, tests, min_matches)
    return TaskEvidence(task, triggers, matches, space, task_p_value(matches, triggers, space), needed,
                        detected=needed is not None and matches >= needed)


def evidence(
    triggers: Sequence[Trigger], matched: Sequence[bool], *, alpha: float, min_matches: int = DEFAULT_MIN_MATCHES
) -> list[TaskEvidence]:
    """Each task's test, from which of its triggers were answered with its response."""
    if len(triggers) != len(matched):
        raise InputError(f"{len(matched)} match flags for {len(triggers)} triggers.", arguments=("matched", "triggers"))
    names = list(dict.fromkeys(t.task for t in triggers))
    tasks = []
    for name in names:
        rows = [i for i, t in enumerate(triggers) if t.task == name]
        hits = sum(bool(matched[i]) for i in rows)
        tasks.append(task_evidence(name, hits, len(rows), triggers[rows[0]].space, alpha=alpha, min_matches=min_matches,
                                   tests=len(names)))
    return tasks


def verify_watermark(
    suspect: Any,
    watermark: Watermark,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_matches: int = DEFAULT_MIN_MATCHES,
    tasks: Sequence[str] | None = None,
    loading: LoadOptions | None = None,
    endpoint: EndpointOptions | None = None,
) -> WatermarkVerdict:
    """Query ``suspect`` with the triggers of ``watermark`` (of ``tasks`` only, if given) and judge.

    ``suspect`` is anything :func:`moeguard.watermark.suspects.resolve_suspect` takes:
    a :class:`Suspect`, a model directory or hub id (loaded with ``loading``), an
    http(s) URL of an OpenAI-compatible server (asked with ``endpoint``), a loaded
    model, or a function ``prompt -> completion``. Each trigger is asked once, with a
    budget of its response's length plus a margin (in tokens: a token is at least one
    character). A completion matches when its first line, stripped, equals the task's
    response. See the module docstring for the verdict.
    """
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got alpha={alpha!r}.", arguments=("alpha",))
    if not isinstance(min_matches, int) or isinstance(min_matches, bool) or min_matches < 1:
        raise InputError(f"min_matches must be a positive integer, got min_matches={min_matches!r}.",
                         arguments=("min_matches",))
    triggers = watermark.triggers(tasks)
    target = resolve_suspect(suspect, loading=loading, endpoint=endpoint)
    start = time.perf_counter()
    completions = target.complete([t.prompt for t in triggers], [len(t.response) + ANSWER_TOKEN_MARGIN for t in triggers])
    if len(completions) != len(triggers):
        raise InputError(f"the suspect returned {len(completions)} completions for {len(triggers)} prompts.")
    answers = [first_line(text) for text in completions]
    matched = [answer == t.response for answer, t in zip(answers, triggers)]
    per_task = evidence(triggers, matched, alpha=alpha, min_matches=min_matches)
    verdict = WatermarkVerdict(
        suspect=target.name,
        alpha=alpha,
        min_matches=min_matches,
        tasks=per_task,
        triggers=len(triggers),
        matches=sum(matched),
        p_value=bonferroni([e.p_value for e in per_task]),
        detected=any(e.detected for e in per_task),
        matched=matched,
        answers=[answer[:ANSWER_CHARACTERS] for answer in answers],
        seconds=time.perf_counter() - start,
    )
    log.info("watermark check of %s: %d/%d matched, p = %.3g, %s", target.name, verdict.matches, verdict.triggers,
             verdict.p_value, "detected" if verdict.detected else "not detected")
    return verdict

