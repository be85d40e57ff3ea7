"""``moeguard_manifest.json``: what a pruned model directory was carved from."""

from __future__ import annotations

import datetime as _dt
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moeguard.errors import InputError
from moeguard.io import read_json

MANIFEST_NAME = "moeguard_manifest.json"
MANIFEST_FORMAT = 1


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RealignRecord:
    """What one re-alignment (``moeguard realign``) did to a pruned model.

    ``parent_fingerprint`` is the :meth:`MoEModel.fingerprint` of the model that was
    re-aligned (the pruned model as it was loaded); ``fingerprint`` is that of the
    re-aligned weights written beside the manifest, so either end can be checked.
    The manifest's own ``parent_fingerprint`` and ``kept`` still describe the
    unpruned model the experts were carved from: re-alignment changes weights, not
    which experts exist. ``labels`` examples of ``task`` were labelled (of a
    ``budget``), chosen by ``acquisition``; ``steps`` optimizer steps over
    ``tokens`` tokens trained ``scope`` (``lora_rank`` set only for LoRA, whose
    adapters are merged into the written weights). ``data_signature`` hashes the
    pool, test set and other tasks the run saw.
    """

    parent_fingerprint: str
    fingerprint: str
    task: str
    scope: str
    acquisition: str
    labels: int
    budget: int
    rounds: int
    steps: int
    tokens: int
    lr: float
    seed: int
    unpruned_accuracy: float
    pruned_accuracy: float
    accuracy: float
    retention: float
    data_signature: str = ""
    lora_rank: int | None = None
    parent_fingerprint_kind: str = "model"
    moeguard_version: str = ""
    created: str = field(default_factory=_utc_now)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "realign record") -> "RealignRecord":
        """Check the fields' presence and types (errors name ``source`` and the field); unknown keys are ignored."""
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected an object describing one re-alignment, got {type(data).__name__}.")
        values = {}
        for spec in fields(cls):
            if spec.name not in data:
                if spec.default is not MISSING or spec.default_factory is not MISSING:
                    continue
                raise InputError(f"{source}: missing field {spec.name!r} of a re-alignment record.")
            values[spec.name] = _checked(data[spec.name], spec.type, f"{source}.{spec.name}")
        return cls(**values)


def _checked(value: Any, annotation: Any, where: str) -> Any:
    """``value`` if it fits the field's annotation (``str``, ``int``, ``float``, ``int | None``), else a clear error."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = text.endswith("| None")
    if value is None and optional:
        return None
    base = text.replace("| None", "").strip()
    if base == "str" and isinstance(value, str):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise InputError(f"{where}: expected {text}, got {value!r}.")


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
    ``realign`` lists the re-alignments applied to the pruned weights since the
    prune, oldest first (:class:`RealignRecord`; empty for a model as pruned).
    """

    parent_fingerprint: str
    parent_model: str | None
    parent_num_experts: list[int]
    kept: list[list[int]]
    layer_paths: list[str]
    selection: dict[str, Any] = field(default_factory=dict)
    moeguard_version: str = ""
    created: str = field(default_factory=_utc_now)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    parent_fingerprint_kind: str = "model"
    realign: list[RealignRecord] = field(default_factory=list)
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
        values = {k: v for k, v in data.items() if k in known}
        if "realign" in values:
            records = values["realign"]
            if not isinstance(records, list):
                raise InputError(
                    f"{source}: field 'realign' must be a list of re-alignment records, got {type(records).__name__}."
                )
            values["realign"] = [RealignRecord.from_dict(r, source=f"{source}: realign[{i}]") for i, r in enumerate(records)]
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "PruneManifest":
        return cls.from_dict(read_json(path, what="prune manifest"), source=str(path))
