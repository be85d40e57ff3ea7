"""Does the watermark survive what a carver does? Attacks on a watermarked model, each measured along the way.

Every attack reports :class:`Checkpoint` s: the attacked model's task accuracy and
the watermark verdict on the task's triggers, at increasing attack strength (optimizer
steps). The attacker holds the full watermarked model, so its labels are the full
model's own greedy answers (:func:`teacher_labelled`). The attacks:

- :func:`carve_keep_sets`: a task's top experts by each attribution criterion (the
  carve itself is measured by masking the model to them);
- :func:`realign_attack`: prune + active-learning re-alignment (:func:`moeguard.realign.realign`
  in mask mode), verified after every round;
- :func:`finetune_attack`: a plain fine-tune of the full model or of a carve, for as
  long as asked, verified every ``every`` steps;
- :func:`distill_attack`: a fresh student with the carve's architecture and random
  weights, trained on the full model's answers to ordinary task inputs.

A stronger re-alignment attacker plugs in as a :data:`Realigner`: any function that
trains the masked model in place and calls ``report(steps)`` whenever it wants the
watermark measured (see :func:`active_learning_realigner`, the default).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moeguard.data import Example, TaskData, batches
from moeguard.eval import evaluate
from moeguard.models import MoEModel
from moeguard.realign import RealignConfig, RealignData, realign
from moeguard.training import train
from moeguard.watermark.embedding import Watermark
from moeguard.watermark.suspects import local_suspect
from moeguard.watermark.verify import verify_watermark

log = logging.getLogger("moeguard.watermark")

KeepSets = dict[int, list[int]]


@dataclass
class Checkpoint:
    """The attacked model after ``steps`` optimizer steps: mean task accuracy and the watermark verdict
    on the triggers of ``tasks``."""

    attack: str
    tasks: list[str]
    steps: int
    accuracy: float
    matches: int
    triggers: int
    p_value: float
    detected: bool
    settings: dict[str, Any] = field(default_factory=dict)
    task_matches: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(moe: Any, watermark: Watermark, tests: Sequence[TaskData], *, attack: str, steps: int,
            settings: dict[str, Any] | None = None) -> Checkpoint:
    """Mean accuracy on ``tests`` and the watermark verdict on their tasks' triggers, of ``moe`` as it is now
    (masks included)."""
    names = [test.name for test in tests]
    accuracy = sum(evaluate(moe, moe.tokenizer, test, batch_size=100).value for test in tests) / len(tests)
    verdict = verify_watermark(local_suspect(moe), watermark, tasks=names)
    point = Checkpoint(attack, names, steps, accuracy, verdict.matches, verdict.triggers, verdict.p_value, verdict.detected,
                       dict(settings or {}), {t.task: t.matches for t in verdict.tasks})
    log.info("%s on %s, %d steps: accuracy %.3f, watermark %d/%d (p = %.2g, %s)", attack, ",".join(names), steps, accuracy,
             point.matches, point.triggers, point.p_value, "detected" if point.detected else "not detected")
    return point


def teacher_labelled(moe: Any, data: TaskData, *, tokenizer: Any = None) -> TaskData:
    """``data``'s prompts answered by ``moe`` (greedy): the labels an attacker holding the model gets for free."""
    answers = evaluate(moe, tokenizer if tokenizer is not None else moe.tokenizer, data, batch_size=200).predictions
    examples = [Example(prompt=example.prompt, answer=answer) for example, answer in zip(data.examples, answers)]
    return TaskData(data.name, "generate", examples, f"answers of {getattr(moe, 'source', 'the model')} to {data.source}")


def carve_keep_sets(moe: MoEModel, data: TaskData, keep: int, criteria: Sequence[str]) -> dict[str, KeepSets]:
    """The top-``keep`` experts per layer of the task in ``data`` by each criterion, attributed on ``moe``."""
    from moeguard.attribution import collect_attribution, scores
    from moeguard.pruning.plans import make_plan

    attribution = collect_attribution(moe, batches(moe.tokenizer, data, batch_size=64), criteria=list(criteria),
                                      task=data.name, progress=False)
    return {c: make_plan(scores(attribution, c), moe.layers, keep=keep, criterion=c).keep_sets() for c in criteria}


# ---------------------------------------------------------------- re-alignment
Report = Callable[[int], None]
Realigner = Callable[[MoEModel, RealignData, KeepSets, Report], None]


def active_learning_realigner(config: RealignConfig) -> Realigner:
    """The re-alignment of :func:`moeguard.realign.realign` (mask mode) with ``config``, reporting after every round."""

    def run(moe: MoEModel, data: RealignData, keep: KeepSets, report: Report) -> None:
        realign(moe, data, config, keep=keep, on_round=lambda record: report(record.steps), progress=False)

    return run


def realign_attack(
    moe: MoEModel,
    watermark: Watermark,
    data: RealignData,
    keep: KeepSets,
    realigner: Realigner,
    *,
    settings: dict[str, Any] | None = None,
) -> list[Checkpoint]:
    """Carve ``moe`` to ``keep`` and re-align it on the full model's answers to the pool.

    The realigner trains ``moe`` restricted to ``keep``, calls ``report(steps)`` with
    the carve active whenever the watermark should be measured, and leaves the
    weights as it found them (mask mode does).
    """
    pool = teacher_labelled(moe, data.pool)
    points: list[Checkpoint] = []

    def report(steps: int) -> None:
        points.append(measure(moe, watermark, [data.test], attack="realign", steps=steps, settings=settings))

    realigner(moe, RealignData(pool, data.test, data.others), keep, report)
    return points


# ---------------------------------------------------------------- fine-tuning and distillation
def measured_run(
    points: list[Checkpoint], model: MoEModel, watermark: Watermark, tests: Sequence[TaskData], *, attack: str,
    every: int, steps: int, settings: dict[str, Any], train_run: Callable[..., Any],
) -> None:
    """Measure ``model`` into ``points`` before ``train_run(evaluate=..., evaluate_every=every)`` (a
    :func:`moeguard.training.train` call), every ``every`` steps during it and after its last step."""

    def evaluate(done: int) -> None:
        points.append(measure(model, watermark, tests, attack=attack, steps=done, settings=settings))

    evaluate(0)
    train_run(evaluate=evaluate, evaluate_every=every)
    if points[-1].steps != steps:
        evaluate(steps)


def finetune_attack(
    moe: MoEModel,
    watermark: Watermark,
    train_data: TaskData,
    tests: Sequence[TaskData],
    *,
    keep: KeepSets | None = None,
    steps: int = 4000,
    every: int = 500,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> list[Checkpoint]:
    """Fine-tune a copy of ``moe`` (restricted to ``keep``, if given) on ``train_data`` for ``steps`` steps,
    measuring the watermark of the ``tests``' tasks before, every ``every`` steps and at the end."""
    model = copy.deepcopy(moe)
    attack = "finetune" if keep is None else "carve+finetune"
    settings = {"lr": lr, "batch_size": batch_size, "seed": seed, "examples": len(train_data)}
    points: list[Checkpoint] = []
    stream = batches(model.tokenizer, train_data, batch_size=batch_size, shuffle=True, seed=seed, epochs=None)
    with model.mask_experts(keep) if keep else contextlib.nullcontext():
        measured_run(points, model, watermark, tests, attack=attack, every=every, steps=steps, settings=settings,
                     train_run=lambda **hook: train(model, stream, steps=steps, lr=lr, warmup=min(100, steps // 10),
                                                    seed=seed, progress=False, **hook))
    return points


def fresh_student(moe: MoEModel, keep: KeepSets, *, seed: int = 0) -> MoEModel:
    """A model with the architecture of ``moe`` pruned to ``keep`` (same layers, kept expert count, widths)
    and freshly initialised weights: nothing of the parent's weights."""
    from transformers import AutoModelForCausalLM

    carved = copy.deepcopy(moe)
    carved.prune(keep)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(carved.config)
    model.to(moe.device).eval()
    return MoEModel.from_model(model, moe.tokenizer, source=f"fresh student (seed {seed})")


def distill_attack(
    moe: MoEModel,
    watermark: Watermark,
    inputs: TaskData,
    test: TaskData,
    keep: KeepSets,
    *,
    steps: int = 3000,
    every: int = 500,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> list[Checkpoint]:
    """Train a :func:`fresh_student` on ``moe``'s answers to ``inputs`` (ordinary inputs of ``test``'s task),
    measuring the watermark every ``every`` steps and at the end."""
    labelled = teacher_labelled(moe, inputs)
    student = fresh_student(moe, keep, seed=seed)
    settings = {"lr": lr, "batch_size": batch_size, "inputs": len(inputs), "seed": seed, "experts": student.num_experts[0]}
    points: list[Checkpoint] = []
    stream = batches(student.tokenizer, labelled, batch_size=batch_size, shuffle=True, seed=seed, epochs=None)
    measured_run(points, student, watermark, [test], attack="distill", every=every, steps=steps, settings=settings,
                 train_run=lambda **hook: train(student, stream, steps=steps, lr=lr, warmup=min(100, steps // 10),
                                                weight_decay=0.01, seed=seed, progress=False, **hook))
    return points
