"""What moeguard knows about one sparse MoE block, found structurally.

A transformers 5.x sparse block has a router child (a ``[E, H]`` weight, sometimes a
bias or a score-correction bias) and an experts child holding fused tensors whose
leading axis indexes the expert (``gate_up_proj [E, ...]``, ``down_proj [E, ...]``,
optional biases). The router hands ``(top_k_index, top_k_weights)`` to the experts;
that call is where routing is observed and where it can be restricted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

TensorRole = Literal["router", "experts", "block"]

# Names under which modules and configs keep the number of routed experts. Only
# attributes whose current value equals the expert count are touched.
EXPERT_COUNT_NAMES = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_routed_experts",
    "n_experts",
    "moe_num_experts",
)
TOP_K_NAMES = ("top_k", "num_experts_per_tok", "moe_k", "num_selected_experts")


@dataclass(frozen=True)
class ExpertTensor:
    """A parameter or buffer with one axis indexed by expert."""

    name: str  # state-dict name, e.g. "model.layers.0.mlp.gate.weight"
    owner: nn.Module = field(repr=False, compare=False)
    attr: str  # name of the parameter or buffer on ``owner``
    dim: int  # the expert axis
    role: TensorRole
    is_buffer: bool

    def get(self) -> torch.Tensor:
        table = self.owner._buffers if self.is_buffer else self.owner._parameters
        return table[self.attr]


@dataclass(frozen=True)
class GroupRouting:
    """Group-limited routing (DeepSeek-V3 style).

    Experts are split into ``num_groups`` contiguous groups; each token first picks
    ``groups_per_token`` groups (scored by the sum of their ``experts_scored_per_group``
    best experts) and then its top-k experts inside them.
    """

    num_groups: int
    groups_per_token: int
    experts_scored_per_group: int = 2


@dataclass
class MoELayer:
    """One sparse MoE block of a model.

    ``index`` is the block's position among the model's MoE blocks (the row of every
    ``[moe_layers, experts]`` tensor in moeguard); ``decoder_layer`` is the decoder
    layer it sits in (they differ when the first layers are dense).
    """

    index: int
    decoder_layer: int | None
    path: str
    block: nn.Module = field(repr=False)
    router_path: str
    router: nn.Module = field(repr=False)
    experts_path: str
    experts: nn.Module = field(repr=False)
    num_experts: int
    top_k: int
    shared_expert_paths: list[str]
    group_routing: GroupRouting | None
    expert_tensors: list[ExpertTensor] = field(repr=False)

    def tensors(self, role: TensorRole) -> list[ExpertTensor]:
        return [t for t in self.expert_tensors if t.role == role]

    def expert_parameters(self) -> list[nn.Parameter]:
        """The fused expert parameters (weights and biases of the routed experts)."""
        return [t.get() for t in self.tensors("experts") if not t.is_buffer]

    def router_parameters(self) -> list[nn.Parameter]:
        """Trainable router tensors (weight and bias; correction biases are buffers or frozen)."""
        return [t.get() for t in self.tensors("router") if not t.is_buffer and t.get().requires_grad]


def decoder_layer_of(path: str) -> int | None:
    """The decoder layer number in a module path ("model.layers.3.mlp" -> 3)."""
    match = re.search(r"\.(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def expert_axis(shape: torch.Size, num_experts: int) -> int | None:
    """The first axis of ``shape`` whose size is ``num_experts`` (None if there is none)."""
    for axis, size in enumerate(shape):
        if size == num_experts:
            return axis
    return None


def count_attributes(module: nn.Module, num_experts: int) -> list[tuple[nn.Module, str]]:
    """``(module, name)`` of every integer expert counter in ``module``'s subtree equal to ``num_experts``."""
    found = []
    for sub in module.modules():
        for name in EXPERT_COUNT_NAMES:
            value = sub.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value == num_experts:
                found.append((sub, name))
    return found
