"""Hardening: fine-tune an MoE with the defense objective, through the one training loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeguard.data import TaskData, batches, data_signature, mixture
from moeguard.data.batching import context_length
from moeguard.defense.objective import DefenseConfig, DefenseObjective
from moeguard.defense.parameter_groups import check_group_names
from moeguard.errors import InputError
from moeguard.fields import setting
from moeguard.models import MoEModel
from moeguard.training import train
from moeguard.watermark.embedding import Watermark, WatermarkEmbedding

log = logging.getLogger("moeguard.defense")


@dataclass
class HardenSettings:
    """The fine-tuning budget of a hardening run."""

    steps: int = setting(600, "fine-tuning steps")
    lr: float = setting(1e-3, "peak learning rate")
    batch_size: int = setting(32, "training batch size")
    max_length: int | None = setting(None, "truncate examples to this many tokens")
    warmup: int = setting(10, "linear warm-up steps")
    seed: int = setting(0, "seed of the data order and the defense's sampled subsets")


@dataclass
class HardenResult:
    """What a hardening run did: its settings, the loss, each term's mean value, the cost."""

    tasks: list[str]
    config: dict[str, Any]
    settings: dict[str, Any]
    steps: int
    final_loss: float
    terms: dict[str, float]
    wall_seconds: float
    cpu_seconds: float
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_settings(method: str) -> HardenSettings:
    """The hardening budget of a named defense: the defaults with the method's own (``DefenseMethod.harden``)."""
    from dataclasses import replace

    from moeguard.defense.objective import METHODS

    return replace(HardenSettings(), **METHODS[method].harden) if method in METHODS else HardenSettings()


def task_of_examples(tasks: Sequence[TaskData]) -> torch.Tensor:
    """``[sum of sizes]``: the task number of each example of ``mixture(tasks)``."""
    return torch.cat([torch.full((len(task),), number, dtype=torch.long) for number, task in enumerate(tasks)])


def defended_training_data(tasks: Sequence[TaskData]) -> tuple[TaskData, torch.Tensor]:
    """The mixture the defense trains on and the task of each of its examples."""
    if not tasks:
        raise InputError("hardening needs at least one task to keep the model good at.")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"task names must be unique, got {names}.")
    return mixture(list(tasks), name="defense"), task_of_examples(tasks)


def harden(
    moe: MoEModel,
    tasks: Sequence[TaskData],
    config: DefenseConfig,
    settings: HardenSettings = HardenSettings(),
    *,
    watermark: Watermark | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> HardenResult:
    """Fine-tune ``moe`` in place on ``tasks`` with the defense objective ``config``.

    All parameters are trained (the task loss keeps the full model good while the
    terms reshape routing and experts). The watermark term embeds ``watermark``
    (its record names tasks of ``tasks``); the task data is replayed all along.
    With ``checkpoint`` (a directory) an interrupted run resumes, only with the same
    model, tasks, defense, watermark and settings; the running attribution of the
    subset terms is rebuilt from the following batches.
    """
    if moe.tokenizer is None:
        raise InputError(f"{moe.source}: the model has no tokenizer, so the task data cannot be encoded; save one with it.")
    data, task_of_example = defended_training_data(tasks)
    embedding = None
    if config.watermark:
        if watermark is None:
            raise InputError("the watermark method needs a key: pass watermark=Watermark(record, `key`).", arguments=("key",))
        embedding = WatermarkEmbedding(moe, watermark, tasks, config.watermark_settings, seed=settings.seed)
    objective = DefenseObjective(moe, config, task_of_example, len(tasks), seed=settings.seed, watermark=embedding)
    stream = batches(
        moe.tokenizer, data, batch_size=settings.batch_size, max_length=settings.max_length, shuffle=True,
        seed=settings.seed, epochs=None, context=context_length(moe), prompt_format=moe.prompt_format,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    identity = None
    if checkpoint is not None:
        identity = {"model": moe.fingerprint(), "tasks": data_signature(("task", task) for task in tasks),
                    "defense": config.to_dict(), "batches": {"batch_size": settings.batch_size, "max_length": settings.max_length},
                    "watermark": watermark.identity() if embedding is not None else None}
    with objective.attached():
        result = train(
            moe, stream, steps=settings.steps, lr=settings.lr, warmup=settings.warmup, extra_loss=objective,
            parameters=objective.trainable_parameters(),
            seed=settings.seed, progress=progress, checkpoint=checkpoint, checkpoint_settings=identity,
        )
    terms = objective.log.means()
    log.info("hardened with %s: %s", ", ".join(config.active_terms), ", ".join(f"{k} {v:.4f}" for k, v in terms.items()))
    return HardenResult(
        tasks=[task.name for task in tasks],
        config=config.to_dict(),
        settings=asdict(settings),
        steps=result.steps,
        final_loss=result.final_loss,
        terms=terms,
        wall_seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
        losses=result.losses,
    )


def load_defense_tasks(
    builtin: str | None,
    data_files: Sequence[str],
    *,
    train_examples: int,
    eval_examples: int,
    seed: int = 0,
) -> tuple[list[TaskData], list[TaskData]]:
    """``(train, test)`` task lists: built-in tasks by name, or one task per JSONL file.

    A JSONL task keeps its last ``eval_examples`` (at most a fifth) for the test.
    """
    from moeguard.data import load_jsonl, load_task, resolve_task_names

    if data_files:
        train, test = [], []
        for path in data_files:
            data = load_jsonl(path)
            held_out = max(1, min(eval_examples, len(data) // 5))
            if len(data) < 2:
                raise InputError(f"{path}: a task needs at least 2 examples (some to train on, some to test), got {len(data)}.")
            train.append(data.subset(range(len(data) - held_out)))
            test.append(data.subset(range(len(data) - held_out, len(data))))
        return train, test
    names = resolve_task_names(builtin or "all")
    return (
        [load_task(name, "train", limit=train_examples, seed=seed) for name in names],
        [load_task(name, "test", limit=eval_examples, seed=seed) for name in names],
    )


def harden_to_directory(
    moe: MoEModel,
    train_tasks: Sequence[TaskData],
    test_tasks: Sequence[TaskData],
    config: DefenseConfig,
    settings: HardenSettings,
    *,
    out: str | Path,
    permitted: Sequence[str],
    method: str = "custom",
    watermark: Watermark | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate, harden, evaluate again, and write model + protocol + report to ``out`` atomically.

    The written protocol pins the *hardened* model (the one that is released). An
    interrupted run resumes from its state in ``.<out>.partial`` beside ``out``
    (:func:`moeguard.runs.partial_path`), only when run again with the same settings.
    With a watermark, the hardened model is verified with its key and the report
    gains the verdict; the key and the triggers are never written.
    """
    from moeguard.defense.protocol import PROTOCOL_NAME, make_protocol
    from moeguard.eval import evaluate_tasks
    from moeguard.io import atomic_dir, check_output, write_json
    from moeguard.runs import partial_path

    sources = [moe.source, *(task.source for task in (*train_tasks, *test_tasks))]
    out = check_output(out, inputs=sources, overwrite=overwrite, directory=True)
    check_group_names(permitted, what="permitted group")
    before = evaluate_tasks(moe, None, test_tasks)
    result = harden(moe, train_tasks, config, settings, watermark=watermark, checkpoint=partial_path(out),
                    progress=progress)
    after = evaluate_tasks(moe, None, test_tasks)
    protocol = make_protocol(moe, permitted)
    protocol.parent_model = str(out)
    report = {
        "method": method,
        "model": moe.source,
        "fingerprint": protocol.parent_fingerprint,
        "protocol_sha256": protocol.content_hash(),
        "tasks": [task.name for task in test_tasks],
        "metric": [after[task.name].metric for task in test_tasks],
        "accuracy_before": [before[task.name].value for task in test_tasks],
        "accuracy_after": [after[task.name].value for task in test_tasks],
        "harden": result.to_dict(),
    }
    if config.watermark and watermark is not None:
        from moeguard.watermark.suspects import local_suspect
        from moeguard.watermark.verify import verify_watermark

        verdict = verify_watermark(local_suspect(moe, name=str(out)), watermark)
        report["watermark"] = {"tasks": watermark.record.task_names, "verdict": verdict.summary()}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        moe.save(tmp, overwrite=True)
        protocol.save(tmp / PROTOCOL_NAME)
        write_json(tmp / "harden_report.json", report)
    return report


def demo_defense_loss(
    config: Any, method: str, *, seed: int = 0, strength: float = 1.0, key: str | None = None
) -> "DefenseLoss":
    """The ``extra_loss`` that trains the demo model of ``config`` defended from scratch.

    :func:`moeguard.zoo.train_demo` trains on ``mixture`` of ``config.examples_of(task)``
    examples of each of ``config.tasks`` (task weights included), in that order, which
    gives each example's task. A watermark method embeds the watermark of ``key`` on
    every generation task of ``config``.
    """
    from moeguard.data import load_task
    from moeguard.defense.objective import DefenseLoss, defense_config
    from moeguard.watermark.triggers import builtin_record, generation_tasks

    defense = defense_config(method, strength=strength)
    sizes = torch.tensor([config.examples_of(task) for task in config.tasks], dtype=torch.long)
    task_of_example = torch.repeat_interleave(torch.arange(len(config.tasks)), sizes)
    watermark, watermark_tasks = None, []
    if defense.watermark:
        if key is None:
            raise InputError("the watermark method needs a key: pass `key`.", arguments=("key",))
        covered = generation_tasks(config.tasks)  # a trigger asks for a generated response
        watermark = Watermark(builtin_record(covered), key)
        examples = defense.watermark_settings.attribution_examples
        watermark_tasks = [load_task(task, "train", limit=examples, seed=seed) for task in covered]
    return DefenseLoss(defense, task_of_example, len(config.tasks), seed=seed, watermark=watermark,
                       watermark_tasks=watermark_tasks)
