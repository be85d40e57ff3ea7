"""``MoEModel``: one exact view over any transformers MoE causal LM."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import moeguard
from moeguard.errors import InputError, UnsupportedModelError
from moeguard.io import atomic_dir, check_output, write_json
from moeguard.models.discovery import discover_moe_layers, model_type_of
from moeguard.models.fingerprint import fingerprint as weights_fingerprint
from moeguard.models.keep_sets import KeepSets, normalize_keep_sets
from moeguard.models.layers import MoELayer
from moeguard.models.manifest import MANIFEST_NAME, PruneManifest
from moeguard.models.prompting import PromptFormat
from moeguard.models.routing import RoutingCapture, RoutingEvent, pair_outputs
from moeguard.models.surgery import RouterRestriction, prune_in_place, shape_mismatches

log = logging.getLogger("moeguard.models")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of an MoE model.

    ``active_per_token`` counts what one token passes through: every parameter except
    the routed experts it is not sent to (embeddings included).
    """

    total: int
    active_per_token: int
    routed_experts: int
    per_expert: list[int]


class MoEModel:
    """A transformers MoE causal LM with its MoE layers found and made operable.

    ``layers[l]`` describes the l-th sparse MoE block (dense layers are skipped).
    ``expert_ids[l][j]`` is the parent's index of the j-th expert now in layer ``l``
    (``range(E)`` for a model that was never pruned).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[MoELayer],
        *,
        tokenizer: Any = None,
        source: str | None = None,
        manifest: PruneManifest | None = None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.tokenizer = tokenizer
        self.prompt_format = PromptFormat()  # how prompts are written (chat template, system prompt)
        self.source = source
        if manifest is not None:
            manifest.check_against(layers, source=f"the prune manifest of {source or 'the model'}")
        self.manifest = manifest
        self.expert_ids: list[list[int]] = (
            [list(k) for k in manifest.kept] if manifest is not None else [list(range(layer.num_experts)) for layer in layers]
        )
        self._masked = False
        self._fingerprint_cache: tuple[tuple, str] | None = None

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        source: str | None = None,
        manifest: PruneManifest | None = None,
    ) -> "MoEModel":
        """Wrap an already loaded transformers model (no copy is made)."""
        if not isinstance(model, nn.Module):
            raise InputError(f"MoEModel.from_model needs a torch nn.Module, got {type(model).__name__}.")
        return cls(model, discover_moe_layers(model), tokenizer=tokenizer, source=source, manifest=manifest)

    # ------------------------------------------------------------ description
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def model_type(self) -> str:
        return model_type_of(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> list[int]:
        return [layer.num_experts for layer in self.layers]

    @property
    def top_k(self) -> list[int]:
        return [layer.top_k for layer in self.layers]

    def parameter_counts(self) -> ParameterCounts:
        total = sum(p.numel() for p in self.model.parameters())
        per_expert, routed, inactive = [], 0, 0
        for layer in self.layers:
            layer_expert_params = sum(t.get().numel() for t in layer.tensors("experts"))
            routed += layer_expert_params
            one = layer_expert_params // layer.num_experts
            per_expert.append(one)
            inactive += (layer.num_experts - layer.top_k) * one
        return ParameterCounts(total, total - inactive, routed, per_expert)

    def describe(self) -> str:
        """A short human-readable summary of the MoE structure."""
        counts = self.parameter_counts()
        lines = [
            f"{self.model_type} ({type(self.model).__name__}): {self.num_layers} MoE layers, "
            f"{counts.total:,} parameters ({counts.active_per_token:,} active per token)"
        ]
        for layer in self.layers:
            extras = []
            if layer.shared_expert_paths:
                extras.append("shared: " + ", ".join(p.rsplit(".", 1)[-1] for p in layer.shared_expert_paths))
            if layer.group_routing:
                g = layer.group_routing
                extras.append(f"groups: {g.num_groups} (tokens pick {g.groups_per_token})")
            suffix = f"  [{'; '.join(extras)}]" if extras else ""
            lines.append(f"  layer {layer.index:>2}  {layer.path}: {layer.num_experts} experts, top-{layer.top_k}{suffix}")
        return "\n".join(lines)

    def weight_sharing_copy(self) -> "MoEModel":
        """A second model over the same weights: its modules, config and layer view are copies, its
        parameters and buffers are this model's own tensors, so it costs no weight memory.

        Slicing experts out of the copy (:meth:`prune`, ``reindex_experts``) gives it new,
        smaller tensors and leaves this model untouched. Writing into a shared tensor
        (training the copy) would change both: copy what you train.
        """
        shared: dict[int, Any] = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        if self.tokenizer is not None:
            shared[id(self.tokenizer)] = self.tokenizer
        return copy.deepcopy(self, shared)

    # ------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """SHA-256 of the weights (cached until a tensor changes)."""
        state = self.model.state_dict()
        key = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in sorted(state.items()))
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            self._fingerprint_cache = (key, weights_fingerprint(self.model))
        return self._fingerprint_cache[1]

    # ------------------------------------------------------------ routing
    @contextmanager
    def capture_routing(
        self, *, keep: bool = True, on_route: Callable[[RoutingEvent], None] | None = None, expert_outputs: bool = False,
    ) -> Iterator[RoutingCapture]:
        """Record, per MoE layer, the routing decisions the model uses (padding excluded); with
        ``expert_outputs`` the events carry each routed expert's own output (:class:`RoutingCapture`)."""
        capture = RoutingCapture(self.model, self.layers, keep=keep, on_route=on_route, expert_outputs=expert_outputs)
        capture.attach()
        try:
            yield capture
        finally:
            capture.detach()

    @contextmanager
    def mask_experts(self, keep: KeepSets) -> Iterator[None]:
        """Within the block, only the kept experts can be selected; the model is restored on exit.

        ``keep`` maps MoE layer index -> kept expert indices (layers not named keep all).
        Non-uniform keep counts are allowed here. Gradients flow to the original
        parameters, so training under a mask works.
        """
        if self._masked:
            raise InputError("mask_experts blocks cannot be nested; combine the keep sets into one.")
        keep_sets = normalize_keep_sets(self.layers, keep, physical=False)
        restrictions = [RouterRestriction(layer, k) for layer, k in zip(self.layers, keep_sets) if k is not None]
        self._masked = True
        try:
            for restriction in restrictions:
                restriction.attach()
            yield
        finally:
            for restriction in restrictions:
                restriction.detach()
            self._masked = False

    def expert_outputs(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs ``[n, k, H]`` of each selected expert on its token.

        Computes only the routed (token, expert) pairs, by calling the layer's own
        experts module with each pair as a top-1 route of weight 1 (hooks bypassed).
        """
        return pair_outputs(self.layers[layer], hidden_states, top_k_index).view(*top_k_index.shape, -1)

    # ------------------------------------------------------------ surgery
    def prune(self, keep: KeepSets, *, selection: dict[str, Any] | None = None) -> PruneManifest:
        """Physically remove every expert not kept, in place; return the manifest for :meth:`save`.

        Every MoE layer must keep the same number of experts (a stock config holds
        one count). ``selection`` records how the experts were chosen.
        """
        if self._masked:
            raise InputError("cannot prune inside a mask_experts block; prune after it ends.")
        keep_sets = normalize_keep_sets(self.layers, keep, physical=True)
        parent_fingerprint = self.fingerprint()
        kept = [k if k is not None else list(range(layer.num_experts)) for k, layer in zip(keep_sets, self.layers)]
        manifest = PruneManifest(
            parent_fingerprint=parent_fingerprint,
            parent_model=self.source,
            parent_num_experts=self.num_experts,
            kept=kept,
            layer_paths=[layer.path for layer in self.layers],
            selection=dict(selection or {}),
            moeguard_version=moeguard.__version__,
            lineage=[self.manifest.to_dict()] + self.manifest.lineage if self.manifest else [],
        )
        prune_in_place(self.model, self.layers, keep_sets)
        problems = shape_mismatches(self.model)
        if problems:
            raise UnsupportedModelError(
                f"{self.model_type}: after pruning, the config does not describe the model "
                f"({'; '.join(problems[:3])}); this family keeps its expert count somewhere moeguard does not know."
            )
        self.expert_ids = [[ids[i] for i in k] for ids, k in zip(self.expert_ids, kept)]
        self.manifest = manifest
        return manifest

    def save(
        self,
        out_dir: str | Path,
        manifest: PruneManifest | dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        max_shard_size: str | int | None = None,
    ) -> Path:
        """Write an HF model directory (config, safetensors weights, generation config,
        tokenizer, manifest) atomically.

        The result loads with stock ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``. By default the manifest of the last
        :meth:`prune` is written. ``out_dir`` may not be, contain or lie inside the
        directory the model was loaded from (see :func:`moeguard.io.check_output`).
        """
        manifest = manifest if manifest is not None else self.manifest
        out_dir = check_output(out_dir, inputs=[self.source], overwrite=overwrite, directory=True)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
            self.model.save_pretrained(tmp, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            else:
                log.warning("%s: the model has no tokenizer, so %s is written without one", self.source or "model", out_dir)
            if manifest is not None:
                data = manifest.to_dict() if isinstance(manifest, PruneManifest) else dict(manifest)
                write_json(tmp / MANIFEST_NAME, data)
        return out_dir
