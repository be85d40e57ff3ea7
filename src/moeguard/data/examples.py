"""Task examples and datasets: the three kinds of data moeguard evaluates and trains on
(the task types of :mod:`moeguard.data.task_types`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from moeguard.errors import DataError

KINDS = ("generate", "choice", "lm")
MIXED = "mixed"  # the kind of a training mixture of tasks of several kinds (trained on, never scored)


@dataclass(frozen=True)
class Example:
    """One example of one of three kinds.

    - generate: ``prompt`` and the exact ``answer`` a model must produce after it;
    - choice: ``prompt``, candidate ``choices`` and the index ``label`` of the right one;
    - lm: a ``text`` for language modelling (scored by its loss).
    """

    prompt: str = ""
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None
    text: str | None = None

    @property
    def kind(self) -> str:
        if self.text is not None:
            return "lm"
        if self.choices is not None:
            return "choice"
        return "generate"

    @property
    def target(self) -> str:
        """The continuation a model is trained to produce after ``prompt``."""
        if self.text is not None:
            return self.text
        if self.choices is not None:
            return self.choices[self.label]
        return self.answer

    def to_json(self) -> dict:
        """The object of this example in the JSONL contract (DESIGN.md)."""
        if self.kind == "lm":
            return {"text": self.text}
        if self.kind == "choice":
            return {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}
        return {"prompt": self.prompt, "answer": self.answer}


@dataclass
class TaskData:
    """The examples of one task, all of one ``kind``; ``source`` says where they came from.

    ``origins[i]``, when known, says where example ``i`` was read (``"data.jsonl line
    4"``), so that an error about one example can point at it. ``metric`` is the metric
    the task is scored by (None: its task type's default; generate tasks declare one of
    exact_match, normalized_match, token_f1, rouge_l) and ``answer_pattern`` a regular
    expression that extracts the answer from a generation before it is compared (see
    :mod:`moeguard.eval.text_metrics`). A training mixture of several kinds has kind
    ``"mixed"``.
    """

    name: str
    kind: str
    examples: list[Example] = field(default_factory=list)
    source: str = ""
    origins: list[str] = field(default_factory=list)
    metric: str | None = None
    answer_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, MIXED):
            raise DataError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if self.origins and len(self.origins) != len(self.examples):
            raise DataError(f"task {self.name!r}: {len(self.origins)} origins for {len(self.examples)} examples.")
        for position, example in enumerate(self.examples):
            if example.kind != self.kind and self.kind != MIXED:
                raise DataError(
                    f"task {self.name!r} ({self.source or 'in memory'}): example {position} is a {example.kind} "
                    f"example but the task holds {self.kind} examples; keep one kind per file."
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def origin(self, index: int) -> str:
        """Where example ``index`` came from, for error messages."""
        if self.origins:
            return self.origins[index]
        return f"example {index} of task {self.name!r}" + (f" ({self.source})" if self.source else "")

    def subset(self, indices: Sequence[int], *, name: str | None = None) -> "TaskData":
        """The examples at ``indices`` (in that order) as a new task."""
        indices = list(indices)
        origins = [self.origins[i] for i in indices] if self.origins else []
        return TaskData(name or self.name, self.kind, [self.examples[i] for i in indices], self.source, origins,
                        metric=self.metric, answer_pattern=self.answer_pattern)

    def head(self, limit: int | None) -> "TaskData":
        """The first ``limit`` examples (all of them for ``None``)."""
        return self if limit is None else self.subset(range(min(limit, len(self))))


def mixture(datas: Sequence[TaskData], *, name: str = "mixture") -> TaskData:
    """All examples of several tasks, concatenated, to train on (shuffle with ``batches``).

    Tasks of one kind give a task of that kind; tasks of several kinds a ``"mixed"`` one,
    which can be trained on but not scored.
    """
    if not datas:
        raise DataError("a mixture needs at least one task.")
    kinds = {data.kind for data in datas}
    examples = [example for data in datas for example in data.examples]
    origins = [data.origin(i) for data in datas for i in range(len(data))]
    kind = datas[0].kind if len(kinds) == 1 else MIXED
    return TaskData(name, kind, examples, "+".join(data.source or data.name for data in datas), origins)


def require_examples(data: TaskData) -> TaskData:
    """``data`` itself, or a DataError if it holds no examples."""
    if len(data) == 0:
        raise DataError(f"task {data.name!r} ({data.source or 'in memory'}) has no examples; give at least one.")
    return data


def data_signature(parts: Iterable[tuple[str, TaskData]]) -> str:
    """A sha256 over ``(role, task)`` pairs: each task's name, kind, size and every example.

    Two runs that see the same signature saw exactly the same examples in the same roles.
    """
    digest = hashlib.sha256()
    for role, data in parts:
        digest.update(f"{role}|{data.name}|{data.kind}|{len(data)}\n".encode())
        if data.metric is not None or data.answer_pattern is not None:
            digest.update(f"metric|{data.metric}|{data.answer_pattern}\n".encode())
        for example in data.examples:
            digest.update((json.dumps(example.to_json(), sort_keys=True) + "\n").encode())
    return digest.hexdigest()
