"""Stage results cached by model fingerprint and inputs, so an audit resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeguard.io import read_json, write_json


def inputs_key(inputs: dict[str, Any]) -> str:
    """A short hash of a stage's inputs (JSON-serialisable; order of keys irrelevant)."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageCache:
    """One JSON file per (stage, inputs) under ``directory``, written atomically.

    The inputs must include everything the result depends on (the model fingerprint,
    the data, the settings); a change of any of them is a new entry.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, stage: str, inputs: dict[str, Any]) -> Path:
        return self.directory / f"{stage}-{inputs_key(inputs)}.json"

    def load(self, stage: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(stage, inputs)
        if not path.is_file():
            return None
        return read_json(path, what="cached stage result")["result"]

    def store(self, stage: str, inputs: dict[str, Any], result: dict[str, Any]) -> None:
        write_json(self.path(stage, inputs), {"stage": stage, "inputs": inputs, "result": result})

    def get_or_compute(
        self, stage: str, inputs: dict[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """``(result, was_cached)``."""
        cached = self.load(stage, inputs)
        if cached is not None:
            return cached, True
        result = compute()
        self.store(stage, inputs, result)
        return result, False
