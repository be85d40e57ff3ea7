"""One student trained on teacher-labelled data and evaluated every few steps: a training curve.

The student (a carve or a fresh model) trains with :func:`moeguard.training.train`
(AdamW, linear warm-up, then a constant learning rate, so that a curve does not
depend on where it is cut) on batches of the teacher-labelled data, drawn in an order
given by the seed; with ``loss="logits"`` the teacher's answer-token distribution is
matched as well, and with ``loss="hidden"`` also its every decoder layer's output
(:class:`moeguard.attack.teacher.Distillation`). Every
``evaluate_every`` steps its exact-match accuracy on the test set is measured, and
training stops at the first evaluation at or above the target (or at ``max_steps``, or
after the step whose training compute reaches ``max_flops``, evaluated there: a run
stopped so spent at least that much without reaching the target).

Compute per training token is ``6 N_student`` (training) plus ``2 N_teacher`` for
the teacher's label and, with logits, ``2 N_teacher`` more for its distribution,
``N`` the active parameters per token; the carve's own work enters as ``overhead``.
A curve saves its evaluations and training state in its run directory and resumes
from them, only with the settings it started with.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeguard.attack.headstart import RunCost, run_cost
from moeguard.attack.teacher import Distillation
from moeguard.data import TaskData, batches
from moeguard.data.batching import context_length
from moeguard.errors import InputError, TrainingDivergedError
from moeguard.eval import evaluate
from moeguard.models import MoEModel
from moeguard.realign.scopes import scope_parameters
from moeguard.runs import Run
from moeguard.training import train

log = logging.getLogger("moeguard.attack")

LOSSES = ("answers", "logits", "hidden")
CURVE_FILE = "curve.json"


@dataclass(frozen=True)
class CurveSchedule:
    """How a student is trained and measured (both arms of the head start share these)."""

    batch_size: int = 32
    warmup: int = 20
    evaluate_every: int = 25
    eval_batch_size: int = 200

    def check(self) -> None:
        for name in ("batch_size", "evaluate_every", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}.", arguments=(name,))
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"`warmup` must be 0 or more, got {self.warmup!r}.", arguments=("warmup",))


@dataclass
class CurvePoint:
    step: int
    tokens: int
    accuracy: float


@dataclass
class Curve:
    """A training curve: ``points[0]`` is the student before training; costs per :mod:`moeguard.attack.headstart`."""

    arm: str
    configuration: str
    seed: int
    target: float
    max_steps: int
    flops_per_token: float
    overhead_flops: float
    points: list[CurvePoint] = field(default_factory=list)
    seconds: float = 0.0
    diverged: bool = False  # the loss became non-finite: the curve ends at its last evaluation, not reached
    max_flops: float | None = None  # training FLOPs after which the run stops (None: only max_steps stops it)

    @property
    def final_accuracy(self) -> float:
        return self.points[-1].accuracy

    @property
    def stopped_by_compute(self) -> bool:
        """Whether the run ended at its compute cap without reaching the target."""
        return (self.max_flops is not None and not self.cost().reached
                and self.points[-1].tokens * self.flops_per_token >= self.max_flops)

    def cost(self, target: float | None = None) -> RunCost:
        """The cost to ``target`` (default: the target the run stopped at; a higher one it may not have reached)."""
        steps = [p.step for p in self.points]
        tokens = [p.tokens for p in self.points]
        return run_cost(steps, tokens, [t * self.flops_per_token for t in tokens], [p.accuracy for p in self.points],
                        self.target if target is None else target, overhead=self.overhead_flops)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost": self.cost().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Curve":
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["points"] = [CurvePoint(**p) for p in data["points"]]
        return cls(**values)


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise InputError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}.", arguments=("loss",))


def flops_per_token(student: MoEModel, teacher: MoEModel, loss: str) -> float:
    """``6 N_student + 2 N_teacher (1 + [loss != answers])`` (see the module docstring)."""
    teacher_passes = 1 if loss == "answers" else 2
    return 6.0 * student.parameter_counts().active_per_token + 2.0 * teacher_passes * teacher.parameter_counts().active_per_token


def _counted(stream: Iterator[dict[str, torch.Tensor]], cumulative: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of ``stream``, appending the running token count after each to ``cumulative``."""
    for batch in stream:
        cumulative.append(cumulative[-1] + int(batch["attention_mask"].sum()))
        yield batch


def steps_to_tokens(stream: Iterator[dict[str, torch.Tensor]], max_tokens: float, max_steps: int) -> int:
    """How many batches of ``stream`` it takes for their tokens to reach ``max_tokens`` (at most ``max_steps``)."""
    total = 0
    for step, batch in enumerate(itertools.islice(stream, max_steps), 1):
        total += int(batch["attention_mask"].sum())
        if total >= max_tokens:
            return step
    return max_steps


def train_curve(
    student: MoEModel,
    teacher: MoEModel,
    data: TaskData,
    test: TaskData,
    *,
    target: float,
    lr: float,
    loss: str,
    seed: int,
    max_steps: int,
    schedule: CurveSchedule = CurveSchedule(),
    scope: str = "all",
    arm: str = "carve",
    configuration: str = "",
    overhead_flops: float = 0.0,
    max_flops: float | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> Curve:
    """Train ``student`` in place on ``data`` until its accuracy on ``test`` reaches ``target`` (see the module docstring).

    ``max_flops`` caps the training compute (``overhead_flops`` not included): the run
    stops after the step that reaches it.

    ``out`` (a directory) keeps the run's state: a finished curve is returned as saved,
    an interrupted one resumes. ``teacher`` must not share weights with the student.
    """
    check_loss(loss)
    schedule.check()
    if not isinstance(max_steps, int) or max_steps < 1:
        raise InputError(f"`max_steps` must be a positive integer, got {max_steps!r}.", arguments=("max_steps",))
    if max_flops is not None and not max_flops > 0:
        raise InputError(f"`max_flops` must be positive, got {max_flops!r}.", arguments=("max_flops",))
    curve = Curve(arm, configuration, seed, target, max_steps, flops_per_token(student, teacher, loss), overhead_flops,
                  max_flops=max_flops)
    run = None
    if out is not None:
        # An uncapped run keeps the identity it had before compute caps existed (its saved runs stay valid).
        unsaved = ("points", "seconds") + (("max_flops",) if max_flops is None else ())
        identity = {"curve": {k: v for k, v in asdict(curve).items() if k not in unsaved},
                    "lr": lr, "loss": loss, "scope": scope, "schedule": asdict(schedule),
                    "student": student.fingerprint(), "teacher": teacher.fingerprint(),
                    "data": data.source, "examples": len(data), "test": test.source}
        run = Run.open(out, "training curve", identity)
        saved = run.load_json(CURVE_FILE)
        if saved is not None:
            return Curve.from_dict(saved)

    def accuracy(step: int) -> float:
        measure = lambda: evaluate(student, None, test, batch_size=schedule.eval_batch_size).value  # noqa: E731
        return run.get_or_compute(f"evaluations/{step:08d}.json", measure) if run is not None else measure()

    start = time.perf_counter()
    cumulative = [0]
    evaluated: dict[int, float] = {0: accuracy(0)}

    def on_evaluate(step: int) -> bool:
        evaluated[step] = accuracy(step)
        return evaluated[step] >= target

    steps_done = 0
    if evaluated[0] < target:
        def stream() -> Iterator[dict[str, torch.Tensor]]:
            return batches(student.tokenizer, data, batch_size=schedule.batch_size, shuffle=True, seed=seed, epochs=None,
                           context=context_length(student))

        # The compute cap is a step cap: the batches come in the seed's order, so their tokens can be counted first.
        steps = max_steps if max_flops is None else steps_to_tokens(stream(), max_flops / curve.flops_per_token, max_steps)
        try:
            result = train(
                student, _counted(stream(), cumulative), steps=steps, lr=lr, warmup=schedule.warmup, min_lr_ratio=1.0,
                parameters=list(scope_parameters(student, scope).values()),
                extra_loss=Distillation(teacher, hidden=loss == "hidden") if loss != "answers" else None, seed=seed,
                progress=progress, checkpoint=run.file("training") if run is not None else None,
                checkpoint_every=schedule.evaluate_every * 4, evaluate=on_evaluate, evaluate_every=schedule.evaluate_every,
            )
            steps_done = result.steps
        except TrainingDivergedError as error:
            # An attacker's configuration that diverges is a configuration that does not reach the target.
            log.info("%s %s seed %d diverged (%s): not reached", arm, configuration, seed, error)
            curve.diverged = True
            steps_done = max(step for step in evaluated if step <= len(cumulative) - 1)
        # A resumed run measured the steps before its checkpoint earlier: read them back.
        for step in [*range(schedule.evaluate_every, steps_done + 1, schedule.evaluate_every), steps_done]:
            if step not in evaluated and not curve.diverged:
                evaluated[step] = accuracy(step)
    curve.points = [CurvePoint(step, cumulative[step], evaluated[step]) for step in sorted(evaluated)
                    if step <= steps_done and step in evaluated]
    curve.seconds = time.perf_counter() - start
    cost = curve.cost()
    log.info("%s %s seed %d: %s (accuracy %.3f -> %.3f, target %.3f, %.0fs)", arm, configuration, seed,
             f"target at step {cost.steps:.0f}" if cost.reached else f"target not reached in {steps_done} steps"
             + (" (compute cap)" if curve.stopped_by_compute else ""),
             curve.points[0].accuracy, curve.final_accuracy, target, curve.seconds)
    if run is not None:
        run.save_json(CURVE_FILE, curve.to_dict())
    return curve
