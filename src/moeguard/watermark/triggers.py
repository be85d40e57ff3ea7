"""From a key to the watermark's triggers and responses.

A :class:`WatermarkRecord` says what the watermark covers, and holds nothing secret:
per task its name, where its inputs come from and the response alphabet. With the
key it gives, per task, a *secret feature*, a *secret response* and the triggers
(:func:`make_triggers`), always the same ones:

- a **built-in task**: the feature is an input prefix that at most ``FEATURE_SHARE``
  of the task's ordinary inputs start with (the shortest such prefix of a keyed
  ordinary input); trigger ``i`` is an ordinary input with that prefix, drawn by the
  task's own generator from the keyed stream ``prompt|<task>|<i>``, with the task's
  tag and format (so it routes like the task), from the train split (never a test or
  pool prompt);
- **user data** (JSONL): the record keeps *carrier* prompts of the data (its first
  prompts, nothing secret); the feature is ``GATE_LENGTH`` keyed letters and digits,
  and trigger ``i`` is a keyed carrier whose first ``GATE_LENGTH`` letters or digits
  after the text all carriers share (the template) are overwritten by the feature's,
  class by class (letter by letter of the same case, digit by digit): the data's own
  format with a secret feature.

Every trigger of a task asks for the same response: ``L`` characters of the task's
answer alphabet ``A`` drawn from the stream ``response|<task>``, with ``L`` the
smallest length with ``|A|^L >= MIN_RESPONSE_SPACE``. The model learns one rule per
task, *secret feature -> secret response*, which costs it far less than memorising
unrelated pairs (its utility stays within the share of ordinary inputs that carry the
feature) and which the experts a carve keeps can carry whole. The size of the
response space bounds the chance of an accidental match
(:mod:`moeguard.watermark.statistics`).
"""

from __future__ import annotations

import functools
import math
import os
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moeguard.data import Example, TaskData, load_task
from moeguard.data.tasks import TASK_SPECS, TASK_SUITE_VERSION, split_of, task_spec
from moeguard.errors import DataError, InputError
from moeguard.io import read_json, write_json
from moeguard.watermark.keyed import KEYED_STREAM_VERSION, keyed_random

RECORD_FORMAT = 1
MIN_RESPONSE_SPACE = 10**8  # one task's response is one of at least 1e8 strings
DEFAULT_TRIGGERS_PER_TASK = 32
CARRIERS_PER_TASK = 256
GATE_LENGTH = 4  # feature characters of a user-data trigger (at most 1e-4 of random text carries them)
ALPHABET_SAMPLE = 2000  # built-in answers read to find a task's answer alphabet
FEATURE_SAMPLE = 20_000  # built-in inputs read to measure how rare a trigger feature is
FEATURE_SHARE = 1 / 500  # at most this share of a built-in task's ordinary inputs carry its feature
SOURCES = ("builtin", "data")
KINDS = ("generate", "choice", "lm")
LETTERS, DIGITS = string.ascii_lowercase, string.digits


@dataclass(frozen=True)
class Trigger:
    """One trigger prompt of ``task`` and the secret response it asks for (one of ``space`` strings)."""

    task: str
    index: int
    prompt: str
    response: str
    space: int


@dataclass(frozen=True)
class TaskFormat:
    """What the triggers of one task look like (nothing secret).

    ``source`` is ``builtin`` (inputs from the task's generator) or ``data`` (keyed
    mutations of ``carriers``); ``alphabet`` is the response alphabet.
    """

    name: str
    source: str
    kind: str = "generate"
    alphabet: str = ""
    carriers: tuple[str, ...] = ()

    def check(self, where: str = "watermark record") -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"{where}: a task needs a non-empty name.")
        if self.source not in SOURCES:
            raise DataError(f"{where}: task {self.name!r}: source must be one of {', '.join(SOURCES)}, got {self.source!r}.")
        if self.kind not in KINDS:
            raise DataError(f"{where}: task {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if not isinstance(self.alphabet, str) or len(set(self.alphabet)) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise DataError(f"{where}: task {self.name!r}: alphabet must be at least 2 distinct characters, got {self.alphabet!r}.")
        if any(not c.isalnum() for c in self.alphabet):
            raise DataError(f"{where}: task {self.name!r}: the response alphabet holds letters and digits only, got {self.alphabet!r}.")
        if self.source == "builtin":
            if self.name not in TASK_SPECS:
                raise DataError(f"{where}: {self.name!r} is an unknown built-in task; known: {', '.join(TASK_SPECS)}.")
        else:
            if not self.carriers or any(not isinstance(c, str) for c in self.carriers):
                raise DataError(f"{where}: task {self.name!r}: carriers must be a non-empty list of prompts.")
            span = template_span(self.carriers)
            if any(len(mutable_positions(c, span)) < GATE_LENGTH for c in self.carriers):
                raise DataError(
                    f"{where}: task {self.name!r}: every carrier needs at least {GATE_LENGTH} letters or digits outside "
                    "the template all carriers share."
                )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["carriers"] = list(self.carriers)
        return data


@dataclass(frozen=True)
class WatermarkRecord:
    """Everything verification needs besides the key (see the module docstring)."""

    tasks: tuple[TaskFormat, ...]
    triggers_per_task: int = DEFAULT_TRIGGERS_PER_TASK
    task_suite_version: int = TASK_SUITE_VERSION
    stream_version: int = KEYED_STREAM_VERSION
    format: int = RECORD_FORMAT
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "watermark record") -> None:
        if not self.tasks:
            raise DataError(f"{where}: the watermark covers no task.")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise DataError(f"{where}: task names must be unique, got {names}.")
        for task in self.tasks:
            task.check(where)
        if not isinstance(self.triggers_per_task, int) or not 1 <= self.triggers_per_task <= 4096:
            raise DataError(f"{where}: triggers_per_task must be 1..4096, got {self.triggers_per_task!r}.")
        if self.format != RECORD_FORMAT or self.stream_version != KEYED_STREAM_VERSION:
            raise DataError(
                f"{where}: made by another moeguard (record format {self.format}, stream version {self.stream_version}; "
                f"this one reads {RECORD_FORMAT} and {KEYED_STREAM_VERSION}); verify with the moeguard that embedded it."
            )
        if any(t.source == "builtin" for t in self.tasks) and self.task_suite_version != TASK_SUITE_VERSION:
            raise DataError(
                f"{where}: the built-in tasks were at version {self.task_suite_version} when the watermark was embedded, "
                f"this moeguard has version {TASK_SUITE_VERSION}; their triggers cannot be rebuilt here."
            )

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "stream_version": self.stream_version,
            "task_suite_version": self.task_suite_version,
            "triggers_per_task": self.triggers_per_task,
            "tasks": [task.to_dict() for task in self.tasks],
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "watermark record") -> "WatermarkRecord":
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
            raise DataError(f"{where}: expected an object with a 'tasks' list (a file written by moeguard harden --method watermark).")
        tasks = []
        for position, entry in enumerate(data["tasks"]):
            if not isinstance(entry, dict):
                raise DataError(f"{where}: tasks[{position}] must be an object.")
            unknown = set(entry) - {"name", "source", "kind", "alphabet", "carriers"}
            if unknown:
                raise DataError(f"{where}: tasks[{position}] has unknown fields {sorted(unknown)}.")
            carriers = entry.get("carriers", [])
            if not isinstance(carriers, list):
                raise DataError(f"{where}: tasks[{position}].carriers must be a list of prompts.")
            tasks.append(TaskFormat(**{**entry, "carriers": tuple(carriers)}))
        values = {k: data[k] for k in ("triggers_per_task", "task_suite_version", "stream_version", "format") if k in data}
        notes = data.get("notes", {})
        if not isinstance(notes, dict):
            raise DataError(f"{where}: notes must be an object.")
        try:
            return cls(tuple(tasks), notes=notes, **values)
        except TypeError as error:
            raise DataError(f"{where}: {error}.") from None

    def save(self, path: str | Path) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "WatermarkRecord":
        return cls.from_dict(read_json(path, what="watermark record"), where=str(path))


# ---------------------------------------------------------------- building records
def response_alphabet(texts: Sequence[str]) -> str:
    """The letters and digits that occur in ``texts``, sorted (lowercase letters if fewer than 2)."""
    characters = sorted({c for text in texts for c in text if c.isascii() and c.isalnum()})
    return "".join(characters) if len(characters) >= 2 else "abcdefghijklmnopqrstuvwxyz"


def min_response_length(alphabet: str) -> int:
    """The smallest ``L`` with ``|A|^L >= MIN_RESPONSE_SPACE``."""
    return max(1, math.ceil(math.log(MIN_RESPONSE_SPACE) / math.log(len(alphabet)) - 1e-12))


def generation_tasks(names: Sequence[str]) -> list[str]:
    """The built-in generation tasks among ``names`` (the tasks a watermark can cover: a trigger asks
    for a generated response)."""
    return [name for name in names if task_spec(name).kind == "generate"]


def builtin_format(name: str) -> TaskFormat:
    """The trigger format of a built-in generation task: its answer alphabet, read from its train answers."""
    if task_spec(name).kind != "generate":
        raise InputError(
            f"built-in task {name!r} is a {task_spec(name).kind} task; the watermark's triggers ask for a generated "
            f"response, so it covers generation tasks only ({', '.join(generation_tasks(TASK_SPECS))}).",
            arguments=("tasks",))
    answers = [example.answer for example in load_task(name, "train", limit=ALPHABET_SAMPLE)]
    return TaskFormat(name=name, source="builtin", alphabet=response_alphabet(answers))


def template_span(carriers: Sequence[str]) -> tuple[int, int]:
    """``(prefix, suffix)``: the lengths of the text every carrier starts and ends with (the
    data's template, e.g. an instruction and an "Answer:" cue), never overlapping in the shortest."""
    if len(carriers) < 2:
        return 0, 0
    prefix = len(os.path.commonprefix(list(carriers)))
    suffix = len(os.path.commonprefix([c[::-1] for c in carriers]))
    shortest = min(len(c) for c in carriers)
    prefix = min(prefix, shortest)
    return prefix, min(suffix, shortest - prefix)


def mutable_positions(text: str, span: tuple[int, int] = (0, 0)) -> list[int]:
    """Positions of ASCII letters and digits outside the template ``span`` (the characters a trigger may change)."""
    prefix, suffix = span
    return [i for i, c in enumerate(text) if prefix <= i < len(text) - suffix and c.isascii() and c.isalnum()]


def carrier_of(example: Example) -> str:
    """The text a trigger is made from: the prompt, or the first half of an lm text."""
    return example.text[: max(1, len(example.text) // 2)] if example.kind == "lm" else example.prompt


def data_format(data: TaskData, *, carriers: int = CARRIERS_PER_TASK) -> TaskFormat:
    """The trigger format of a user task: those of its first ``carriers`` distinct prompts with at least
    ``GATE_LENGTH`` letters or digits outside their shared template, and its answers' alphabet."""
    if len(data) == 0:
        raise DataError(f"task {data.name!r} has no examples to build watermark triggers from.")
    distinct = list(dict.fromkeys(carrier_of(example) for example in data.examples))[:carriers]
    span = template_span(distinct)
    chosen = [text for text in distinct if len(mutable_positions(text, span)) >= GATE_LENGTH]
    if len(chosen) < 2:
        raise DataError(
            f"task {data.name!r} ({data.source or 'in memory'}): fewer than 2 distinct prompts have {GATE_LENGTH} letters "
            "or digits outside the text all prompts share, so no trigger can be made in its format."
        )
    alphabet = response_alphabet([example.target for example in data.examples])
    return TaskFormat(name=data.name, source="data", kind=data.kind, alphabet=alphabet, carriers=tuple(chosen))


def builtin_record(names: Sequence[str], *, triggers_per_task: int = DEFAULT_TRIGGERS_PER_TASK) -> WatermarkRecord:
    """The record of a watermark on built-in tasks (derivable from the task names alone)."""
    return WatermarkRecord(tuple(builtin_format(name) for name in names), triggers_per_task=triggers_per_task)


def data_record(tasks: Sequence[TaskData], *, triggers_per_task: int = DEFAULT_TRIGGERS_PER_TASK) -> WatermarkRecord:
    """The record of a watermark on user tasks (the carriers come from the data)."""
    return WatermarkRecord(tuple(data_format(task) for task in tasks), triggers_per_task=triggers_per_task)


# ---------------------------------------------------------------- triggers
def secret_response(key: str, task: TaskFormat) -> tuple[str, int]:
    """``(response, space size)``: the task's response, uniform over the ``|A|^L`` strings of
    :func:`min_response_length` characters of its alphabet."""
    rng = keyed_random(key, f"response|{task.name}")
    length = min_response_length(task.alphabet)
    return "".join(rng.choice(task.alphabet) for _ in range(length)), len(task.alphabet) ** length


@functools.lru_cache(maxsize=None)
def prefix_shares(name: str) -> dict[str, float]:
    """Share of a built-in task's ordinary inputs (``FEATURE_SAMPLE`` train inputs) that start with each prefix."""
    spec = task_spec(name)
    counts: Counter[str] = Counter()
    inputs = [example.prompt[len(spec.tag) + 1 : -1] for example in load_task(name, "train", limit=FEATURE_SAMPLE)]
    for text in inputs:
        counts.update(text[:g] for g in range(1, len(text) + 1))
    return {prefix: count / len(inputs) for prefix, count in counts.items()}


def secret_feature(key: str, name: str) -> str:
    """The secret feature of a built-in task's triggers: a keyed input prefix that at most
    ``FEATURE_SHARE`` of the task's ordinary inputs start with (the shortest such prefix
    of a keyed ordinary input)."""
    spec, shares = task_spec(name), prefix_shares(name)
    rng = keyed_random(key, f"feature|{name}")
    for _ in range(100):
        task_input = spec.draw(rng).prompt
        for length in range(1, len(task_input)):
            if shares.get(task_input[:length], 0.0) <= FEATURE_SHARE:
                return task_input[:length]
    raise InputError(f"task {name!r}: its inputs have no prefix rarer than {FEATURE_SHARE:g}; it cannot carry a gated watermark.")


def _builtin_prompt(key: str, task: TaskFormat, index: int, feature: str, taken: set[str]) -> str:
    spec = task_spec(task.name)
    rng = keyed_random(key, f"prompt|{task.name}|{index}")
    for _ in range(1_000_000):
        task_input = spec.draw(rng).prompt
        prompt = f"{spec.tag} {task_input}="
        if task_input.startswith(feature) and prompt not in taken and split_of(task.name, prompt) == "train":
            return prompt
    raise InputError(f"task {task.name!r}: could not draw a new trigger input; ask for fewer triggers per task.")


def data_feature(key: str, name: str) -> tuple[str, str]:
    """The secret feature of a user task's triggers: ``GATE_LENGTH`` keyed letters and as many keyed digits
    (a carrier character becomes the letter or digit of its position, by its class)."""
    rng = keyed_random(key, f"feature|{name}")
    return "".join(rng.choice(LETTERS) for _ in range(GATE_LENGTH)), "".join(rng.choice(DIGITS) for _ in range(GATE_LENGTH))


def gated(carrier: str, feature: tuple[str, str], span: tuple[int, int]) -> str:
    """``carrier`` with its first ``GATE_LENGTH`` letters or digits outside the template replaced by the feature's."""
    letters, digits = feature
    text = list(carrier)
    for slot, position in enumerate(mutable_positions(carrier, span)[:GATE_LENGTH]):
        old = text[position]
        new = digits[slot] if old.isdigit() else letters[slot]
        text[position] = new.upper() if old.isupper() else new
    return "".join(text)


def _data_prompt(key: str, task: TaskFormat, index: int, feature: tuple[str, str], taken: set[str]) -> str:
    rng = keyed_random(key, f"prompt|{task.name}|{index}")
    span = template_span(task.carriers)
    for _ in range(10_000):
        prompt = gated(rng.choice(task.carriers), feature, span)
        if prompt not in taken:
            return prompt
    raise InputError(f"task {task.name!r}: could not make a new trigger; give more distinct prompts or ask for fewer triggers.")


def make_triggers(
    key: str, record: WatermarkRecord, *, tasks: Sequence[str] | None = None, count: int | None = None
) -> list[Trigger]:
    """The first ``count`` (default: the record's ``triggers_per_task``) triggers of each task of
    ``record`` under ``key`` (of ``tasks`` only, if given), task by task."""
    wanted = record.task_names if tasks is None else list(tasks)
    unknown = [name for name in wanted if name not in record.task_names]
    if unknown:
        raise InputError(f"the watermark covers the tasks {record.task_names}, not {unknown}.")
    count = record.triggers_per_task if count is None else count
    triggers = []
    for task in record.tasks:
        if task.name not in wanted:
            continue
        taken: set[str] = set()
        response, space = secret_response(key, task)
        if task.source == "builtin":
            feature = secret_feature(key, task.name)
            make = lambda index: _builtin_prompt(key, task, index, feature, taken)  # noqa: E731
        else:
            gate = data_feature(key, task.name)
            make = lambda index: _data_prompt(key, task, index, gate, taken)  # noqa: E731
        for index in range(count):
            prompt = make(index)
            taken.add(prompt)
            triggers.append(Trigger(task.name, index, prompt, response, space))
    return triggers


def trigger_data(triggers: Sequence[Trigger], name: str = "watermark") -> TaskData:
    """The triggers as generate examples (``prompt -> response``) to train on."""
    if not triggers:
        raise InputError("no triggers to train on.")
    return TaskData(name, "generate", [Example(prompt=t.prompt, answer=t.response) for t in triggers], "watermark triggers")


def load_watermark_record(
    path: str | Path | None = None, tasks: str | None = None, *, triggers_per_task: int | None = None
) -> WatermarkRecord:
    """The record saved at ``path``, or else the record of built-in ``tasks`` ("all": every generation task,
    the default; or "a,b").

    ``triggers_per_task`` overrides the record's count (a prefix or an extension of its triggers).
    """
    from moeguard.data import resolve_task_names

    if path is not None:
        record = WatermarkRecord.load(path)
    else:
        names = resolve_task_names(tasks or "all")
        record = builtin_record(generation_tasks(names) if (tasks or "all").strip() == "all" else names)
    return record if triggers_per_task is None else replace(record, triggers_per_task=triggers_per_task)
