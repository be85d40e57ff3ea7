"""The selective fine-tuning protocol file: what an authorised fine-tune may change.

The owner lists the parameter groups (see :mod:`moeguard.defense.parameter_groups`)
an authorised fine-tune may change, for example the routers and the attention;
everything else is frozen. The file pins the released weights with content hashes:

- per tensor: the SHA-256 of every state-dict tensor, and per frozen group the
  hash over its tensors' hashes;
- per MoE layer and expert index: the hash of that expert's slice of the fused
  expert tensors, and of its row of the router's expert-indexed tensors.

Per-expert hashes let the verifier recognise experts wherever they end up, so it
can say which were removed, reordered or changed.

A protocol must be self-consistent, or it is refused when read:

- ``sha256`` hashes the whole file (every other field, canonical JSON): an edit made
  after writing, such as adding "experts" to ``permitted``, no longer matches it;
- the hash of each frozen group is recomputed from the tensor hashes, and there is
  one for exactly the groups ``permitted`` leaves frozen;
- with the parent model at hand (``moeguard verify`` always has it), everything but
  ``permitted`` is derived from the parent again and must equal the file.

What the hash does not do: it is not a signature. Whoever can edit the file can also
recompute the hash, so it catches accidental and careless edits, not a deliberate
forgery. Against that, keep the protocol's SHA-256 where the fine-tuner cannot change
it (it is printed when the protocol is written and stored in ``harden_report.json``)
and pin it when checking (``expected_sha256``, ``moeguard verify --protocol-sha256``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import moeguard
from moeguard.defense.parameter_groups import check_group_names, parameter_groups
from moeguard.errors import InputError
from moeguard.io import read_json, write_json
from moeguard.models import MoEModel
from moeguard.models.fingerprint import combine_digests, tensor_digest, update_with_tensor
from moeguard.models.layers import ExpertTensor, MoELayer

PROTOCOL_KIND = "moeguard-fine-tuning-protocol"
PROTOCOL_FORMAT = 2  # 2: hashed as a whole (sha256) and checked for self-consistency on read
PROTOCOL_NAME = "moeguard_protocol.json"  # the protocol written beside a hardened model
DEFAULT_PERMITTED = ("router", "attention")
# Everything in a protocol except the owner's choice (permitted) and notes: derived from the parent again on verify.
DERIVED_FIELDS = ("parent_fingerprint", "model_type", "groups", "tensor_hashes", "tensor_shapes", "group_hashes", "layers")


def content_hash(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def slice_hash(layer: MoELayer, refs: list[ExpertTensor], expert: int) -> str:
    """SHA-256 of expert ``expert``'s slice of ``refs`` (names relative to the MoE block)."""
    digest = hashlib.sha256()
    for ref in sorted(refs, key=lambda r: r.name):
        update_with_tensor(digest, ref.name.removeprefix(layer.path + "."), ref.get().select(ref.dim, expert))
    return digest.hexdigest()


def expert_hashes(layer: MoELayer) -> list[str]:
    """One hash per expert of the layer's fused expert tensors."""
    return [slice_hash(layer, layer.tensors("experts"), i) for i in range(layer.num_experts)]


def router_row_hashes(layer: MoELayer) -> list[str]:
    """One hash per expert of its rows of the router's (and block's) expert-indexed tensors."""
    refs = layer.tensors("router") + layer.tensors("block")
    return [slice_hash(layer, refs, i) for i in range(layer.num_experts)]


@dataclass
class LayerRecord:
    """What the protocol pins of one MoE layer."""

    path: str
    num_experts: int
    top_k: int
    expert_hashes: list[str]
    router_row_hashes: list[str]


@dataclass
class Protocol:
    """A selective fine-tuning protocol (see the module docstring)."""

    parent_fingerprint: str
    parent_model: str | None
    model_type: str
    permitted: list[str]
    groups: dict[str, list[str]]  # group -> state-dict names
    tensor_hashes: dict[str, str]
    tensor_shapes: dict[str, list[int]]
    group_hashes: dict[str, str]  # frozen groups only
    layers: list[LayerRecord]
    moeguard_version: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    kind: str = PROTOCOL_KIND
    format: int = PROTOCOL_FORMAT
    sha256: str = ""  # of every other field (content_hash), set when saved

    @property
    def frozen(self) -> list[str]:
        return [group for group in self.groups if group not in self.permitted]

    def group_of(self, name: str) -> str | None:
        return next((group for group, names in self.groups.items() if name in names), None)

    def content_hash(self) -> str:
        """SHA-256 of the canonical JSON of every field but ``sha256``."""
        return content_hash({k: v for k, v in asdict(self).items() if k != "sha256"})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sha256": self.content_hash()}

    def save(self, path: str | Path) -> Path:
        self.sha256 = self.content_hash()
        write_json(path, self.to_dict())
        return Path(path)

    def check_derived_from(self, moe: MoEModel, *, source: str = "the protocol") -> None:
        """Refuse a protocol that is not what :func:`make_protocol` writes for ``moe`` with its ``permitted`` groups."""
        derived = asdict(make_protocol(moe, self.permitted))
        mine = asdict(self)
        differing = [name for name in DERIVED_FIELDS if derived[name] != mine[name]]
        if differing:
            raise InputError(
                f"{source} does not describe the parent model {moe.source}: its {', '.join(differing)} differ from what the "
                "parent gives. It was edited, or written for another model; write the protocol again from the released model."
            )

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "protocol", expected_sha256: str | None = None) -> "Protocol":
        if not isinstance(data, dict) or data.get("kind") != PROTOCOL_KIND:
            raise InputError(
                f"{source} is not a moeguard fine-tuning protocol (field 'kind' must be {PROTOCOL_KIND!r}); "
                "write one with `moeguard verify --parent MODEL --protocol FILE --write`."
            )
        if data.get("format") != PROTOCOL_FORMAT:
            raise InputError(
                f"{source}: protocol format {data.get('format')!r} is not supported (this moeguard reads format "
                f"{PROTOCOL_FORMAT}); write the protocol again with this version."
            )
        expected = {
            "parent_fingerprint": str,
            "model_type": str,
            "permitted": list,
            "groups": dict,
            "tensor_hashes": dict,
            "tensor_shapes": dict,
            "group_hashes": dict,
            "layers": list,
            "sha256": str,
        }
        for name, kind in expected.items():
            if not isinstance(data.get(name), kind):
                raise InputError(
                    f"{source}: field {name!r} must be a {kind.__name__}, got {type(data.get(name)).__name__}."
                )
        check_group_names(data["permitted"], what=f"{source}: permitted group")
        check_group_names(data["groups"], what=f"{source}: group")
        layers = []
        layer_fields = set(LayerRecord.__dataclass_fields__)
        for position, layer in enumerate(data["layers"]):
            if not isinstance(layer, dict) or set(layer) != layer_fields:
                raise InputError(f"{source}: layers[{position}] must have exactly the fields {sorted(layer_fields)}.")
            hashes = (layer["expert_hashes"], layer["router_row_hashes"])
            if not all(isinstance(h, list) and len(h) == layer["num_experts"] for h in hashes):
                raise InputError(f"{source}: layers[{position}] must list one expert hash and one router-row hash per expert "
                                 f"({layer['num_experts']!r}).")
            layers.append(LayerRecord(**layer))
        known = set(cls.__dataclass_fields__) - {"layers"}
        protocol = cls(layers=layers, **{k: v for k, v in data.items() if k in known})
        if data.get("sha256") != protocol.content_hash():
            raise InputError(
                f"{source} was changed after it was written: its sha256 field does not match its content. A protocol "
                "cannot be edited by hand; write it again from the released model."
            )
        if expected_sha256 is not None and protocol.sha256 != expected_sha256:
            raise InputError(f"{source} has SHA-256 {protocol.sha256}, not the {expected_sha256} it was pinned to; it is "
                             "not the protocol that was published.")
        protocol.check_consistent(source)
        return protocol

    def check_consistent(self, source: str = "the protocol") -> None:
        """Refuse a protocol whose parts contradict each other (see the module docstring)."""
        frozen = self.frozen
        if not frozen:
            raise InputError(f"{source}: permitted lists every group ({', '.join(self.permitted)}); a protocol freezes at least one.")
        unknown = [group for group in self.permitted if group not in self.groups]
        if unknown:
            raise InputError(f"{source}: permitted names groups {unknown} the model does not have ({', '.join(self.groups)}).")
        if sorted(self.group_hashes) != sorted(frozen):
            raise InputError(f"{source}: it pins groups {sorted(self.group_hashes)}, but its permitted list leaves "
                             f"{sorted(frozen)} frozen; the two disagree (was permitted edited?).")
        names = [name for group_names in self.groups.values() for name in group_names]
        if sorted(names) != sorted(self.tensor_hashes) or sorted(self.tensor_shapes) != sorted(self.tensor_hashes):
            raise InputError(f"{source}: its groups, tensor hashes and tensor shapes do not list the same tensors.")
        for group in frozen:
            if self.group_hashes[group] != combine_digests({name: self.tensor_hashes[name] for name in self.groups[group]}):
                raise InputError(f"{source}: the hash of frozen group {group!r} does not match the hashes of its tensors.")

    @classmethod
    def load(cls, path: str | Path, *, expected_sha256: str | None = None) -> "Protocol":
        """Read and check a protocol file; ``expected_sha256`` pins it to a published hash."""
        return cls.from_dict(read_json(path, what="fine-tuning protocol"), source=str(path), expected_sha256=expected_sha256)


def make_protocol(moe: MoEModel, permitted: Iterable[str] = DEFAULT_PERMITTED) -> Protocol:
    """The protocol that pins ``moe`` as released and permits changes to ``permitted`` groups only."""
    permitted = check_group_names(permitted, what="permitted group")
    groups = parameter_groups(moe)
    if all(group in permitted for group in groups):
        raise InputError(
            f"permitting {', '.join(permitted)} leaves no group of this model frozen (it has {', '.join(groups)}); "
            "a protocol must freeze at least one group."
        )
    state = moe.model.state_dict()
    tensor_hashes = {name: tensor_digest(name, tensor) for name, tensor in state.items()}
    group_hashes = {
        group: combine_digests({name: tensor_hashes[name] for name in names}) for group, names in groups.items() if group not in permitted
    }
    layers = [
        LayerRecord(layer.path, layer.num_experts, layer.top_k, expert_hashes(layer), router_row_hashes(layer))
        for layer in moe.layers
    ]
    return Protocol(
        parent_fingerprint=moe.fingerprint(),
        parent_model=moe.source,
        model_type=moe.model_type,
        permitted=list(permitted),
        groups=groups,
        tensor_hashes=tensor_hashes,
        tensor_shapes={name: list(tensor.shape) for name, tensor in state.items()},
        group_hashes=group_hashes,
        layers=layers,
        moeguard_version=moeguard.__version__,
    )
