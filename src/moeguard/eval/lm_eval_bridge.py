"""Evaluating a moeguard model with lm-evaluation-harness (the optional ``lm-eval`` extra), and harness
tasks as moeguard tasks.

:func:`run_lm_eval` wraps the model in lm-eval's own ``HFLM`` class, so harness tasks
score it exactly as they score any Hugging Face model (also inside
``moe.mask_experts(...)``: the harness then scores the masked model, a sweep point).
Prompts get the tokenizer's special tokens (a bos where the tokenizer defines one), as
in moeguard's own scoring.

:func:`lm_eval_task` turns a harness task's evaluation documents into a moeguard task, with
the harness's own prompts and targets (zero-shot): multiple-choice tasks become choice
tasks (each choice after the task's target delimiter, scored by log-likelihood as the
harness's ``acc``), generation and log-likelihood tasks generation tasks (the target as
the answer), rolling log-likelihood tasks (perplexity) language-modelling tasks. Then
every stage (attribution, sweep, re-alignment, the audit) works on it as on any task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeguard.data.examples import Example, TaskData
from moeguard.errors import DataError, InputError

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


def lm_eval_task(name: str, *, include_path: str | os.PathLike | None = None, limit: int | None = None) -> TaskData:
    """The evaluation documents of the harness task ``name`` as a moeguard task (see the module docstring).

    ``include_path`` adds a directory of task YAML files; ``limit`` caps the documents.
    """
    _, _, TaskManager = _import_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"lm-eval include path {include_path} is not a directory of task YAML files.",
                         arguments=("include_path",))
    manager = task_manager(TaskManager, [name], include_path)
    if name not in manager.all_tasks:
        raise InputError(f"lm-eval does not know the task {name!r}; list the known ones with `lm_eval --tasks list`, "
                         "or point `include_path` at a directory with its YAML file.", arguments=("include_path",))
    task = manager.load_task_or_group([name]).get(name)
    if not hasattr(task, "eval_docs"):
        raise InputError(f"lm-eval task {name!r} is a group of tasks; name its tasks one by one.")
    docs = list(task.eval_docs)[:limit]
    delimiter = task.config.target_delimiter
    examples = [harness_example(task, doc, delimiter, f"lm-eval task {name} document {i}") for i, doc in enumerate(docs)]
    if not examples:
        raise DataError(f"lm-eval task {name!r} has no evaluation documents.")
    return TaskData(name, examples[0].kind, examples, f"lm-eval:{name}")


def harness_example(task: Any, doc: Any, delimiter: str, where: str) -> Example:
    """One harness document as an :class:`Example` of the task type its output type scores."""
    output = task.OUTPUT_TYPE
    if output == "loglikelihood_rolling":
        return Example(text=str(task.doc_to_target(doc)))
    prompt = task.doc_to_text(doc)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: the harness writes its prompt as {type(prompt).__name__}, not text; moeguard "
                        "reads tasks whose doc_to_text gives the prompt.")
    target = task.doc_to_target(doc)
    if output == "multiple_choice":
        choices = [delimiter + str(choice) for choice in task.doc_to_choice(doc)]
        label = target if isinstance(target, int) else [c.removeprefix(delimiter) for c in choices].index(str(target))
        return Example(prompt=prompt, choices=tuple(choices), label=int(label))
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, int) and output != "generate_until":
        target = task.doc_to_choice(doc)[target]
    return Example(prompt=prompt, answer=(delimiter if output == "loglikelihood" else "") + str(target))
