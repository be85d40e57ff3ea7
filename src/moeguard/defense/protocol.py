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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
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
PROTOCOL_FORMAT = 1
PROTOCOL_NAME = "moeguard_protocol.json"  # the protocol written beside a hardened model
DEFAULT_PERMITTED = ("router", "attention")


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

    @property
    def frozen(self) -> list[str]:
        return [group for group in self.groups if group not in self.permitted]

    def group_of(self, name: str) -> str | None:
        return next((group for group, names in self.groups.items() if name in names), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "protocol") -> "Protocol":
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
            if not len(layer["expert_hashes"]) == len(layer["router_row_hashes"]) == layer["num_experts"]:
                raise InputError(
                    f"{source}: layers[{position}] lists {len(layer['expert_hashes'])} expert hashes and "
                    f"{len(layer['router_row_hashes'])} router-row hashes for {layer['num_experts']} experts."
                )
            layers.append(LayerRecord(**layer))
        known = set(cls.__dataclass_fields__) - {"layers"}
        return cls(layers=layers, **{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "Protocol":
        return cls.from_dict(read_json(path, what="fine-tuning protocol"), source=str(path))


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
