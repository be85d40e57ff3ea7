"""A stable content hash of a model's weights."""

from __future__ import annotations

import hashlib

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


def short(fingerprint_hex: str) -> str:
    """The first 12 hex digits, for display."""
    return fingerprint_hex[:12]
