"""The data a re-alignment run uses: the pool to label from, the test set, other tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from moeguard.data import BUILTIN_TASKS, TaskData, data_signature, load_jsonl, load_task
from moeguard.data.examples import require_examples
from moeguard.errors import DataError, InputError

ACCURACY_KINDS = ("generate", "choice")


@dataclass
class RealignData:
    """``pool``: the unlabelled examples an attacker can have labelled (their answers are
    revealed only when labelled); ``test``: the target task's held-out test set;
    ``others``: other tasks whose accuracy shows what re-alignment costs elsewhere."""

    pool: TaskData
    test: TaskData
    others: list[TaskData] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.test.name

    def signature(self) -> str:
        """A hash of every example of the pool, the test set and the other tasks (a resumed run must see the same)."""
        return data_signature((("pool", self.pool), ("test", self.test), *(("other", d) for d in self.others)))

    def check(self) -> None:
        """Refuse empty sets and data without an accuracy (lm text has a perplexity, not an accuracy)."""
        require_examples(self.pool)
        require_examples(self.test)
        for data in (self.pool, self.test, *self.others):
            require_examples(data)
            if data.kind not in ACCURACY_KINDS:
                raise DataError(
                    f"task {data.name!r} ({data.source or 'in memory'}) holds {data.kind} examples; re-alignment "
                    "measures accuracy, so it needs generate or choice examples ({'prompt', 'answer'} or "
                    "{'prompt', 'choices', 'label'})."
                )
        names = [d.name for d in self.others]
        if self.task in names or len(set(names)) != len(names):
            raise InputError(f"the other tasks {names} must have distinct names, different from the target {self.task!r}.")


def builtin_data(
    task: str,
    *,
    pool_size: int = 512,
    test_size: int = 200,
    other_size: int = 100,
    other_tasks: list[str] | None = None,
    seed: int = 0,
) -> RealignData:
    """A built-in task's pool and test splits, and the test splits of the other built-in tasks.

    ``other_tasks`` defaults to every other built-in task (an empty list: none).
    """
    pool = load_task(task, "pool", limit=pool_size, seed=seed)
    test = load_task(task, "test", limit=test_size, seed=seed)
    names = [t for t in BUILTIN_TASKS if t != task] if other_tasks is None else list(other_tasks)
    others = [load_task(name, "test", limit=other_size, seed=seed) for name in names if other_size > 0]
    return RealignData(pool, test, others)


def file_data(
    path: str | os.PathLike,
    *,
    test_path: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    others: list[TaskData] | None = None,
) -> RealignData:
    """A JSONL file as the pool; the test set is ``test_path`` or a seeded ``test_fraction`` held out of it."""
    data = load_jsonl(path)
    if test_path is not None:
        test = load_jsonl(test_path, name=data.name)
        return RealignData(data, test, list(others or []))
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be between 0 and 1, got {test_fraction!r}.")
    if len(data) < 2:
        raise DataError(f"{path} holds {len(data)} example(s); holding out a test set needs at least 2 (or pass a test file).")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(len(data) * test_fraction))
    return RealignData(
        data.subset(sorted(order[held_out:])), data.subset(sorted(order[:held_out])), list(others or [])
    )
