"""The tasks an audit attacks: each an attacker's pool (attributed and labelled from) and a held-out test set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeguard.data import BUILTIN_TASKS, TaskData, data_signature, load_task, resolve_task_names
from moeguard.data.files import DatasetSource
from moeguard.errors import DataError
from moeguard.eval.lm_eval_bridge import lm_eval_task
from moeguard.realign.inputs import RealignData, file_data, held_out


@dataclass
class AuditTask:
    """``pool``: examples the attacker has (attribution runs on them, labels come from them);
    ``test``: the held-out examples every accuracy is measured on."""

    name: str
    pool: TaskData
    test: TaskData
    source: str
    builtin: bool = False
    seed: int = 0

    def realign_data(self, others: list[TaskData]) -> RealignData:
        return RealignData(self.pool, self.test, others)

    def prompts(self, count: int) -> TaskData:
        """Prompts for a carver who labels with the full model: ``count`` fresh ones of a built-in task (its pool
        split; the audit's pool is their prefix), the pool of a data file."""
        return load_task(self.name, "pool", limit=count, seed=self.seed) if self.builtin else self.pool

    def signature(self) -> str:
        return data_signature((("pool", self.pool), ("test", self.test)))


def builtin_audit_tasks(names: list[str] | None, *, pool_size: int, test_size: int, seed: int) -> list[AuditTask]:
    """Built-in tasks (default: all) with their pool and test splits."""
    names = resolve_task_names(",".join(names)) if names is not None else list(BUILTIN_TASKS)
    return [
        AuditTask(name, load_task(name, "pool", limit=pool_size, seed=seed), load_task(name, "test", limit=test_size, seed=seed),
                  f"built-in task {name}", builtin=True, seed=seed)
        for name in names
    ]


def user_audit_tasks(
    paths: list[str], dataset: DatasetSource, *, test_fraction: float, test_size: int, seed: int, metric: str | None = None,
    answer_pattern: str | None = None, lm_eval_tasks: list[str] = (), lm_eval_include: str | None = None,
) -> list[AuditTask]:
    """One task per JSONL file, one for the dataset (if named) and one per lm-eval task, of any task type: a seeded
    ``test_fraction`` (at most ``test_size`` examples) is held out as the test set."""
    scoring = {"metric": metric, "answer_pattern": answer_pattern}
    split = [(file_data(path, test_fraction=test_fraction, seed=seed, **scoring), str(Path(path))) for path in paths]
    loaded = [dataset.load(**scoring)] if dataset.hf_dataset else []
    loaded += [lm_eval_task(name, include_path=lm_eval_include) for name in lm_eval_tasks]
    split += [(held_out(data, test_fraction=test_fraction, seed=seed), data.source) for data in loaded]
    tasks = [AuditTask(data.task, data.pool, data.test.head(test_size), source) for data, source in split]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"several `data` files (or the dataset) give the task name(s) {duplicates} (from the file "
                        "names); rename them apart.", arguments=("data",))
    return tasks
