"""Removing experts: for real (slicing tensors) or virtually (restricting the router).

Both paths slice the same expert-indexed tensors with the same kept indices, which
is why a physically pruned model computes exactly what the masked original does:

- :func:`prune_in_place` slices every expert-indexed tensor (router rows, router
  and correction biases, fused expert weights and biases) and updates the expert
  counters of the modules and the config.
- :class:`RouterRestriction` makes a router, for the length of one call, see only
  the kept rows of its tensors (and of expert-indexed tensors handed to it), then
  maps its selections back to the original expert numbering and widens its logits
  with ``-inf`` for the removed experts. Removed experts can never be selected, and
  for softmax routers this is exactly "score -inf before top-k".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moeguard.errors import UnsupportedModelError
from moeguard.models.layers import EXPERT_COUNT_NAMES, ExpertTensor, MoELayer, count_attributes


def _set_tensor(tensor_ref: ExpertTensor, value: torch.Tensor) -> None:
    table = tensor_ref.owner._buffers if tensor_ref.is_buffer else tensor_ref.owner._parameters
    table[tensor_ref.attr] = value


class RouterRestriction:
    """Forward hooks that restrict one MoE layer's router to a set of kept experts."""

    def __init__(self, layer: MoELayer, kept: Sequence[int]) -> None:
        hook = getattr(layer.router, "_hf_hook", None)
        if getattr(hook, "offload", False):
            raise UnsupportedModelError(
                f"the router {layer.router_path} is offloaded by accelerate (its weights are loaded only inside its "
                "forward), so its experts cannot be masked; load the model with the routers on a device "
                "(e.g. a device_map that does not offload, or more GPU/CPU memory)."
            )
        self.layer = layer
        self.kept = torch.as_tensor(list(kept), dtype=torch.long)
        self.router_tensors = layer.tensors("router")
        self.originals = [t.get() for t in self.router_tensors]
        # Expert-indexed tensors of the block that the block hands to its router as arguments.
        self.block_tensor_ids = {id(t.get()) for t in layer.tensors("block")}
        self.counters = count_attributes(layer.router, layer.num_experts)
        self.handles: list[Any] = []

    def _kept_on(self, device: torch.device) -> torch.Tensor:
        if self.kept.device != device:
            self.kept = self.kept.to(device)
        return self.kept

    def _restrict(self) -> None:
        for ref, original in zip(self.router_tensors, self.originals):
            _set_tensor(ref, original.index_select(ref.dim, self._kept_on(original.device)))
        for module, name in self.counters:
            setattr(module, name, len(self.kept))

    def _restore(self) -> None:
        for ref, original in zip(self.router_tensors, self.originals):
            _set_tensor(ref, original)
        for module, name in self.counters:
            setattr(module, name, self.layer.num_experts)

    def _slice_argument(self, value: Any) -> Any:
        if torch.is_tensor(value) and id(value) in self.block_tensor_ids:
            axis = 0 if value.shape[0] == self.layer.num_experts else value.ndim - 1
            return value.index_select(axis, self._kept_on(value.device))
        return value

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._restrict()
        args = tuple(self._slice_argument(a) for a in args)
        kwargs = {k: self._slice_argument(v) for k, v in kwargs.items()}
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self._restore()
        return self.expand_output(output)

    def expand_output(self, output: Any) -> Any:
        """Map the router's selections back to original expert indices; widen its logits."""
        if not isinstance(output, tuple):
            raise UnsupportedModelError(
                f"the router {self.layer.router_path} ({type(self.layer.router).__name__}) returns "
                f"{type(output).__name__}, not (logits, weights, indices); moeguard cannot restrict its selections."
            )
        num_kept = len(self.kept)
        widened_logits = False
        expanded = []
        for item in output:
            if torch.is_tensor(item) and not item.is_floating_point() and item.dtype != torch.bool:
                item = self._kept_on(item.device)[item]
            elif torch.is_tensor(item) and item.is_floating_point() and not widened_logits and item.shape[-1] == num_kept:
                # Routers return logits first; their width follows the expert count.
                full = item.new_full((*item.shape[:-1], self.layer.num_experts), float("-inf"))
                item = full.index_copy(item.ndim - 1, self._kept_on(item.device), item)
                widened_logits = True
            expanded.append(item)
        return tuple(expanded)

    def attach(self) -> None:
        router = self.layer.router
        # prepend=True: run before transformers' output-recording hooks so they see full-width logits.
        self.handles = [
            router.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True),
            router.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True, prepend=True),
        ]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._restore()


def set_config_expert_count(config: Any, old: int, new: int) -> list[str]:
    """Set every expert-count field of ``config`` (and its text config) that equals ``old`` to ``new``."""
    changed: list[str] = []
    targets = [config]
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        targets.append(config.get_text_config())
    for target in targets:
        for name in EXPERT_COUNT_NAMES:
            if getattr(target, name, None) == old and not isinstance(getattr(target, name), bool):
                setattr(target, name, new)
                changed.append(name)
    return changed


@torch.no_grad()
def prune_in_place(model: nn.Module, layers: Sequence[MoELayer], keep_sets: Sequence[list[int] | None]) -> None:
    """Slice every expert-indexed tensor to the kept experts and update all expert counters.

    ``keep_sets`` must come from :func:`normalize_keep_sets` with ``physical=True``
    (one keep count for all pruned layers, so one config field can describe it).
    """
    counts = {len(k) for k in keep_sets if k is not None}
    if not counts:
        return
    (new_count,) = counts
    old_count = next(layer.num_experts for layer, k in zip(layers, keep_sets) if k is not None)
    for layer, kept in zip(layers, keep_sets):
        if kept is None:
            continue
        for ref in layer.expert_tensors:
            old = ref.get()
            index = torch.as_tensor(kept, dtype=torch.long, device=old.device)
            sliced = old.index_select(ref.dim, index).contiguous()
            _set_tensor(ref, sliced if ref.is_buffer else nn.Parameter(sliced, requires_grad=old.requires_grad))
        for module, name in count_attributes(layer.block, layer.num_experts):
            setattr(module, name, len(kept))
        layer.num_experts = len(kept)
    config = getattr(model, "config", None)
    if config is not None and not set_config_expert_count(config, old_count, new_count):
        raise UnsupportedModelError(
            f"{getattr(config, 'model_type', type(model).__name__)}: no expert-count field "
            f"({', '.join(EXPERT_COUNT_NAMES)}) equal to {old_count} in the config, so the pruned model's "
            "config could not be updated."
        )


def shape_mismatches(model: nn.Module) -> list[str]:
    """Tensors whose shape differs from a fresh model built from ``model.config``.

    A pruned model whose config does not describe it would fail to load with
    ``from_pretrained``; building a fresh model on the meta device shows it cheaply.
    """
    with torch.device("meta"):
        fresh = type(model)(model.config)
    fresh_shapes = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    problems = []
    for name, tensor in model.state_dict().items():
        expected = fresh_shapes.get(name)
        if expected is not None and expected != tuple(tensor.shape):
            problems.append(f"{name}: has {tuple(tensor.shape)}, config gives {expected}")
    return problems
