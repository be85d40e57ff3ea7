"""Evaluating a moeguard model with lm-evaluation-harness (the optional ``lm-eval`` extra).

The model is wrapped in lm-eval's own ``HFLM`` class, so harness tasks score it
exactly as they score any Hugging Face model. Prompts get the tokenizer's special
tokens (a bos where the tokenizer defines one), as in moeguard's own scoring.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeguard.errors import InputError

INSTALL_HINT = "lm-evaluation-harness is not installed; install the extra with: pip install 'moeguard[lm-eval]'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return lm_eval, HFLM, TaskManager


def lm_eval_model(model: Any, *, tokenizer: Any = None, batch_size: int = 8, device: str | None = None) -> Any:
    """An lm-eval ``HFLM`` over ``model``: a model directory or hub id (loaded with :func:`moeguard.models.load_moe`:
    safetensors only, every tensor checked), an ``MoEModel`` or a loaded causal LM."""
    _, HFLM, _ = _import_lm_eval()
    if isinstance(model, (str, os.PathLike)):
        from moeguard.models import load_moe

        model = load_moe(model)
        model.model.to(device or "cpu")
    lm = getattr(model, "model", model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("lm-eval needs the model's tokenizer; pass tokenizer=... (the model has none saved with it).")
    return HFLM(pretrained=lm, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=tokenizer.bos_token is not None)


def task_manager(TaskManager: Any, tasks: Sequence[str], include_path: str | os.PathLike | None) -> Any:
    """lm-eval's task index; only ``include_path`` when it holds every task (indexing the
    harness's own thousands of task files takes most of a minute)."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def run_lm_eval(
    model: Any,
    tasks: Sequence[str],
    *,
    tokenizer: Any = None,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model``; ``{task: {metric: value}}`` as the harness reports them.

    ``include_path`` adds a directory of task YAML files (e.g. local data sets);
    ``limit`` caps the examples per task.
    """
    lm_eval, _, TaskManager = _import_lm_eval()
    if not tasks:
        raise InputError("name at least one lm-eval task.")
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"lm-eval include path {include_path} is not a directory of task YAML files.")
    manager = task_manager(TaskManager, tasks, include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise InputError(
            f"lm-eval does not know the task(s) {unknown}; list the known ones with `lm_eval --tasks list`, "
            "or point `include_path` at a directory with their YAML files.", arguments=("include_path",),
        )
    harness_model = lm_eval_model(model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = lm_eval.simple_evaluate(
        model=harness_model, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False
    )
    return {
        task: {metric: float(value) for metric, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for task, metrics in output["results"].items()
    }
