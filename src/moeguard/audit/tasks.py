"""The tasks an audit attacks: each an attacker's pool (attributed and labelled from) and a held-out test set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeguard.data import BUILTIN_TASKS, TaskData, data_signature, load_task, resolve_task_names
from moeguard.errors import DataError
from moeguard.realign.inputs import RealignData, file_data

ACCURACY_KINDS = ("generate", "choice")


@dataclass
class AuditTask:
    """``pool``: examples the attacker has (attribution runs on them, labels come from them);
    ``test``: the held-out examples every accuracy is measured on."""

    name: str
    pool: TaskData
    test: TaskData
    source: str

    def realign_data(self, others: list[TaskData]) -> RealignData:
        return RealignData(self.pool, self.test, others)

    def signature(self) -> str:
        return data_signature((("pool", self.pool), ("test", self.test)))


def builtin_audit_tasks(names: list[str] | None, *, pool_size: int, test_size: int, seed: int) -> list[AuditTask]:
    """Built-in tasks (default: all) with their pool and test splits."""
    names = resolve_task_names(",".join(names)) if names is not None else list(BUILTIN_TASKS)
    return [
        AuditTask(name, load_task(name, "pool", limit=pool_size, seed=seed), load_task(name, "test", limit=test_size, seed=seed),
                  f"built-in task {name}")
        for name in names
    ]


def file_audit_tasks(paths: list[str], *, test_fraction: float, test_size: int, seed: int) -> list[AuditTask]:
    """One task per JSONL file: a seeded ``test_fraction`` (at most ``test_size`` examples) is held out as the test set."""
    tasks = []
    for path in paths:
        data = file_data(path, test_fraction=test_fraction, seed=seed)
        if data.pool.kind not in ACCURACY_KINDS:
            raise DataError(
                f"{path} holds {data.pool.kind} examples (plain text); an audit measures task accuracy, so it needs "
                "{\"prompt\", \"answer\"} or {\"prompt\", \"choices\", \"label\"} lines."
            )
        tasks.append(AuditTask(data.task, data.pool, data.test.head(test_size), str(Path(path))))
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"several `data` files give the task name(s) {duplicates} (from the file names); rename them apart.",
                        arguments=("data",))
    return tasks
