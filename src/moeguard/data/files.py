"""User data: JSONL files in the DESIGN.md contract and ``datasets`` sources.

The contract, one JSON object per line:
``{"prompt": str, "answer": str}`` (generate), ``{"prompt": str, "choices": [str, ...],
"label": int}`` (choice), ``{"text": str}`` (lm); a first line may be a header
``{"metric": "rouge_l", "answer_pattern": "..."}`` declaring how generated answers are
scored. Every problem is reported with the file, the line (or row) and the field, and
what was expected there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.data.examples import Example, TaskData, require_examples
from moeguard.data.task_types import CONTRACT, TASK_TYPES, check_metric, kind_of_object, read_field, type_name
from moeguard.errors import DataError, InputError
from moeguard.fields import setting
from moeguard.io import atomic_write_text, check_output

HEADER_FIELDS = ("metric", "answer_pattern")
HEADER = ('a first line {"metric": ..., "answer_pattern": ...} (both optional) declares how generated answers are '
          'scored')


def example_from_json(obj: Any, where: str) -> Example:
    """Validate one contract object and turn it into an :class:`Example` (its task type's ``read``).

    ``where`` (e.g. ``"data.jsonl line 4"``) starts every error message.
    """
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type_name(obj)}; each line must be {CONTRACT}.")
    kind = kind_of_object(obj)
    if kind == "generate" and "prompt" in obj and "answer" not in obj:
        raise DataError(f"{where}: missing field 'answer' (or 'choices' and 'label'); each line must be {CONTRACT}.")
    return TASK_TYPES[kind].read(obj, where)


def is_header(obj: Any) -> bool:
    """Whether a JSON object is a header line (header fields and no example field)."""
    return isinstance(obj, Mapping) and any(f in obj for f in HEADER_FIELDS) and not any(
        f in obj for f in ("prompt", "answer", "choices", "label", "text"))


def read_header(obj: Mapping[str, Any], where: str) -> dict[str, str]:
    """The declarations of a header line, checked (a known field, a string, a regular expression that compiles)."""
    unknown = sorted(set(obj) - set(HEADER_FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown header field(s) {unknown}; a header line holds only {', '.join(HEADER_FIELDS)}.")
    header = {field: read_field(obj, field, str, where) for field in HEADER_FIELDS if field in obj}
    if "answer_pattern" in header:
        check_pattern(header["answer_pattern"], where)
    return header


def check_pattern(pattern: str, where: str) -> None:
    """Refuse an answer pattern that is not a regular expression."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise DataError(f"{where}: answer_pattern {pattern!r} is not a regular expression ({error}).") from None


def declared(from_file: str | None, given: str | None, field: str, where: str) -> str | None:
    """The value of a declaration made by the file's header and/or the caller; they must agree."""
    if from_file is not None and given is not None and from_file != given:
        raise InputError(f"{where} declares {field} {from_file!r}, but {field}={given!r} was given; drop one of them.",
                         arguments=(field,))
    return from_file if from_file is not None else given


def task_from_objects(
    objects: Iterable[tuple[str, Any]], *, name: str, source: str, hint: str = "", metric: str | None = None,
    answer_pattern: str | None = None,
) -> TaskData:
    """A task from ``(where, object)`` pairs; every object must have the kind of the first.

    ``where`` becomes the example's origin; ``hint`` is added to the errors about an object.
    The first object may be a header line (``HEADER_FIELDS``); its declarations and the
    ``metric`` / ``answer_pattern`` given must agree, and the metric must score the kind.
    """
    examples: list[Example] = []
    origins: list[str] = []
    first_where = ""
    header: dict[str, str] = {}
    header_where = source
    for where, obj in objects:
        if not examples and not header and is_header(obj):
            header, header_where = read_header(obj, where), where
            continue
        example = example_from_json(obj, f"{where} ({hint})" if hint else where)
        if examples and example.kind != examples[0].kind:
            raise DataError(
                f"{where}: this is a {example.kind} example, but {first_where} is a {examples[0].kind} example; "
                "a file holds examples of one kind."
            )
        first_where = first_where or where
        examples.append(example)
        origins.append(where)
    if not examples:
        raise DataError(f"{source} holds no examples; each line must be {CONTRACT}.")
    kind = examples[0].kind
    metric = declared(header.get("metric"), metric, "metric", header_where)
    answer_pattern = declared(header.get("answer_pattern"), answer_pattern, "answer_pattern", header_where)
    if metric is not None:
        check_metric(kind, metric, header_where)
    if answer_pattern is not None:
        check_pattern(answer_pattern, header_where)
        if kind != "generate":
            raise DataError(f"{header_where}: answer_pattern extracts generated answers, but {source} holds {kind} examples.")
    return TaskData(name, kind, examples, source, origins, metric=metric, answer_pattern=answer_pattern)


def _jsonl_objects(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None


def load_jsonl(
    path: str | os.PathLike, *, name: str | None = None, metric: str | None = None, answer_pattern: str | None = None
) -> TaskData:
    """Load a JSONL file in the contract; the task is named after the file unless ``name`` is given.

    ``metric`` and ``answer_pattern`` declare how generated answers are scored, as a
    header line of the file can (see :func:`task_from_objects`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (expected a JSONL file, one {CONTRACT} per line).")
    try:
        return task_from_objects(_jsonl_objects(path), name=name or path.stem, source=str(path), metric=metric,
                                 answer_pattern=answer_pattern)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None


def save_jsonl(data: TaskData, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``data`` in the JSONL contract (atomically); an existing file is replaced only with ``overwrite``."""
    path = check_output(path, inputs=[data.source], overwrite=overwrite)
    require_examples(data)
    header = {f: getattr(data, f) for f in HEADER_FIELDS if getattr(data, f) is not None}
    lines = ([json.dumps(header, ensure_ascii=False)] if header else []) + [
        json.dumps(e.to_json(), ensure_ascii=False) for e in data.examples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_hf_dataset(
    path_or_id: str | os.PathLike,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    config_name: str | None = None,
    choices: Sequence[str] | None = None,
    prompt_template: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    metric: str | None = None,
    answer_pattern: str | None = None,
    **load_kwargs: Any,
) -> TaskData:
    """Load a ``datasets`` source (a local data file or directory, a hub id, or a dataset in the user's hub
    cache) as a task, with ``datasets.load_dataset``.

    ``columns`` maps contract fields to dataset columns, e.g. ``{"prompt": "question",
    "answer": "solution"}``; then only the mapped fields are read. Without it the
    columns must carry the contract's field names. A classification set whose label
    indexes a fixed list (GLUE-style) takes ``choices`` (default: the label column's
    class names, when it is a ``ClassLabel``). ``prompt_template`` writes the prompt from
    the row's columns (``"Review: {sentence}\nSentiment:"``). A local ``.jsonl/.json/.csv/
    .parquet/.txt`` file is read with the matching builder as its one split, "train".
    ``metric`` and ``answer_pattern`` declare how generated answers are scored.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("loading a dataset needs the 'datasets' package: pip install datasets") from None

    source = str(path_or_id)
    local = Path(source).expanduser()
    if local.is_file():
        builder = _BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise DataError(f"{local}: cannot tell the format from the suffix {local.suffix!r}; use one of {', '.join(_BUILDERS)}.")
        args, kwargs = (builder,), {"data_files": str(local)}
        split = "train"  # datasets puts a single data file in a "train" split
    else:
        args, kwargs = (source, config_name), {}
    try:
        dataset = datasets.load_dataset(*args, split=split, **kwargs, **load_kwargs)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"cannot load dataset {source!r} (split {split!r}): {message}. Pass a local data file or directory, "
            "or a hub id while the network is available (or cached)."
        ) from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    mapping = dict(columns or {})
    unknown = set(mapping) - {"prompt", "answer", "choices", "label", "text"}
    if unknown:
        raise DataError(f"columns maps unknown fields {sorted(unknown)}; map prompt, answer, choices, label or text.")
    missing = [column for column in mapping.values() if column not in dataset.column_names]
    if missing:
        raise DataError(f"dataset {source!r} has no column(s) {missing}; its columns are {dataset.column_names}.")
    label_column = mapping.get("label", "label" if not mapping else None)
    if choices is None and "choices" not in mapping and label_column in dataset.column_names:
        feature = dataset.features[label_column]
        choices = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if choices is not None and len(choices) < 2:
        raise DataError(f"choices={list(choices)} for dataset {source!r}: give at least two choices.", arguments=("choices",))

    hint = f"mapped by columns={mapping}" if mapping else f"its columns are {dataset.column_names}; map them with columns="

    def objects() -> Iterable[tuple[str, Any]]:
        for row_number, row in enumerate(dataset):
            where = f"{source} row {row_number}"
            obj = {field: row[column] for field, column in mapping.items()} if mapping else dict(row)
            if prompt_template is not None:
                obj["prompt"] = fill_template(prompt_template, row, f"{where} ({hint})")
            if choices is not None and "choices" not in obj and "label" in obj:
                obj["choices"] = list(choices)
            yield where, obj

    return task_from_objects(objects(), name=name or Path(source).stem or source, source=f"{source}:{split}", hint=hint,
                             metric=metric, answer_pattern=answer_pattern)


def fill_template(template: str, row: Mapping[str, Any], where: str) -> str:
    """``template`` with ``{column}`` replaced by the row's values."""
    try:
        return template.format(**row)
    except KeyError as error:
        raise DataError(f"{where}: prompt_template names the column {error}, which the row does not have; its columns "
                        f"are {sorted(row)}.", arguments=("prompt_template",)) from None
    except (IndexError, ValueError) as error:
        raise DataError(f"prompt_template {template!r} is not a format string over column names ({error}).",
                        arguments=("prompt_template",)) from None


CONTRACT_FIELDS = ("prompt", "answer", "choices", "label", "text")


@dataclass(frozen=True)
class DatasetSource:
    """A task read from a ``datasets`` source (the settings behind ``--hf-dataset`` and its field flags;
    :meth:`load` calls :func:`load_hf_dataset`)."""

    hf_dataset: str | None = setting(None, "a datasets source: hub id (offline: from the hub cache), local directory or "
                                     "data file (.jsonl/.json/.csv/.parquet/.txt)")
    split: str = setting("train", "the dataset split to read")
    hf_config: str | None = setting(None, "the dataset's configuration name (e.g. sst2 of glue)")
    prompt_field: str | None = setting(None, "column holding the prompt")
    answer_field: str | None = setting(None, "column holding the reference answer (generation)")
    choices_field: str | None = setting(None, "column holding the list of choices (classification)")
    label_field: str | None = setting(None, "column holding the index of the right choice (classification)")
    text_field: str | None = setting(None, "column holding the text (language modelling)")
    choices: tuple[str, ...] | None = setting(None, "the choices every label indexes (default: the label column's "
                                              "class names)")
    prompt_template: str | None = setting(None, "the prompt as a format string over the row's columns, e.g. "
                                          "'Review: {sentence} Sentiment:'")

    def columns(self) -> dict[str, str]:
        """The contract field -> dataset column mapping the ``*_field`` settings give."""
        return {field: getattr(self, f"{field}_field") for field in CONTRACT_FIELDS if getattr(self, f"{field}_field")}

    def load(self, *, limit: int | None = None, metric: str | None = None, answer_pattern: str | None = None) -> TaskData:
        if self.hf_dataset is None:
            raise InputError("no dataset named; give `hf_dataset` (a hub id, directory or data file).",
                             arguments=("hf_dataset",))
        return load_hf_dataset(self.hf_dataset, split=self.split, config_name=self.hf_config, columns=self.columns() or None,
                               choices=self.choices, prompt_template=self.prompt_template, limit=limit, metric=metric,
                               answer_pattern=answer_pattern)
