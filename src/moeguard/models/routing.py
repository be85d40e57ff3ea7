"""Observing the routing decisions a model actually uses.

The decision is read where it is consumed: a forward pre-hook on each experts
module receives ``(hidden_states, top_k_index, top_k_weights)``. Recomputing top-k
from router logits would be wrong for routers with sigmoid scores, correction
biases or group limits, and some families do not return logits at all.

Padding is excluded with the attention mask of the running forward pass, read by a
pre-hook on the top-level model. During cached generation the mask covers past and
current positions; its last ``seq_len`` columns belong to the current tokens.

Each routed expert's own output ``y_{t,i}`` (for REAP-like statistics) is computed in
the same pass where the experts module allows it: transformers' ``grouped_mm`` and
``batched_mm`` experts compute every routed pair's output and then
``out_t = sum_i w_{t,i} y_{t,i}`` over the slots in order, so the capture calls them
once with every pair as a top-1 route of weight 1 (``y`` for all pairs, the work of
the ordinary call) and forms ``out`` itself from ``y`` with the same operations: the
block output is bit for bit the ordinary one, at no second pass. Other experts
modules get their pairs' outputs from a second call on the selected tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeguard.errors import InputError, UnsupportedModelError
from moeguard.models.layers import MoELayer

_INDEX_NAMES = ("top_k_index", "router_indices", "topk_indices", "selected_experts", "top_k_indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "topk_weights", "router_scores", "top_k_scores")


@dataclass
class RoutingEvent:
    """The routing of one MoE layer in one forward call, for the selected tokens only.

    ``top_k_index`` is ``[n, k]`` (original expert numbering when experts are masked),
    ``top_k_weights`` ``[n, k]``, ``hidden_states`` ``[n, H]`` the experts' input.
    ``token_positions`` gives each row's ``(batch, position)`` in the forward call.
    """

    layer: MoELayer
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    hidden_states: torch.Tensor
    token_positions: torch.Tensor
    expert_outputs: torch.Tensor | None = None  # [n, k, H] unweighted y_{t,i}, when the capture computes them


def pair_outputs(layer: MoELayer, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """``[n * k, H]``: every routed pair's unweighted output, by calling the layer's experts module once with
    each ``(token, expert)`` pair as a top-1 route of weight 1 (module hooks bypassed)."""
    k = top_k_index.shape[1]
    repeated = hidden_states.repeat_interleave(k, dim=0)
    flat_index = top_k_index.reshape(-1, 1)
    ones = torch.ones(flat_index.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    return layer.experts.forward(repeated, flat_index, ones)


def combines_pair_outputs(layer: MoELayer) -> bool:
    """Whether the layer's experts module forms its output as ``sum_i w_{t,i} y_{t,i}`` over the slots in order
    from per-pair outputs (transformers' ``grouped_mm`` / ``batched_mm`` experts implementations)."""
    experts = layer.experts
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    return hasattr(experts, "has_gate") and not getattr(experts, "_is_expert_parallel", False) and \
        implementation in ("grouped_mm", "batched_mm")


def combine_pair_outputs(outputs: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out_t = sum_i w_{t,i} y_{t,i}`` from ``outputs [n * k, H]`` and ``top_k_weights [n, k]``, with the
    operations (and so the rounding) of transformers' grouped / batched experts implementations."""
    num_tokens, k = top_k_weights.shape
    weighted = outputs * top_k_weights.reshape(-1).unsqueeze(-1)
    return weighted.view(num_tokens, k, outputs.shape[-1]).sum(dim=1).to(dtype)


def routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` from an experts module's call arguments."""
    values = list(args)
    hidden = values[0] if values else kwargs.get("hidden_states")
    index = values[1] if len(values) > 1 else next((kwargs[n] for n in _INDEX_NAMES if n in kwargs), None)
    weights = values[2] if len(values) > 2 else next((kwargs[n] for n in _WEIGHT_NAMES if n in kwargs), None)
    if not (torch.is_tensor(hidden) and torch.is_tensor(index) and torch.is_tensor(weights)):
        raise UnsupportedModelError(
            "an experts module was called without (hidden_states, top_k_index, top_k_weights); "
            f"got positional {len(args)} and keywords {sorted(kwargs)}."
        )
    if index.is_floating_point() and not weights.is_floating_point():
        index, weights = weights, index
    return hidden, index, weights


class RoutingCapture:
    """Routing decisions recorded while a :meth:`MoEModel.capture_routing` block runs.

    With ``keep=True`` (the default) the selections of every layer are stored and
    available through :meth:`indices`, :meth:`weights` and :meth:`counts`. An
    ``on_route`` callback sees every :class:`RoutingEvent` as it happens, so
    statistics can be accumulated without storing anything.

    ``selection``, when set to a ``[batch, seq]`` boolean tensor, replaces the
    attention mask as the set of tokens recorded by the following forward calls
    (for example, answer tokens only).

    With ``expert_outputs=True`` every event carries the selected pairs' unweighted
    expert outputs (see the module docstring for how they are computed in the same pass).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[MoELayer],
        *,
        keep: bool = True,
        on_route: Callable[[RoutingEvent], None] | None = None,
        expert_outputs: bool = False,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.keep = keep
        self.on_route = on_route
        self.expert_outputs = expert_outputs
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.selection: torch.Tensor | None = None
        self._current_mask: torch.Tensor | None = None
        self._index: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._weights: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._handles: list[Any] = []

    # ---------------------------------------------------------------- hooks
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if torch.is_tensor(input_ids) else embeds
        if not torch.is_tensor(reference):
            self._current_mask = None
            return
        batch, seq_len = reference.shape[0], reference.shape[1]
        mask = self.selection
        if mask is None:
            attention = kwargs.get("attention_mask")
            mask = attention if torch.is_tensor(attention) and attention.ndim == 2 else None
        if mask is None:
            self._current_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=reference.device)
        else:
            if mask.shape[0] != batch or mask.shape[1] < seq_len:
                raise InputError(
                    f"routing capture: token selection of shape {tuple(mask.shape)} does not cover the "
                    f"forward input of shape ({batch}, {seq_len})."
                )
            self._current_mask = mask[:, -seq_len:].to(device=reference.device, dtype=torch.bool)

    def _experts_pre_hook(self, layer: MoELayer) -> Callable:
        one_pass = self.expert_outputs and combines_pair_outputs(layer)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden, index, weights = routing_arguments(args, kwargs)
            mask = self._current_mask
            if mask is None:
                raise InputError(
                    "routing capture saw an experts call outside a forward of the whole model; call the model "
                    "(model(input_ids=..., attention_mask=...)) inside capture_routing()."
                )
            flat = mask.reshape(-1)
            if flat.numel() != index.shape[0]:
                raise UnsupportedModelError(
                    f"layer {layer.index}: the experts received {index.shape[0]} tokens but the forward input has "
                    f"{flat.numel()}; cannot tell padding apart in this model."
                )
            rows = flat.nonzero().squeeze(-1)
            selected_index = index.detach().index_select(0, rows)
            selected_weights = weights.detach().index_select(0, rows)
            if self.keep:
                self._index[layer.index].append(selected_index)
                self._weights[layer.index].append(selected_weights)
            if self.on_route is None:
                return None
            selected_hidden = hidden.detach().index_select(0, rows)
            positions = mask.nonzero()
            weight_dtype = next(t.get().dtype for t in layer.tensors("experts") if not t.is_buffer)
            if one_pass and hidden.dtype == weight_dtype:
                # Every pair as a top-1 route of weight 1; the forward hook forms the block output.
                self._pending[layer.index] = (index, weights, rows, positions, hidden)
                k = index.shape[1]
                repeated = hidden.repeat_interleave(k, dim=0)
                ones = torch.ones((index.numel(), 1), dtype=hidden.dtype, device=hidden.device)
                return (repeated, index.reshape(-1, 1), ones), {}
            outputs = None
            if self.expert_outputs and rows.numel():
                with torch.no_grad():
                    outputs = pair_outputs(layer, selected_hidden, selected_index).view(*selected_index.shape, -1)
            self.on_route(RoutingEvent(layer, selected_index, selected_weights, selected_hidden, positions, outputs))
            return None

        return hook

    def _experts_hook(self, layer: MoELayer) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            pending = self._pending.pop(layer.index, None)
            if pending is None:
                return None
            index, weights, rows, positions, hidden = pending
            pairs = output.detach().view(*index.shape, -1).index_select(0, rows)
            self.on_route(RoutingEvent(layer, index.detach().index_select(0, rows), weights.detach().index_select(0, rows),
                                       hidden.detach().index_select(0, rows), positions, pairs))
            return combine_pair_outputs(output, weights, hidden.dtype)

        return hook

    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(
                layer.experts.register_forward_pre_hook(self._experts_pre_hook(layer), with_kwargs=True)
            )
            if self.expert_outputs and self.on_route is not None and combines_pair_outputs(layer):
                self._handles.append(
                    layer.experts.register_forward_hook(self._experts_hook(layer), with_kwargs=True, always_call=True)
                )

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending.clear()

    # ---------------------------------------------------------------- results
    def indices(self, layer: int) -> torch.Tensor:
        """``[tokens, top_k]`` expert indices chosen in MoE layer ``layer``."""
        chunks = self._index[layer]
        k = self.layers[layer].top_k
        return torch.cat(chunks) if chunks else torch.empty(0, k, dtype=torch.long)

    def weights(self, layer: int) -> torch.Tensor:
        """``[tokens, top_k]`` routing weights handed to the experts in MoE layer ``layer``."""
        chunks = self._weights[layer]
        k = self.layers[layer].top_k
        return torch.cat(chunks) if chunks else torch.empty(0, k)

    def num_tokens(self, layer: int = 0) -> int:
        return sum(chunk.shape[0] for chunk in self._index[layer])

    def counts(self, layer: int) -> torch.Tensor:
        """``[experts]`` number of routing decisions that went to each expert of ``layer``."""
        index = self.indices(layer)
        return torch.bincount(index.reshape(-1).cpu(), minlength=self.layers[layer].num_experts)
