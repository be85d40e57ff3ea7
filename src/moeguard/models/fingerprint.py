"""A stable content hash of a model's weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from moeguard.errors import ModelError
from moeguard.models.stored import digest_header, read_header, stored_digests


def update_with_tensor(digest: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    """Hash ``name|dtype|shape`` and the tensor's raw bytes in row-major order (any dtype, any device).

    The bytes are hashed in place (a contiguous CPU tensor is not copied), so hashing a
    model costs no memory beyond its weights.
    """
    digest.update(digest_header(name, tensor.dtype, tensor.shape))
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(memoryview(flat.view(torch.uint8).numpy()))


def offloaded_weights(model: nn.Module) -> Mapping[str, torch.Tensor] | None:
    """The weights accelerate keeps off the model (``device_map`` offload), by state-dict name, or None.

    An offloaded parameter is a meta tensor in the model; its value is loaded from
    this mapping (from disk or CPU memory) by the module's hook during its forward.
    """
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for one in [hook, *getattr(hook, "hooks", ())]:
            weights = getattr(one, "weights_map", None)
            if weights is not None:
                return getattr(weights, "dataset", weights)
    return None


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every state-dict entry in name order, offloaded ones loaded one at a time."""
    offloaded = None
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta":
            offloaded = offloaded if offloaded is not None else offloaded_weights(model)
            if offloaded is None or name not in offloaded:
                raise ModelError(f"the weight {name} is on the meta device and no offloaded copy of it was found; "
                                 "load the model with its weights (or with accelerate's device_map offload).")
            tensor = offloaded[name]
        yield name, tensor


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state-dict tensor: name, dtype, shape and bytes, in name order.

    Equal weights give equal fingerprints (also across save and load, and whether
    or not accelerate offloads some of them); any change of a value, dtype, shape or
    name gives a different one.
    """
    digest = hashlib.sha256()
    for name, tensor in state_tensors(model):
        update_with_tensor(digest, name, tensor)
    return digest.hexdigest()


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of one tensor's name, dtype, shape and bytes (the unit of :func:`combine_digests`)."""
    digest = hashlib.sha256()
    update_with_tensor(digest, name, tensor)
    return digest.hexdigest()


def combine_digests(digests: Mapping[str, str]) -> str:
    """SHA-256 over ``"name digest"`` lines in name order: independent of shard layout and reading order."""
    combined = hashlib.sha256()
    for name in sorted(digests):
        combined.update(f"{name} {digests[name]}\n".encode())
    return combined.hexdigest()


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else ``model.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of the tensors stored in a checkpoint directory, read one at a time.

    ``combine_digests`` of :func:`tensor_digest` over every tensor of every
    safetensors file, under its on-disk name. It differs from :func:`fingerprint`
    (the in-memory state dict, whose names, fused layout and dtype can differ from
    the files) but needs no model in memory: the files are read as a stream
    (:func:`moeguard.models.stored.stored_digests`). Returns "" when there is no
    safetensors checkpoint.
    """
    digests: dict[str, str] = {}
    for path in checkpoint_files(model_dir):
        try:
            digests.update(stored_digests(read_header(path)))
        except (OSError, EOFError) as error:
            raise ModelError(f"cannot read {path}: {error}. The file is damaged or truncated; copy it again.") from None
    return combine_digests(digests) if digests else ""


def short(fingerprint_hex: str) -> str:
    """The first 12 hex digits, for display."""
    return fingerprint_hex[:12]
