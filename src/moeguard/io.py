"""Safe output: everything moeguard writes appears whole or not at all, and never over an input.

Outputs are written under a temporary sibling path and renamed into place, so an
interrupted run never leaves a half-written model or report that looks complete.
Before any work starts, every path a command will write is checked by
:func:`check_output`: an output may not be, contain or lie inside any input of the
same command (a model directory, a parent, an attribution, a data file, a protocol),
``overwrite=True`` or not, and an existing output is replaced only with
``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moeguard.errors import InputError


PathLike = str | os.PathLike


def _resolved(path: PathLike) -> Path:
    """``path`` made absolute with symlinks followed (as far as it exists), for comparisons."""
    return Path(path).expanduser().resolve()


def refuse_overlap(outputs: Iterable[PathLike], inputs: Iterable[PathLike | None]) -> None:
    """Refuse any output that is, contains or lies inside one of ``inputs``.

    Replacing or writing into such a path could destroy or alter an input, so this
    holds whatever ``overwrite`` says. Inputs that do not exist on this machine (a
    hub id, a built-in task name) cannot be touched and are skipped.
    """
    existing = [(str(item), _resolved(item)) for item in inputs if item is not None and Path(item).expanduser().exists()]
    for output in outputs:
        target = _resolved(output)
        for shown, source in existing:
            if target == source:
                relation = "is the input"
            elif source.is_relative_to(target):
                relation = "contains the input"
            elif target.is_relative_to(source):
                relation = "lies inside the input"
            else:
                continue
            raise InputError(
                f"the output {output} {relation} {shown}; writing there could destroy or change it. "
                "Choose an output path outside every input."
            )


def check_output(
    path: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    directory: bool = False,
    resumable: bool = False,
) -> Path:
    """Check an output path before any work starts; return it as a :class:`Path`.

    The output must not overlap an input (:func:`refuse_overlap`). An existing
    output is refused unless ``overwrite`` (or ``resumable``: a run directory the
    command continues), and must be of the right kind: a directory when
    ``directory``, else a file. A directory replaced with ``overwrite`` must look
    like one moeguard wrote (a model directory with config.json, or empty), so a
    mistyped path never deletes an unrelated folder.
    """
    path = Path(path)
    refuse_overlap([path], inputs)
    if not path.exists():
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise InputError(f"the output {path} cannot be created: {parent} is a file, so nothing can be written inside it.")
        return path
    if directory and not path.is_dir():
        raise InputError(f"the output {path} exists and is a file, not a directory; choose a directory path.")
    if not directory and path.is_dir():
        raise InputError(f"the output {path} is a directory; give a file path (e.g. {path / 'out.json'}).")
    if resumable:
        return path
    if not overwrite:
        raise InputError(f"{path} already exists; choose another output path or pass overwrite=True.", arguments=("overwrite",))
    if directory and any(path.iterdir()) and not (path / "config.json").is_file():
        raise InputError(
            f"{path} is a directory that holds no model (no config.json); overwrite replaces only a model "
            "directory written before. Choose another output path or remove it yourself."
        )
    return path


def check_outputs(paths: Iterable[PathLike | None], *, inputs: Iterable[PathLike | None] = (), overwrite: bool = False) -> None:
    """:func:`check_output` for several output files of one command (``None`` entries skipped)."""
    inputs = list(inputs)
    for path in paths:
        if path is not None:
            check_output(path, inputs=inputs, overwrite=overwrite)


def _temporary_sibling(path: Path, suffix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block succeeds.

    On an exception the temporary directory is removed and ``path`` is untouched.
    An existing ``path`` is replaced only with ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another output path or pass overwrite=True.", arguments=("overwrite",))
    if path.exists() and not path.is_dir():
        raise InputError(f"the output {path} exists and is a file, not a directory; choose a directory path.")
    tmp = _temporary_sibling(path, ".tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = _temporary_sibling(path, ".old")
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (keys in insertion order)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{what} {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}).") from None
