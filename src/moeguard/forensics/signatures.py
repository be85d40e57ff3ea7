"""What identifies an expert, read from one MoE layer: its weights by side, its router row, its responses.

Fused expert tensors are ``[E, a, b]`` with one of ``a, b`` the hidden axis. Tensors on
the *read* side (gate and up projections) take the normalised residual as input; the
*write* side (the down projection) produces what is added back to the stream. A
residual map ``Q`` acts on the hidden axis of both; the norm's gain is folded into the
read side only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeguard.errors import UnsupportedModelError
from moeguard.models import ExpertTensor, MoELayer, MoEModel


def router_weight(layer: MoELayer) -> torch.Tensor:
    """The router weight ``[E, H]`` of ``layer`` as stored (biases carry no identity and are left out)."""
    weights = [t.get() for t in layer.tensors("router") if t.dim == 0 and t.get().ndim == 2]
    if not weights:
        raise UnsupportedModelError(f"MoE layer {layer.index} ({layer.router_path}) has no 2-D router weight to compare.")
    return weights[0]


def layer_hidden_size(layer: MoELayer) -> int:
    """The width of the hidden states the layer routes and feeds to its experts."""
    return router_weight(layer).shape[1]


def _hidden_axis(layer: MoELayer, name: str, shape: torch.Size, hidden: int) -> int:
    """The axis of a fused ``[E, a, b]`` expert weight that indexes the hidden space.

    Weights stored like ``nn.Linear`` (``[out, in]``) have it last on the read side
    (gate/up) and first on the write side (down); transposed layouts (GPT-OSS) the
    other way round. Where the shape alone decides, it decides.
    """
    candidates = [axis for axis in (1, 2) if shape[axis] == hidden]
    if len(candidates) == 1:
        return candidates[0]
    transposed = getattr(layer.experts, "is_transposed", None)
    if candidates and isinstance(transposed, bool):
        return 1 if is_write_side(name) != transposed else 2
    raise UnsupportedModelError(
        f"MoE layer {layer.index}: cannot tell which axis of {layer.experts_path}.{name} {tuple(shape)} is the hidden "
        f"axis (hidden size {hidden}); its experts module does not say whether it stores weights transposed."
    )


def is_write_side(name: str) -> bool:
    """Whether a fused expert tensor named ``name`` writes into the residual stream (down projections)."""
    return name.startswith("down")


@dataclass(frozen=True)
class ExpertMatrix:
    """A fused ``[E, a, b]`` expert weight, the axis that is hidden, and its side."""

    ref: ExpertTensor
    hidden_axis: int
    writes: bool


def expert_matrices(layer: MoELayer) -> list[ExpertMatrix]:
    """The 3-D expert weights of ``layer`` (biases left out)."""
    hidden = layer_hidden_size(layer)
    found = []
    for ref in layer.tensors("experts"):
        tensor = ref.get()
        if ref.is_buffer or tensor.ndim != 3:
            continue
        found.append(ExpertMatrix(ref, _hidden_axis(layer, ref.attr, tensor.shape, hidden), is_write_side(ref.attr)))
    if not any(m.writes for m in found) or all(m.writes for m in found):
        raise UnsupportedModelError(
            f"MoE layer {layer.index}: expected fused read (gate/up) and write (down) expert weights in "
            f"{layer.experts_path}, found {[m.ref.attr for m in found]}."
        )
    return found


@torch.no_grad()
def expert_rows(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reads [E, Kr, H], writes [E, Kw, H])``: every expert's weight vectors in hidden space, float32 on the CPU.

    A read row is one input weight vector of one neuron of the gate or up projection;
    a write row is one neuron's output vector of the down projection.
    """
    reads, writes = [], []
    for matrix in expert_matrices(layer):
        tensor = matrix.ref.get().detach()
        rows = tensor.movedim(matrix.hidden_axis, -1).reshape(tensor.shape[0], -1, tensor.shape[matrix.hidden_axis])
        (writes if matrix.writes else reads).append(rows.float().cpu())
    return torch.cat(reads, dim=1), torch.cat(writes, dim=1)


@torch.no_grad()
def expert_neurons(layer: MoELayer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(reads, writes)``: each a list of ``[E, I, H]`` tensors, one per part of a neuron, float32 on the CPU.

    Neuron ``n`` of an expert reads the residual through its gate row and its up row
    (two halves of the fused read weight, or interleaved when the experts module says
    ``is_concatenated = False``) and writes through its down column. Experts with a
    single read projection have one read part.
    """
    reads, writes = expert_rows(layer)
    neurons = writes.shape[1]
    if reads.shape[1] == neurons:
        return [reads], [writes]
    if reads.shape[1] != 2 * neurons:
        raise UnsupportedModelError(
            f"MoE layer {layer.index}: {reads.shape[1]} read rows for {neurons} neurons per expert; expected one or two per neuron."
        )
    if getattr(layer.experts, "is_concatenated", True):
        return [reads[:, :neurons], reads[:, neurons:]], [writes]
    return [reads[:, 0::2], reads[:, 1::2]], [writes]


@torch.no_grad()
def expert_responses(moe: MoEModel, layer: int, inputs: torch.Tensor, *, experts_per_call: int = 16) -> torch.Tensor:
    """``Y [E, N, H]``: every expert of ``layer`` applied to every row of ``inputs [N, H]`` (the block's input), float32.

    The experts run in the model's own dtype and device (a bf16 model answers in
    bf16) through its own experts module; the answers are returned on the CPU.
    """
    moe_layer = moe.layers[layer]
    weight = moe_layer.expert_parameters()[0]
    if weight.device.type == "meta":
        raise UnsupportedModelError(
            f"the experts of MoE layer {layer} ({moe_layer.experts_path}) are not in memory (meta device); "
            "load the model without offloading its experts, or pass its directory so they are read from disk."
        )
    flat = inputs.to(device=weight.device, dtype=weight.dtype)
    num_inputs = flat.shape[0]
    outputs = []
    for start in range(0, moe_layer.num_experts, experts_per_call):
        experts = torch.arange(start, min(start + experts_per_call, moe_layer.num_experts), device=weight.device)
        hidden = flat.repeat(len(experts), 1)
        index = experts.repeat_interleave(num_inputs).unsqueeze(1)
        answer = moe.expert_outputs(layer, hidden, index)
        outputs.append(answer.reshape(len(experts), num_inputs, -1).float().cpu())
    return torch.cat(outputs)
