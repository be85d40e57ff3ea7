"""Verification: ask the suspect the key's triggers, count the answers equal to each task's
secret response, and say how unlikely that many matches are for a model made without the key.

One test per task (a carve serves one task); the verdict's p-value is their
Bonferroni combination, and the suspect is called watermarked when it is at most
``alpha`` (default 1e-6). See :mod:`moeguard.watermark.statistics` for why the
p-values are conservative.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from moeguard.errors import InputError
from moeguard.eval.evaluate import ANSWER_TOKEN_MARGIN
from moeguard.watermark.embedding import Watermark
from moeguard.watermark.statistics import bonferroni, matches_needed, task_p_value
from moeguard.watermark.suspects import first_line, resolve_suspect
from moeguard.watermark.triggers import Trigger

log = logging.getLogger("moeguard.watermark")

DEFAULT_ALPHA = 1e-6


@dataclass
class TaskEvidence:
    """One task's test: ``matches`` of ``triggers`` answered with the task's response, one of ``space``
    strings; ``needed`` is the fewest matches that would have been a detection at the verdict's alpha."""

    task: str
    triggers: int
    matches: int
    space: int
    p_value: float
    needed: int | None


@dataclass
class WatermarkVerdict:
    """The answer to "was this suspect made from the watermarked model?"."""

    suspect: str
    alpha: float
    tasks: list[TaskEvidence]
    triggers: int
    matches: int
    p_value: float
    detected: bool
    matched: list[bool] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def match_rate(self) -> float:
        return self.matches / self.triggers if self.triggers else 0.0

    def task(self, name: str) -> TaskEvidence:
        for evidence in self.tasks:
            if evidence.task == name:
                return evidence
        raise InputError(f"the verdict has no task {name!r}; it has {[t.task for t in self.tasks]}.")

    def summary(self) -> dict[str, Any]:
        """The numbers without the per-trigger list."""
        data = self.to_dict()
        data.pop("matched")
        return data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        verdict = "WATERMARKED: the suspect answers the key's triggers" if self.detected else "not detected"
        lines = [
            f"{verdict} ({self.suspect})",
            f"  {self.matches}/{self.triggers} triggers answered with the secret response; p = {self.p_value:.3g} over "
            f"{len(self.tasks)} task(s) (alpha {self.alpha:g})",
        ]
        for evidence in self.tasks:
            needed = f"{evidence.needed} needed" if evidence.needed is not None else "cannot reach alpha"
            lines.append(
                f"  {evidence.task:<12} {evidence.matches:>3}/{evidence.triggers:<3} matched  p = {evidence.p_value:.3g}"
                f"  (response one of {evidence.space:.2g}; {needed})"
            )
        return "\n".join(lines)


def evidence(triggers: Sequence[Trigger], matched: Sequence[bool], *, alpha: float) -> list[TaskEvidence]:
    """Each task's test, from which of its triggers were answered with its response."""
    if len(triggers) != len(matched):
        raise InputError(f"{len(matched)} match flags for {len(triggers)} triggers.")
    names = list(dict.fromkeys(t.task for t in triggers))
    tasks = []
    for name in names:
        rows = [i for i, t in enumerate(triggers) if t.task == name]
        hits, space = sum(bool(matched[i]) for i in rows), triggers[rows[0]].space
        tasks.append(TaskEvidence(name, len(rows), hits, space, task_p_value(hits, len(rows), space),
                                  matches_needed(len(rows), space, alpha, len(names))))
    return tasks


def verify_watermark(
    suspect: Any,
    watermark: Watermark,
    *,
    alpha: float = DEFAULT_ALPHA,
    tasks: Sequence[str] | None = None,
    **suspect_options: Any,
) -> WatermarkVerdict:
    """Query ``suspect`` with the triggers of ``watermark`` (of ``tasks`` only, if given) and judge.

    ``suspect`` is anything :func:`moeguard.watermark.suspects.resolve_suspect` takes:
    a :class:`Suspect`, a model directory or hub id, an http(s) URL of an
    OpenAI-compatible server, a loaded model, or a function ``prompt -> completion``.
    Each trigger is asked once, with a budget of its response's length plus a margin
    (in tokens: a token is at least one character). A completion matches when its
    first line, stripped, equals the task's response.
    """
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}.")
    target = resolve_suspect(suspect, **suspect_options)
    triggers = watermark.triggers(tasks)
    start = time.perf_counter()
    completions = target.complete([t.prompt for t in triggers], [len(t.response) + ANSWER_TOKEN_MARGIN for t in triggers])
    if len(completions) != len(triggers):
        raise InputError(f"the suspect returned {len(completions)} completions for {len(triggers)} prompts.")
    matched = [first_line(text) == t.response for text, t in zip(completions, triggers)]
    per_task = evidence(triggers, matched, alpha=alpha)
    p_value = bonferroni([e.p_value for e in per_task])
    verdict = WatermarkVerdict(
        suspect=target.name,
        alpha=alpha,
        tasks=per_task,
        triggers=len(triggers),
        matches=sum(matched),
        p_value=p_value,
        detected=p_value <= alpha,
        matched=matched,
        seconds=time.perf_counter() - start,
    )
    log.info("watermark check of %s: %d/%d matched, p = %.3g", target.name, verdict.matches, verdict.triggers, p_value)
    return verdict

