"""``moeguard_manifest.json``: what a pruned model directory was carved from."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeguard.errors import InputError
from moeguard.io import read_json

MANIFEST_NAME = "moeguard_manifest.json"
MANIFEST_FORMAT = 1


@dataclass
class PruneManifest:
    """The record a physical prune leaves beside the model.

    ``kept[l]`` lists, for MoE layer ``l``, the parent's expert indices that survive,
    in the order they appear in the pruned model. ``layer_paths[l]`` is that layer's
    module path. ``selection`` says how the experts were chosen (criterion, keep
    count, attribution file, task...). ``lineage`` holds the parent's own manifest
    when the parent was itself pruned. ``parent_fingerprint_kind`` says what
    ``parent_fingerprint`` hashes: ``"model"`` (:meth:`MoEModel.fingerprint`, the
    in-memory weights) or ``"checkpoint"`` (:func:`checkpoint_fingerprint`, the
    stored tensors, recorded by a streaming prune that never loads the model).
    """

    parent_fingerprint: str
    parent_model: str | None
    parent_num_experts: list[int]
    kept: list[list[int]]
    layer_paths: list[str]
    selection: dict[str, Any] = field(default_factory=dict)
    moeguard_version: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    lineage: list[dict[str, Any]] = field(default_factory=list)
    parent_fingerprint_kind: str = "model"
    format: int = MANIFEST_FORMAT

    @property
    def keep_count(self) -> int | None:
        counts = {len(k) for k in self.kept}
        return counts.pop() if len(counts) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "manifest") -> "PruneManifest":
        required = ("parent_fingerprint", "parent_num_experts", "kept", "layer_paths")
        missing = [name for name in required if name not in data]
        if missing:
            raise InputError(f"{source}: missing field(s) {missing}; this is not a moeguard prune manifest.")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "PruneManifest":
        return cls.from_dict(read_json(path, what="prune manifest"), source=str(path))
