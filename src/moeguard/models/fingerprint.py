"""A stable content hash of a model's weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state-dict tensor: name, dtype, shape and bytes, in name order.

    Equal weights give equal fingerprints (also across save and load); any change
    of a value, dtype, shape or name gives a different one.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
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
