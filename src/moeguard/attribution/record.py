"""``Attribution``: the routing statistics of one model on one task, and its files.

On disk an attribution is two files written atomically side by side:

- ``NAME.json``: model (source, type, fingerprint), task (name, source), token
  selection, sample and token counts, and per MoE layer the expert statistics
  (readable totals), plus a specialisation summary;
- ``NAME.safetensors``: the tensors (per-part sums, co-activation), whose SHA-256
  the JSON records so that a JSON is never read with tensors from another run.

Statistics are stored as sums, never as scores, so one file serves every
criterion and every keep count later (:func:`moeguard.attribution.scores`).

Layers with different expert counts (hand-built or partially pruned models) are
padded to the largest count: their sums are zero past ``num_experts[l]`` and their
scores ``-inf``, so no ranking selects a padding slot.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import moeguard
from moeguard.errors import FingerprintMismatchError, InputError
from moeguard.io import atomic_write_bytes, read_json, write_json
from moeguard.models.fingerprint import short

FORMAT = 1
KIND = "moeguard attribution"
TOKEN_MODES = ("all", "prompt", "answer")

# Sum name -> shape after the leading parts axis ("L" layers, "E" experts).
SUM_SHAPES: dict[str, tuple[str, ...]] = {
    "samples": (),
    "tokens": ("L",),
    "routed": ("L", "E"),
    "gate_mass": ("L", "E"),
    "weighted_norm": ("L", "E"),
    "output_norm": ("L", "E"),
    "masked_loss": ("L", "E"),
    "base_loss": (),
    "loss_tokens": (),
}
INTEGER_SUMS = ("samples", "tokens", "routed", "loss_tokens")
# Sums every attribution has; the others exist when the criterion needing them was collected.
ROUTING_SUMS = ("samples", "tokens", "routed", "gate_mass")
NORM_SUMS = ("weighted_norm", "output_norm")
ABLATION_SUMS = ("masked_loss", "base_loss", "loss_tokens")
# Per layer x expert sums written into the JSON for readers.
EXPERT_SUMS = ("routed", "gate_mass", "weighted_norm", "output_norm", "masked_loss")


def tensors_path(json_path: str | Path) -> Path:
    """The safetensors file beside an attribution JSON (``a.json`` -> ``a.safetensors``)."""
    path = Path(json_path)
    return path.with_suffix(".safetensors") if path.suffix == ".json" else path.with_name(path.name + ".safetensors")


def _beside(path: Path, name: Any) -> Path:
    """The file ``name`` in the directory of ``path``; a name that would lead anywhere else is refused."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InputError(
            f"{path}: tensors.file must name a file in the same directory (e.g. {path.stem}.safetensors), got {name!r:.80}; "
            "an attribution never points elsewhere."
        )
    return path.with_name(name)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Attribution:
    """Routing statistics of a model on a task, as sums over parts (even / odd examples).

    ``sums[name]`` has a leading parts axis (2 for a full attribution, 1 for one of
    its :meth:`halves`) followed by the shape in :data:`SUM_SHAPES`.
    ``coactivation[l, i, j]`` counts tokens routed to both experts ``i`` and ``j``
    of layer ``l`` (None for a half). ``expert_ids[l][j]`` is the parent model's
    index of expert ``j`` (differs from ``j`` in a pruned model). ``batches`` is the
    number of batches accumulated (used to resume an interrupted collection).
    """

    model_fingerprint: str
    model_source: str | None
    model_type: str
    task: str | None
    task_source: str | None
    tokens: str
    num_experts: list[int]
    top_k: list[int]
    expert_ids: list[list[int]]
    sums: dict[str, torch.Tensor]
    coactivation: torch.Tensor | None = None
    batches: int = 0
    moeguard_version: str = moeguard.__version__
    created: str = field(default_factory=_now)
    # Fingerprint of the checkpoint directory the model was loaded from (see
    # moeguard.models.fingerprint.checkpoint_fingerprint): lets a streaming prune,
    # which never loads the weights, check that it prunes the attributed model.
    checkpoint_fingerprint: str | None = None

    # ------------------------------------------------------------ description
    @property
    def num_layers(self) -> int:
        return len(self.num_experts)

    @property
    def width(self) -> int:
        """The experts axis of every ``[L, E]`` tensor: the largest layer's expert count."""
        return max(self.num_experts)

    @property
    def parts(self) -> int:
        return int(self.sums["samples"].shape[0])

    @property
    def samples(self) -> int:
        return int(self.sums["samples"].sum())

    @property
    def token_counts(self) -> list[int]:
        """Selected tokens seen by each MoE layer."""
        return [int(n) for n in self.total("tokens")]

    @property
    def collected(self) -> set[str]:
        """Names of the sums this attribution holds."""
        return set(self.sums)

    def total(self, name: str) -> torch.Tensor:
        """The sum ``name`` over all parts."""
        if name not in self.sums:
            raise InputError(f"this attribution has no {name!r} statistics; it holds {sorted(self.sums)}.")
        return self.sums[name].sum(0)

    def valid(self) -> torch.Tensor:
        """``[L, E]`` bool: True where the layer has that expert (False on padding)."""
        columns = torch.arange(self.width)
        return columns.unsqueeze(0) < torch.tensor(self.num_experts).unsqueeze(1)

    def halves(self) -> tuple["Attribution", "Attribution"]:
        """The attributions of the even-indexed and of the odd-indexed examples."""
        if self.parts != 2:
            raise InputError("this attribution is already one half of the samples; it cannot be split again.")
        return tuple(  # type: ignore[return-value]
            replace(self, sums={k: v[p : p + 1] for k, v in self.sums.items()}, coactivation=None) for p in range(2)
        )

    # ------------------------------------------------------------ files
    def save(self, path: str | Path, *, summary: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (JSON) and the tensors beside it, each atomically.

        ``summary`` (e.g. :meth:`Specialisation.to_dict`) is stored for readers;
        it is not read back.
        """
        from safetensors.torch import save as save_tensors

        path = Path(path)
        tensors = {f"sums.{name}": value.detach().cpu().contiguous() for name, value in self.sums.items()}
        if self.coactivation is not None:
            tensors["coactivation"] = self.coactivation.detach().cpu().contiguous()
        data = save_tensors(tensors, metadata={"format": str(FORMAT), "kind": KIND})
        side = tensors_path(path)
        atomic_write_bytes(side, data)
        write_json(path, self._to_json(side.name, hashlib.sha256(data).hexdigest(), summary))
        return path

    def _to_json(self, tensors_file: str, tensors_sha256: str, summary: dict[str, Any] | None) -> dict[str, Any]:
        totals = {name: self.total(name) for name in EXPERT_SUMS if name in self.sums}
        layers = []
        for layer, width in enumerate(self.num_experts):
            entry: dict[str, Any] = {
                "index": layer,
                "num_experts": width,
                "top_k": self.top_k[layer],
                "expert_ids": self.expert_ids[layer],
                "tokens": self.token_counts[layer],
            }
            for name, total in totals.items():
                entry[name] = total[layer, :width].tolist()
            layers.append(entry)
        data: dict[str, Any] = {
            "kind": KIND,
            "format": FORMAT,
            "moeguard_version": self.moeguard_version,
            "created": self.created,
            "model": {
                "source": self.model_source,
                "type": self.model_type,
                "fingerprint": self.model_fingerprint,
                "checkpoint_fingerprint": self.checkpoint_fingerprint,
            },
            "task": {"name": self.task, "source": self.task_source},
            "tokens": self.tokens,
            "samples": self.samples,
            "batches": self.batches,
            "token_counts": self.token_counts,
            "statistics": sorted(self.sums),
        }
        if "base_loss" in self.sums:
            loss_tokens = int(self.total("loss_tokens"))
            data["loss"] = {"base_mean": float(self.total("base_loss")) / max(loss_tokens, 1), "tokens": loss_tokens}
        data["layers"] = layers
        if summary is not None:
            data["summary"] = summary
        data["tensors"] = {"file": tensors_file, "sha256": tensors_sha256}
        return data

    @classmethod
    def load(cls, path: str | Path) -> "Attribution":
        """Read an attribution written by :meth:`save`; refuse mismatched or foreign files."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_tensors

        path = Path(path)
        data = read_json(path, what="attribution")
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise InputError(f"{path} is not a moeguard attribution (no \"kind\": \"{KIND}\"); write one with `moeguard attribute`.")
        if data.get("format") != FORMAT:
            raise InputError(f"{path} has attribution format {data.get('format')!r}; this moeguard reads format {FORMAT}.")
        try:
            tensors_info = data["tensors"]
            tensors_file = tensors_info["file"]
            model, task, layers = data["model"], data["task"], data["layers"]
            meta = dict(
                model_fingerprint=model["fingerprint"],
                checkpoint_fingerprint=model.get("checkpoint_fingerprint"),
                model_source=model["source"],
                model_type=model["type"],
                task=task["name"],
                task_source=task["source"],
                tokens=data["tokens"],
                num_experts=[int(layer["num_experts"]) for layer in layers],
                top_k=[int(layer["top_k"]) for layer in layers],
                expert_ids=[[int(i) for i in layer["expert_ids"]] for layer in layers],
                batches=int(data.get("batches", 0)),
                moeguard_version=data["moeguard_version"],
                created=data["created"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise InputError(f"{path}: missing or malformed field ({error}); the attribution file is damaged.") from None
        side = _beside(path, tensors_file)
        if not side.is_file():
            raise InputError(f"{path} refers to its tensors in {side}, which does not exist; copy both files together.")
        raw = side.read_bytes()
        if not isinstance(tensors_info, dict) or hashlib.sha256(raw).hexdigest() != tensors_info.get("sha256"):
            raise InputError(
                f"{side} does not belong to {path} (its SHA-256 differs from the one recorded); both files must "
                "come from the same `moeguard attribute` run."
            )
        try:
            tensors = load_tensors(raw)
        except SafetensorError as error:
            raise InputError(f"{side} is not a readable safetensors file ({error}); the attribution is damaged.") from None
        sums = {name.removeprefix("sums."): value for name, value in tensors.items() if name.startswith("sums.")}
        attribution = cls(**meta, sums=sums, coactivation=tensors.get("coactivation"))
        attribution.check_shapes(str(path))
        return attribution

    def check_shapes(self, where: str = "attribution") -> None:
        """Refuse sums whose shapes do not follow :data:`SUM_SHAPES` for this model."""
        if self.tokens not in TOKEN_MODES:
            raise InputError(f"{where}: tokens is {self.tokens!r}; expected one of {', '.join(TOKEN_MODES)}.")
        missing = [name for name in ROUTING_SUMS if name not in self.sums]
        if missing:
            raise InputError(f"{where}: missing statistics {missing}.")
        if not (len(self.num_experts) == len(self.top_k) == len(self.expert_ids)) or not self.num_experts:
            raise InputError(f"{where}: per-layer lists (num_experts, top_k, expert_ids) differ in length or are empty.")
        sizes = {"L": self.num_layers, "E": self.width}
        parts = self.parts
        for name, value in self.sums.items():
            if name not in SUM_SHAPES:
                raise InputError(f"{where}: unknown statistic {name!r}; known: {', '.join(SUM_SHAPES)}.")
            expected = (parts, *(sizes[axis] for axis in SUM_SHAPES[name]))
            if tuple(value.shape) != expected:
                raise InputError(f"{where}: statistic {name!r} has shape {tuple(value.shape)}, expected {expected}.")
        if self.coactivation is not None and tuple(self.coactivation.shape) != (self.num_layers, self.width, self.width):
            raise InputError(f"{where}: coactivation has shape {tuple(self.coactivation.shape)}, expected "
                             f"{(self.num_layers, self.width, self.width)}.")


def check_fingerprint(attribution: Attribution, moe: Any, *, what: str = "the attribution") -> None:
    """Refuse to use ``attribution`` with a model whose weights differ from the attributed one."""
    actual = moe.fingerprint()
    if actual != attribution.model_fingerprint:
        raise FingerprintMismatchError(
            f"{what} was computed on model {short(attribution.model_fingerprint)} ({attribution.model_source}), "
            f"but this model is {short(actual)} ({moe.source}): its weights differ. Use the model the attribution "
            "was made with, or run `moeguard attribute` on this model."
        )
