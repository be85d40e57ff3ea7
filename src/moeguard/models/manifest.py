"""``moeguard_manifest.json``: what a pruned model directory was carved from."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moeguard.errors import InputError
from moeguard.io import read_json

MANIFEST_NAME = "moeguard_manifest.json"
MANIFEST_FORMAT = 1
FINGERPRINT_KINDS = ("model", "checkpoint")
MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
MAX_LINEAGE = 64


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fingerprint(value: Any, where: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InputError(f"{where} must be a SHA-256 hex digest (64 characters 0-9a-f), got {value!r:.80}.")


def _checked_kept(kept: Any, counts: list[int], source: str) -> list[list[int]]:
    """``kept`` if it lists, per parent layer, distinct in-range expert indices (at least one)."""
    if not isinstance(kept, list) or len(kept) != len(counts):
        raise InputError(f"{source}: kept must be a list of {len(counts)} lists of expert indices (one per MoE layer), "
                         f"got {kept!r:.80}.")
    for layer, (indices, count) in enumerate(zip(kept, counts)):
        if not isinstance(indices, list) or not indices or not all(_is_int(i) for i in indices):
            raise InputError(f"{source}: kept[{layer}] must be a non-empty list of expert indices, got {indices!r:.80}.")
        outside = sorted({i for i in indices if not 0 <= i < count})
        if outside:
            raise InputError(f"{source}: kept[{layer}] lists experts {outside}, but the parent layer has {count} "
                             f"(indices 0..{count - 1}).")
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise InputError(f"{source}: kept[{layer}] lists experts {repeated} more than once.")
    return [list(indices) for indices in kept]


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
    def from_dict(cls, data: Any, *, source: str = "manifest", _depth: int = 0) -> "PruneManifest":
        """Read a manifest, checking every field (errors name ``source`` and the field).

        Kept experts must be distinct indices of their parent layer, one list per MoE
        layer with a module path each; fingerprints are SHA-256 hex digests. Nothing
        in a manifest is ever used as a file path: ``parent_model`` is only the
        default parent to load, which must then match ``parent_fingerprint``.
        """
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(data).__name__}; this is not a moeguard prune manifest.")
        required = ("parent_fingerprint", "parent_num_experts", "kept", "layer_paths")
        missing = [name for name in required if name not in data]
        if missing:
            raise InputError(f"{source}: missing field(s) {missing}; this is not a moeguard prune manifest.")
        if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise InputError(f"{source}: manifest format {data.get('format')!r}; this moeguard reads format {MANIFEST_FORMAT}.")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        _check_fingerprint(values["parent_fingerprint"], f"{source}: parent_fingerprint")
        if values.get("parent_fingerprint_kind", "model") not in FINGERPRINT_KINDS:
            raise InputError(f"{source}: parent_fingerprint_kind must be one of {', '.join(FINGERPRINT_KINDS)}, "
                             f"got {values.get('parent_fingerprint_kind')!r}.")
        parent_model = values.get("parent_model")
        if parent_model is not None and (not isinstance(parent_model, str) or not parent_model or any(c in parent_model for c in "\0\n\r")):
            raise InputError(f"{source}: parent_model must be a model path or hub id (one line of text) or null, got {parent_model!r:.80}.")
        counts = values["parent_num_experts"]
        if not isinstance(counts, list) or not counts or not all(_is_int(n) and n > 0 for n in counts):
            raise InputError(f"{source}: parent_num_experts must be a non-empty list of positive integers, got {counts!r:.80}.")
        values["kept"] = _checked_kept(values["kept"], counts, source)
        paths = values["layer_paths"]
        if not isinstance(paths, list) or len(paths) != len(counts) or not all(isinstance(p, str) and MODULE_PATH.fullmatch(p) for p in paths):
            raise InputError(f"{source}: layer_paths must list one module path (e.g. 'model.layers.0.mlp') per MoE layer "
                             f"({len(counts)}), got {paths!r:.120}.")
        for name, kind in (("selection", dict), ("lineage", list), ("moeguard_version", str), ("created", str)):
            if name in values and not isinstance(values[name], kind):
                raise InputError(f"{source}: field {name!r} must be a {kind.__name__}, got {type(values[name]).__name__}.")
        if "lineage" in values:
            if _depth > MAX_LINEAGE:
                raise InputError(f"{source}: the lineage is nested deeper than {MAX_LINEAGE} prunes; the manifest is damaged.")
            for i, entry in enumerate(values["lineage"]):
                cls.from_dict(entry, source=f"{source}: lineage[{i}]", _depth=_depth + 1)
        if "realign" in values:
            records = values["realign"]
            if not isinstance(records, list):
                raise InputError(
                    f"{source}: field 'realign' must be a list of re-alignment records, got {type(records).__name__}."
                )
            values["realign"] = [RealignRecord.from_dict(r, source=f"{source}: realign[{i}]") for i, r in enumerate(records)]
        return cls(**values)

    def check_against(self, layers: Sequence[Any], *, source: str = "manifest") -> None:
        """Refuse a manifest that does not describe ``layers`` (the model's MoE layers beside it):
        one kept list per MoE layer, as many kept experts as the layer has, the same module paths."""
        if len(self.kept) != len(layers):
            raise InputError(f"{source} lists kept experts for {len(self.kept)} MoE layers, but the model has {len(layers)}; "
                             "the manifest belongs to another model.")
        for index, (kept, path, layer) in enumerate(zip(self.kept, self.layer_paths, layers)):
            if len(kept) != layer.num_experts:
                raise InputError(f"{source}: MoE layer {index} keeps {len(kept)} experts by the manifest, but the model's layer "
                                 f"has {layer.num_experts}; the manifest belongs to another model.")
            if path != layer.path:
                raise InputError(f"{source}: MoE layer {index} is {path!r} by the manifest, but {layer.path!r} in the model; "
                                 "the manifest belongs to another model.")

    @classmethod
    def load(cls, path: str | Path) -> "PruneManifest":
        return cls.from_dict(read_json(path, what="prune manifest"), source=str(path))
