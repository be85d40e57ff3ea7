"""User data: JSONL files in the DESIGN.md contract and ``datasets`` sources.

The contract, one JSON object per line:
``{"prompt": str, "answer": str}`` (generate), ``{"prompt": str, "choices": [str, ...],
"label": int}`` (choice), ``{"text": str}`` (lm). Every problem is reported with the
file, the line (or row) and the field, and what was expected there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moeguard.data.examples import Example, TaskData, require_examples
from moeguard.errors import DataError
from moeguard.io import atomic_write_text, check_output

CONTRACT = (
    '{"prompt": str, "answer": str} (generate), {"prompt": str, "choices": [str, ...], "label": int} (choice) '
    'or {"text": str} (lm)'
)


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def _field(obj: Mapping[str, Any], field: str, expected: type, where: str) -> Any:
    if field not in obj:
        raise DataError(f"{where}: missing field {field!r}; each line must be {CONTRACT}.")
    value = obj[field]
    if not isinstance(value, expected) or isinstance(value, bool) and expected is not bool:
        expected_name = {str: "a string", int: "an integer", list: "a list of strings"}[expected]
        raise DataError(f"{where}: field {field!r} must be {expected_name}, got {_type_name(value)} {value!r:.60}.")
    return value


def example_from_json(obj: Any, where: str) -> Example:
    """Validate one contract object and turn it into an :class:`Example`.

    ``where`` (e.g. ``"data.jsonl line 4"``) starts every error message.
    """
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}; each line must be {CONTRACT}.")
    if "text" in obj:
        text = _field(obj, "text", str, where)
        if not text.strip():
            raise DataError(f"{where}: field 'text' is empty; a language-modelling line needs text to score (drop the line).")
        return Example(text=text)
    prompt = _field(obj, "prompt", str, where)
    if "choices" in obj or "label" in obj:
        choices = _field(obj, "choices", list, where)
        if not choices:
            raise DataError(f"{where}: field 'choices' is empty; give at least two choices.")
        for position, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise DataError(f"{where}: field 'choices' item {position} must be a string, got {_type_name(choice)} {choice!r:.60}.")
        label = _field(obj, "label", int, where)
        if not 0 <= label < len(choices):
            raise DataError(f"{where}: field 'label' is {label}, but it must index 'choices' (0..{len(choices) - 1}).")
        return Example(prompt=prompt, choices=tuple(choices), label=label)
    if "answer" not in obj:
        raise DataError(f"{where}: missing field 'answer' (or 'choices' and 'label'); each line must be {CONTRACT}.")
    answer = _field(obj, "answer", str, where)
    if not answer.strip():
        raise DataError(f"{where}: field 'answer' is empty; every example needs an answer to produce and score.")
    return Example(prompt=prompt, answer=answer)


def task_from_objects(objects: Iterable[tuple[str, Any]], *, name: str, source: str, hint: str = "") -> TaskData:
    """A task from ``(where, object)`` pairs; every object must have the kind of the first.

    ``where`` becomes the example's origin; ``hint`` is added to the errors about an object.
    """
    examples: list[Example] = []
    origins: list[str] = []
    first_where = ""
    for where, obj in objects:
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
    return TaskData(name, examples[0].kind, examples, source, origins)


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


def load_jsonl(path: str | os.PathLike, *, name: str | None = None) -> TaskData:
    """Load a JSONL file in the contract; the task is named after the file unless ``name`` is given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (expected a JSONL file, one {CONTRACT} per line).")
    try:
        return task_from_objects(_jsonl_objects(path), name=name or path.stem, source=str(path))
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None


def save_jsonl(data: TaskData, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``data`` in the JSONL contract (atomically); an existing file is replaced only with ``overwrite``."""
    path = check_output(path, inputs=[data.source], overwrite=overwrite)
    require_examples(data)
    atomic_write_text(path, "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in data.examples))
    return path


_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_hf_dataset(
    path_or_id: str | os.PathLike,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    config_name: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    **load_kwargs: Any,
) -> TaskData:
    """Load a ``datasets`` source (a local data file or directory, or a hub id) as a task.

    ``columns`` maps contract fields to dataset columns, e.g. ``{"prompt": "question",
    "answer": "solution"}``; then only the mapped fields are read. Without it the
    columns must carry the contract's field names. A local ``.jsonl/.json/.csv/
    .parquet/.txt`` file is read with the matching builder as its one split, "train".
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
            "or a hub id while the network is available."
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

    hint = f"mapped by columns={mapping}" if mapping else f"its columns are {dataset.column_names}; map them with columns="

    def objects() -> Iterable[tuple[str, Any]]:
        for row_number, row in enumerate(dataset):
            obj = {field: row[column] for field, column in mapping.items()} if mapping else row
            yield f"{source} row {row_number}", obj

    return task_from_objects(objects(), name=name or Path(source).stem or source, source=f"{source}:{split}", hint=hint)
