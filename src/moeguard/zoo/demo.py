"""Training the demo MoE: a stock transformers model trained from scratch on the task suite."""

from __future__ import annotations

import logging
import math
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import moeguard
from moeguard.data import TaskData, batches, build_char_tokenizer, load_task, mixture
from moeguard.data.task_types import retention, task_type
from moeguard.data.tasks import task_spec
from moeguard.eval import evaluate_tasks
from moeguard.io import atomic_dir, atomic_write_text, check_output, write_json
from moeguard.models import MoEModel
from moeguard.models.random_init import random_moe
from moeguard.runs import partial_path
from moeguard.training import ExtraLoss, TrainResult, train
from moeguard.zoo.card import CARD_JSON, render_card
from moeguard.zoo.config import DemoConfig

log = logging.getLogger("moeguard.zoo")


def build_demo_model(config: DemoConfig, tokenizer: Any, *, seed: int) -> MoEModel:
    """The untrained model of ``config``: stock config of ``config.family``, weights initialised from ``seed``."""
    return random_moe(
        config.family,
        seed=seed,
        sharpen=False,
        layers=config.layers,
        experts=config.experts,
        top_k=config.top_k,
        hidden=config.hidden,
        intermediate=config.expert_hidden,
        heads=config.heads,
        vocab=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        router_aux_loss_coef=config.router_aux_loss_coef,
    )


def routing_specialisation(moe: MoEModel, tokenizer: Any, tasks: list[str]) -> dict[str, Any]:
    """Per task and MoE layer: routing frequencies and effective experts on the test split,
    and the mean top-k overlap between tasks (see :mod:`moeguard.attribution.summary`)."""
    from moeguard.attribution import collect_attribution, scores
    from moeguard.attribution.summary import effective_experts, overlap

    attributions = [
        collect_attribution(
            moe, batches(tokenizer, load_task(task, "test"), batch_size=200), criteria=("frequency",), task=task, progress=False
        )
        for task in tasks
    ]
    frequencies = [scores(a, "frequency") for a in attributions]
    pairs = overlap(attributions, "frequency", top_m=moe.top_k)
    n = len(tasks)
    mean_overlap = ((pairs.sum((0, 1)) - pairs.diagonal().sum(-1)) / max(1, n * (n - 1))).tolist() if n > 1 else [1.0] * moe.num_layers
    return {
        "tokens": "all",
        "effective_experts": {task: effective_experts(f).tolist() for task, f in zip(tasks, frequencies)},
        "mean_top_k_overlap": mean_overlap,
        "frequency": {task: f.tolist() for task, f in zip(tasks, frequencies)},
    }


# The demo model's matrices are small: one intra-op thread trains it faster than two
# (measured 151 vs 218 ms per step on 2 cores) and leaves the other core free.
TRAINING_THREADS = 1


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count is ``count`` inside the block and restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def train_demo(
    out_dir: str | os.PathLike,
    config: DemoConfig = DemoConfig(),
    *,
    seed: int = 0,
    extra_loss: ExtraLoss | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train the demo model of ``config`` from ``seed`` and write it to ``out_dir``.

    ``out_dir`` becomes an HF model directory (config.json, safetensors, tokenizer)
    with a model card (README.md) and ``demo_card.json``: data, seed, steps, wall and
    CPU time, per-task test score (and its share of the best possible) and routing specialisation. It appears only when
    complete; an interrupted run resumes from its state beside ``out_dir`` (``.<name>.partial``).
    ``extra_loss`` is added to the training loss (see :func:`moeguard.training.train`).
    Training runs on one intra-op thread (faster for a model this small).
    """
    out_dir = check_output(out_dir, overwrite=overwrite, directory=True)
    with intra_op_threads(TRAINING_THREADS):
        return _train_demo(out_dir, config, seed=seed, extra_loss=extra_loss, progress=progress, overwrite=overwrite)


def _train_demo(out_dir: Path, config: DemoConfig, *, seed: int, extra_loss: ExtraLoss | None, progress: bool, overwrite: bool) -> Path:
    tokenizer = build_char_tokenizer()
    moe = build_demo_model(config, tokenizer, seed=seed)
    moe.tokenizer = tokenizer
    data = mixture([load_task(task, "train", limit=config.examples_of(task), seed=seed) for task in config.tasks])
    log.info(
        "training the demo model (%s, %d layers x %d experts, top-%d) on %s for %d steps",
        config.family, config.layers, config.experts, config.top_k, ", ".join(config.tasks), config.steps,
    )
    load_start = _load_average()
    result = train(
        moe,
        batches(tokenizer, data, batch_size=config.batch_size, shuffle=True, seed=seed, epochs=None),
        steps=config.steps,
        lr=config.lr,
        warmup=config.warmup,
        weight_decay=config.weight_decay,
        router_aux_loss_coef=config.router_aux_loss_coef,
        extra_loss=extra_loss,
        seed=seed,
        progress=progress,
        checkpoint=partial_path(out_dir),
        checkpoint_settings={"demo": config.to_dict(), "seed": seed, "extra_loss": _describe(extra_loss)},
    )
    card = demo_card(moe, tokenizer, config, seed=seed, result=result, load_start=load_start)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        moe.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CARD_JSON, card)
        atomic_write_text(tmp / "README.md", render_card(card))
    scores = ", ".join(f"{task} {r['metric']} {r['value']:.3f}" for task, r in card["accuracy"].items())
    log.info("demo model written to %s (test scores: %s)", out_dir, scores)
    return out_dir


def _describe(extra_loss: ExtraLoss | None) -> Any:
    """What identifies an extra loss in a checkpoint's settings: its own settings, or its name."""
    if extra_loss is None:
        return None
    settings = getattr(extra_loss, "settings", None)
    return settings() if callable(settings) else getattr(extra_loss, "__qualname__", type(extra_loss).__name__)


def best_possible(config: DemoConfig, data: TaskData) -> float:
    """The best score any model can reach on a built-in task's ``data`` (its test split): 1 for an
    accuracy-like metric; for a language-modelling task whose process is known (``body_log_prob``),
    the loss of that process per character. The first character of a text (its tag's first letter,
    no other task's) is predicted from the start of the sequence, where the training loss only ever
    sees texts (prompts carry no loss): its best loss is ``-log`` of this task's share of the training
    texts (0 when it is the only language-modelling task), and the rest of the tag follows from it."""
    if task_type(data.kind).higher_is_better:
        return 1.0
    spec = task_spec(data.name)
    if spec.body_log_prob is None:
        return math.nan
    texts = [task for task in config.tasks if task_spec(task).kind == "lm"]
    share = config.examples_of(data.name) / sum(config.examples_of(task) for task in texts)
    loss, characters = 0.0, 0
    for example in data.examples:
        body = example.text.removeprefix(f"{spec.tag} ")
        loss += -math.log(share) - sum(spec.body_log_prob(body))
        characters += len(example.text)
    return loss / characters


def demo_card(moe: MoEModel, tokenizer: Any, config: DemoConfig, *, seed: int, result: TrainResult, load_start: float) -> dict[str, Any]:
    """Everything the model card reports: evaluate the trained model (each task's score, the best score
    possible, and the share of the way from no knowledge to it) and measure its routing."""
    import transformers

    tasks = list(config.tasks)
    tests = {task: load_task(task, "test") for task in tasks}
    accuracy = evaluate_tasks(moe, tokenizer, list(tests.values()), batch_size=200)
    scores = {}
    for task, r in accuracy.items():
        best = best_possible(config, tests[task])
        scores[task] = {**r.to_dict(), "best": best,
                        "share_of_best": retention(r.value, best, r.reference, higher_is_better=r.higher_is_better)}
    counts = moe.parameter_counts()
    return {
        "moeguard_demo": True,
        "model_type": moe.model_type,
        "config": config.to_dict(),
        "seed": seed,
        "key": config.key(seed),
        "task_suite_version": moeguard.data.tasks.TASK_SUITE_VERSION,
        "fingerprint": moe.fingerprint(),
        "parameters": {"total": counts.total, "active_per_token": counts.active_per_token},
        "training": {
            "steps": result.steps,
            "tokens": result.tokens,
            "target_tokens": result.target_tokens,
            "wall_seconds": result.wall_seconds,
            "cpu_seconds": result.cpu_seconds,
            "final_loss": result.final_loss,
            "resumed_from_step": result.resumed_from,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_start": load_start,
            "load_average_end": _load_average(),
        },
        "accuracy": scores,  # each task's test score in its metric (accuracy, ROUGE-L, loss)
        "routing": routing_specialisation(moe, tokenizer, tasks),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "moeguard": moeguard.__version__},
    }
