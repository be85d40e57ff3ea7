"""The data a re-alignment run uses: the pool to label from, the test set, other tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from moeguard.data import BUILTIN_TASKS, TaskData, data_signature, load_jsonl, load_task
from moeguard.data.examples import MIXED, require_examples
from moeguard.errors import DataError, InputError


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
        """Refuse empty sets, mixtures of kinds, and a test set of another kind than the pool."""
        require_examples(self.pool)
        require_examples(self.test)
        for data in (self.pool, self.test, *self.others):
            require_examples(data)
            if data.kind == MIXED:
                raise DataError(f"task {data.name!r} ({data.source or 'in memory'}) mixes examples of several kinds; "
                                "give one task per kind.")
        if self.test.kind != self.pool.kind or self.test.metric != self.pool.metric:
            raise DataError(f"the test set of {self.task!r} holds {self.test.kind} examples scored by "
                            f"{self.test.metric or 'the default metric'}, the pool {self.pool.kind} examples scored by "
                            f"{self.pool.metric or 'the default metric'}; give a test set of the pool's task.")
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


def held_out(data: TaskData, *, test_fraction: float = 0.2, seed: int = 0, others: list[TaskData] | None = None) -> RealignData:
    """``data`` split into a pool and a seeded ``test_fraction`` held out as the test set."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be between 0 and 1, got {test_fraction!r}.", arguments=("test_fraction",))
    if len(data) < 2:
        raise DataError(f"{data.source or data.name} holds {len(data)} example(s); holding out a test set needs at least 2 "
                        "(or pass a test file).")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(len(data) * test_fraction))
    return RealignData(data.subset(sorted(order[count:])), data.subset(sorted(order[:count])), list(others or []))


def file_data(
    path: str | os.PathLike,
    *,
    test_path: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    others: list[TaskData] | None = None,
    metric: str | None = None,
    answer_pattern: str | None = None,
) -> RealignData:
    """A JSONL file as the pool; the test set is ``test_path`` (scored as the pool is) or a seeded
    ``test_fraction`` held out of it (:func:`held_out`). ``metric`` / ``answer_pattern`` as in
    :func:`moeguard.data.load_jsonl`."""
    data = load_jsonl(path, metric=metric, answer_pattern=answer_pattern)
    if test_path is not None:
        test = load_jsonl(test_path, name=data.name, metric=data.metric, answer_pattern=data.answer_pattern)
        return RealignData(data, test, list(others or []))
    return held_out(data, test_fraction=test_fraction, seed=seed, others=others)
