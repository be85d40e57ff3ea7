"""A stable content hash of a model's weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of ``tensor`` (any dtype, any device) in row-major order."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def update_with_tensor(digest: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n".encode())
    digest.update(tensor_bytes(tensor))


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
    the files) but needs no model in memory. Returns "" when there is no
    safetensors checkpoint.
    """
    from safetensors import safe_open

    digests: dict[str, str] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                digests[name] = tensor_digest(name, handle.get_tensor(name))
    return combine_digests(digests) if digests else ""


def short(fingerprint_hex: str) -> str:
    """The first 12 hex digits, for display."""
    return fingerprint_hex[:12]
