"""What is compared: each expert's responses to probe inputs, and each router row.

An expert is identified by the function it computes, not by how its weights are
laid out: responses ``Y_e = f_e(X)`` on shared probes do not change when the
intermediate neurons of an expert are permuted or rescaled, when the weights are
stored transposed (GPT-OSS) or fused differently, and they are computed by the
layer's own experts module, so every family's activation, biases and clamping are
the ones the model uses.

Responses multiply three weight matrices, so their similarity fades fastest when
fine-tuning moves the weights far from the parent's. The weights themselves fade
only linearly and are the second signal (:func:`expert_weight_rows`); router rows
are the third.
"""

from __future__ import annotations

import torch

from moeguard.errors import UnsupportedModelError
from moeguard.models import MoEModel, MoELayer


def router_rows(layer: MoELayer) -> torch.Tensor:
    """The router weight ``[E, H]`` of ``layer`` in float32 (biases carry no identity and are left out)."""
    weights = [t.get() for t in layer.tensors("router") if t.dim == 0 and t.get().ndim == 2]
    if not weights:
        raise UnsupportedModelError(f"MoE layer {layer.index} ({layer.router_path}) has no 2-D router weight to compare.")
    return weights[0].detach().to("cpu", torch.float32, copy=True)


def _hidden_axis(layer: MoELayer, name: str, shape: torch.Size, hidden: int) -> int:
    """The axis of a fused ``[E, a, b]`` expert weight that indexes the hidden space.

    Weights stored like ``nn.Linear`` (``[out, in]``) have it last on the input side
    (gate/up) and first on the output side (down); transposed layouts (GPT-OSS)
    the other way round. Where the shape alone decides, it decides.
    """
    candidates = [axis for axis in (1, 2) if shape[axis] == hidden]
    if len(candidates) == 1:
        return candidates[0]
    transposed = getattr(layer.experts, "is_transposed", None)
    if candidates and isinstance(transposed, bool):
        output_side = name.startswith("down")
        return 1 if output_side != transposed else 2
    raise UnsupportedModelError(
        f"MoE layer {layer.index}: cannot tell which axis of {layer.experts_path}.{name} {tuple(shape)} is the hidden "
        f"axis (hidden size {hidden}); its experts module does not say whether it stores weights transposed."
    )


@torch.no_grad()
def expert_weight_rows(layer: MoELayer, *, max_rows: int | None = None, seed: int = 0) -> torch.Tensor:
    """``V [E, K, H]``: each expert's weight matrices with the hidden axis last, rows stacked (float32).

    Biases are left out. With ``max_rows`` a fixed random subset of the ``K`` rows is
    kept (the same subset for every model with the same expert shapes): inner
    products over the subset estimate those over all rows.
    """
    hidden = layer_hidden_size(layer)
    blocks = []
    for ref in layer.tensors("experts"):
        tensor = ref.get()
        if ref.is_buffer or tensor.ndim != 3:
            continue
        axis = _hidden_axis(layer, ref.attr, tensor.shape, hidden)
        blocks.append(tensor.detach().movedim(axis, -1).reshape(tensor.shape[0], -1, hidden))
    rows = torch.cat(blocks, dim=1)
    if max_rows is not None and rows.shape[1] > max_rows:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(rows.shape[1], generator=generator)[:max_rows].sort().values
        rows = rows[:, chosen.to(rows.device)]
    return rows.float().cpu()


def layer_hidden_size(layer: MoELayer) -> int:
    """The width of the hidden states the layer routes and feeds to its experts."""
    return router_rows(layer).shape[1]


@torch.no_grad()
def expert_responses(moe: MoEModel, layer: int, probes: torch.Tensor, *, experts_per_call: int = 16) -> torch.Tensor:
    """``Y [E, *probes.shape[:-1], H]``: every expert of ``layer`` applied to every probe, in float32.

    The experts run in the model's own dtype and device (a bf16 model answers in
    bf16); the answers are returned on the CPU in float32.
    """
    moe_layer = moe.layers[layer]
    weight = moe_layer.expert_parameters()[0]
    if weight.device.type == "meta":
        raise UnsupportedModelError(
            f"the experts of MoE layer {layer} ({moe_layer.experts_path}) are offloaded (on the meta device); "
            "load the model without offloading its experts to compare it."
        )
    flat = probes.reshape(-1, probes.shape[-1]).to(device=weight.device, dtype=weight.dtype)
    num_probes = flat.shape[0]
    outputs = []
    for start in range(0, moe_layer.num_experts, experts_per_call):
        experts = torch.arange(start, min(start + experts_per_call, moe_layer.num_experts), device=weight.device)
        hidden = flat.repeat(len(experts), 1)
        index = experts.repeat_interleave(num_probes).unsqueeze(1)
        answer = moe.expert_outputs(layer, hidden, index)
        outputs.append(answer.reshape(len(experts), num_probes, -1).float().cpu())
    responses = torch.cat(outputs)
    return responses.reshape(moe_layer.num_experts, *probes.shape[:-1], responses.shape[-1])
