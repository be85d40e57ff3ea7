"""The resumable state of a re-alignment run, saved after every round.

``<out>/state/round_NNNN/`` holds ``trainable.safetensors`` (the values of the
trained parameters after round N) and ``state.json`` (the run's configuration and
model fingerprint, the labelled pool indices for the next round, the reference
measurements and the history so far). Each round directory is written whole
(:func:`moeguard.io.atomic_dir`) before the previous one is removed, so an
interruption at any moment leaves a complete latest round.

No optimizer or RNG state crosses a round boundary: every round starts a fresh
optimizer schedule and draws its randomness from generators seeded by
``(seed, round)``, so a resumed run repeats exactly what an uninterrupted one
does. Inside a round, :func:`moeguard.training.train` keeps its own checkpoint
(weights, optimizer state and RNG state).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeguard.errors import InputError, TrainingDivergedError
from moeguard.io import atomic_dir, read_json, write_json

STATE_DIR = "state"
ROUND_PREFIX = "round_"


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels such as ``("train", round)``: independent streams per use."""
    text = "|".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


@dataclass
class SavedRound:
    """What a finished round left: its number, the JSON state and the trained tensors."""

    round: int
    data: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _round_dirs(state_dir: Path) -> list[Path]:
    if not state_dir.is_dir():
        return []
    found = [p for p in state_dir.iterdir() if p.is_dir() and p.name.startswith(ROUND_PREFIX) and p.name[len(ROUND_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(ROUND_PREFIX):]))


def save_round(state_dir: Path, round_index: int, data: dict[str, Any], trainable: dict[str, nn.Parameter]) -> Path:
    """Write round ``round_index`` atomically, then remove the rounds before it (never non-finite weights)."""
    from safetensors.torch import save_file

    if not all(bool(torch.isfinite(p).all()) for p in trainable.values()):
        raise TrainingDivergedError(
            f"the weights became non-finite in round {round_index}; training diverged, lower the learning rate."
        )
    path = state_dir / f"{ROUND_PREFIX}{round_index:04d}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file({name: p.detach().cpu().contiguous() for name, p in trainable.items()}, str(tmp / "trainable.safetensors"))
        write_json(tmp / "state.json", data)
    for older in _round_dirs(state_dir):
        if older != path:
            shutil.rmtree(older, ignore_errors=True)
    return path


def load_latest_round(state_dir: Path) -> SavedRound | None:
    """The latest complete round under ``state_dir``, or None when there is none."""
    from safetensors.torch import load_file

    rounds = _round_dirs(state_dir)
    if not rounds:
        return None
    latest = rounds[-1]
    data = read_json(latest / "state.json", what="re-alignment state")
    tensors = load_file(str(latest / "trainable.safetensors"))
    return SavedRound(int(latest.name[len(ROUND_PREFIX):]), data, tensors)


@torch.no_grad()
def restore_trainable(trainable: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy saved values into the trainable parameters; the names and shapes must match exactly."""
    if set(tensors) != set(trainable):
        missing = sorted(set(trainable) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(trainable))[:3]
        raise InputError(
            f"{source} holds other trained parameters than this run trains (missing {missing}, unexpected {extra}); "
            "resume with the same model and trainable scope, or start again in another output directory."
        )
    for name, param in trainable.items():
        saved = tensors[name]
        if saved.shape != param.shape:
            raise InputError(f"{source}: parameter {name} was saved with shape {tuple(saved.shape)}, the model has {tuple(param.shape)}.")
        param.copy_(saved.to(device=param.device, dtype=param.dtype))
