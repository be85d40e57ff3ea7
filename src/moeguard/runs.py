"""Resumable runs: the one way moeguard saves interrupted work and picks it up again.

A run lives in a directory. The first thing written there, atomically, is
``moeguard_run.json``: what the run is (``kind``), the settings it was started
with, and the code that started it (moeguard's version and a hash of its source
files). Opening the directory again

- without that file starts a new run there;
- with the same kind, settings and code continues the run from what it saved;
- with anything else is refused (:class:`~moeguard.errors.ResumeError`), naming
  each setting that differs, from the first step on: a run is never continued
  with settings, data, weights or code other than its own, and a fixed bug never
  leaves stale numbers behind.

Everything a run saves goes through it and is written atomically (JSON, and
tensors as safetensors, never pickles), so an interruption at any moment leaves
the last saved state whole. Each unit of work is counted as ``reused`` (found
saved) or ``computed``, so callers and tests see what a resume skipped.

Caches whose entries are looked up by their inputs (the audit's stages) are a
:class:`RunCache`: every entry's name is a hash of its inputs and of the code
version, so changed inputs or code make a new entry instead of a refusal.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import moeguard
from moeguard.errors import InputError, ResumeError
from moeguard.io import atomic_write_bytes, read_json, write_json

RUN_FILE = "moeguard_run.json"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``"<moeguard version>+<hash>"``: the version and a SHA-256 over every source file of the package."""
    root = Path(moeguard.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root).as_posix()}\n".encode())
        digest.update(path.read_bytes())
    return f"{moeguard.__version__}+{digest.hexdigest()[:12]}"


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, Paths strings), for comparing settings."""
    return json.loads(json.dumps(value, default=str))


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short hash of ``settings`` and of the code version (JSON; key order irrelevant)."""
    text = json.dumps({"settings": as_json(settings), "code": code_version()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def partial_path(out: str | Path) -> Path:
    """Where the unfinished state of an output is kept: the hidden sibling ``.<name>.partial``."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, (str, list, dict)) or len(json.dumps(value)) <= 32 else ""


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """One phrase per top-level setting that differs: ``label: name=old (now new), ...`` or ``label (old, now new)``."""
    phrases = []
    for key in dict.fromkeys([*saved, *wanted]):
        old, new = saved.get(key), wanted.get(key)
        if old == new:
            continue
        label = labels.get(key, key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed = [f"{name}={old.get(name)!r} (now {new.get(name)!r})" for name in dict.fromkeys([*old, *new])
                       if old.get(name) != new.get(name)]
            phrases.append(f"{label}: {', '.join(changed)}")
        elif _shown(old) and _shown(new):
            phrases.append(f"{label} ({_shown(old)}, now {_shown(new)})")
        else:
            phrases.append(label)
    return phrases


@dataclass
class Run:
    """An open run directory (see the module docstring). Use :meth:`open`."""

    path: Path
    kind: str
    settings: dict[str, Any]
    resumed: bool = False
    reused: int = 0
    computed: int = 0

    @staticmethod
    def record(path: str | Path) -> dict[str, Any] | None:
        """The run file of the directory ``path`` (what it holds), or None when it holds no run."""
        file = Path(path) / RUN_FILE
        return read_json(file, what="run record") if file.is_file() else None

    @classmethod
    def open(
        cls,
        path: str | Path,
        kind: str,
        settings: Mapping[str, Any],
        *,
        labels: Mapping[str, str] | None = None,
    ) -> "Run":
        """Start a run in ``path``, or continue the one there if it is the same run; refuse any other.

        ``labels`` name the top-level settings in the refusal (e.g. ``{"config": "options"}``).
        """
        path = Path(path)
        wanted = as_json(dict(settings))
        saved = cls.record(path)
        if saved is None:
            if path.exists() and not path.is_dir():
                raise InputError(f"{path} exists and is not a directory; choose another path for the {kind}.")
            path.mkdir(parents=True, exist_ok=True)
            write_json(path / RUN_FILE, {"kind": kind, "code": code_version(), "settings": wanted})
            return cls(path, kind, wanted)
        if saved.get("kind") != kind:
            raise ResumeError(f"{path} holds {_a(str(saved.get('kind')))}, not {_a(kind)}; choose another directory.")
        differences = _differences(saved.get("settings", {}), wanted, labels or {})
        if saved.get("code") != code_version():
            differences.append(f"code (moeguard {saved.get('code')}, now {code_version()})")
        if differences:
            raise ResumeError(
                f"{path} holds {_a(kind)} started with other {'; other '.join(differences)}. Continue it with the "
                f"settings it was started with, or delete it (or choose another directory) to start over."
            )
        return cls(path, kind, wanted, resumed=True)

    # ------------------------------------------------------------ saved state
    def file(self, name: str) -> Path:
        """The path of a file of this run (refused if ``name`` would leave the run directory)."""
        path = self.path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise InputError(f"{name!r} is not a file name inside the run directory {self.path}.")
        return path

    def load_json(self, name: str) -> Any | None:
        """A JSON file saved by this run, or None if it was not saved (yet)."""
        path = self.file(name)
        return read_json(path, what=f"saved {self.kind} state") if path.is_file() else None

    def save_json(self, name: str, value: Any) -> Path:
        path = self.file(name)
        write_json(path, value)
        return path

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """Tensors saved with :meth:`save_tensors`, or None if they were not saved (yet)."""
        from safetensors.torch import load

        path = self.file(name)
        if not path.is_file():
            return None
        try:
            return load(path.read_bytes())
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise InputError(f"{path} is not a readable safetensors file ({error}); delete {self.path} to start over.") from None

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write ``tensors`` (moved to CPU, made contiguous) as one safetensors file, atomically."""
        from safetensors.torch import save

        path = self.file(name)
        atomic_write_bytes(path, save({key: t.detach().cpu().contiguous() for key, t in tensors.items()}))
        return path

    def get_or_compute(self, name: str, compute: Callable[[], Any]) -> Any:
        """The JSON value saved under ``name``, or ``compute()`` saved there (one unit of work, counted)."""
        saved = self.load_json(name)
        if saved is not None:
            self.reused += 1
            return saved["value"]
        value = compute()
        self.save_json(name, {"value": value})
        self.computed += 1
        return value

    def remove(self) -> None:
        """Delete the run directory: its state is no longer needed (finished) or must not be reused."""
        shutil.rmtree(self.path, ignore_errors=True)


class RunCache:
    """Entries looked up by their inputs under one directory (see the module docstring).

    :meth:`get_or_compute` keeps a JSON result per (stage, inputs) in
    ``<stage>-<key>.json``; :meth:`directory` names the directory where a stage that
    saves more (its own :class:`Run`) keeps it. Both keys include the code version.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.reused: dict[str, int] = {}
        self.computed: dict[str, int] = {}

    def directory_for(self, stage: str, inputs: Mapping[str, Any]) -> Path:
        return self.directory / f"{stage}-{settings_key(inputs)}"

    def count(self, stage: str, *, reused: int = 0, computed: int = 0) -> None:
        """Record units of work of ``stage`` found saved or computed (for stages that run in their own directory)."""
        self.reused[stage] = self.reused.get(stage, 0) + reused
        self.computed[stage] = self.computed.get(stage, 0) + computed

    def get_or_compute(
        self, stage: str, inputs: Mapping[str, Any], compute: Callable[[], Any]
    ) -> tuple[Any, bool]:
        """``(result, was_cached)``: the saved result of ``stage`` on ``inputs``, or ``compute()`` saved."""
        path = self.directory / f"{stage}-{settings_key(inputs)}.json"
        if path.is_file():
            self.count(stage, reused=1)
            return read_json(path, what="cached stage result")["result"], True
        result = compute()
        write_json(path, {"stage": stage, "code": code_version(), "inputs": as_json(dict(inputs)), "result": result})
        self.count(stage, computed=1)
        return result, False

    def work(self) -> dict[str, dict[str, int]]:
        """Per stage: units of work ``reused`` from the cache and ``computed``."""
        stages = dict.fromkeys([*self.reused, *self.computed])
        return {stage: {"reused": self.reused.get(stage, 0), "computed": self.computed.get(stage, 0)} for stage in stages}
