"""The residual stream of a pre-norm transformer: what reads it, what writes it, through which norms.

Every family moeguard handles is pre-norm: each block reads ``norm(x)`` of the residual
stream ``x`` and adds its output back to ``x``. With RMSNorm,
``norm(x) = g * x / rms(x)``, so the maps ``x' = c Q x`` with ``Q`` having orthonormal
columns (``Q^T Q = I``: permutations, sign flips, rotations, zero-padded wider streams)
leave the model's function unchanged once the gains ``g`` are folded into the linear
maps that read the norm's output: every read matrix ``R`` becomes ``R diag(g) Q^T`` and
every write matrix ``W`` (embeddings, attention output, expert down projections)
becomes ``c Q W``. Whatever such a map did, comparing two models needs:

- the norm in front of each MoE block and its per-coordinate gain (:func:`norm_gain`),
  so that read weights can be compared *folded* (a gain moved between a norm and the
  next linear layer then changes nothing);
- the token rows (:func:`token_rows`): embedding rows (written into the stream) and
  head rows folded with the final norm's gain (read from it), one pair per token;
- residual states on probe tokens (:func:`probe_residuals`): the stream entering the
  first decoder layer's feed-forward norm, which carving cannot change (only the
  embeddings and the first attention block have acted on it).

Norms are found by the names every transformers MoE family gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeguard.errors import UnsupportedModelError
from moeguard.models import MoELayer, MoEModel

# The norm whose output a decoder layer's feed-forward block reads (first name found wins:
# sandwich-norm families have a pre-feed-forward norm beside the post-attention one).
FEED_FORWARD_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm")
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f")


def base_model(moe: MoEModel) -> nn.Module:
    """The decoder stack (``model.model`` for a ``...ForCausalLM``)."""
    return moe.model.base_model


def decoder_layers(moe: MoEModel) -> nn.ModuleList:
    layers = getattr(base_model(moe), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{moe.model_type}: its decoder layers are not a `layers` list on the base model.")
    return layers


def _named_child(module: nn.Module, names: tuple[str, ...], what: str, where: str) -> nn.Module:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    raise UnsupportedModelError(
        f"{where} has no {what} (looked for {', '.join(names)}); moeguard compares residual streams of pre-norm models."
    )


def feed_forward_norm(moe: MoEModel, decoder_layer: int) -> nn.Module:
    """The norm in front of decoder layer ``decoder_layer``'s feed-forward (MoE or dense) block."""
    return _named_child(decoder_layers(moe)[decoder_layer], FEED_FORWARD_NORM_NAMES, "feed-forward norm", f"decoder layer {decoder_layer}")


def block_norm(moe: MoEModel, layer: MoELayer) -> nn.Module:
    """The norm whose output MoE layer ``layer`` (its router and experts) reads."""
    if layer.decoder_layer is None:
        raise UnsupportedModelError(f"MoE layer {layer.index} ({layer.path}) is not inside a numbered decoder layer.")
    return feed_forward_norm(moe, layer.decoder_layer)


def final_norm(moe: MoEModel) -> nn.Module:
    return _named_child(base_model(moe), FINAL_NORM_NAMES, "final norm", f"{moe.model_type}'s base model")


@torch.no_grad()
def norm_gain(norm: nn.Module, hidden: int) -> torch.Tensor:
    """The per-coordinate gain ``g`` of an element-wise affine norm, in float32 on the CPU.

    ``g = (norm(a s) - norm(-a s)) / (2 s)`` for the alternating signs ``s = (1, -1, 1, ...)``
    (mean 0, RMS 1) and a large ``a``: any bias cancels, normalising turns ``a s`` back
    into ``s``, and the norm's epsilon is negligible beside ``a^2``. This reads the
    gain of RMSNorm, LayerNorm and ``(1 + w)``-parametrised norms alike, without
    knowing how the module stores it.
    """
    weight = next((p for p in norm.parameters()), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        raise UnsupportedModelError(f"the norm {type(norm).__name__} has no weights loaded (meta device).")
    signs = torch.ones(hidden, device=device, dtype=torch.float32)
    signs[1::2] = -1
    plus = norm((64 * signs).to(dtype).unsqueeze(0)).float()
    minus = norm((-64 * signs).to(dtype).unsqueeze(0)).float()
    return ((plus - minus)[0] / (2 * signs)).cpu()


@dataclass
class TokenRows:
    """Vectors of the residual space, one per vocabulary entry (float32, CPU).

    ``embedding [V, H]`` are written into the stream; ``head [V, H]`` are the output
    head's rows with the final norm's gain folded in (they read the stream), or None
    when the head is the embedding itself (tied weights and a uniform final gain add
    nothing new).
    """

    embedding: torch.Tensor
    head: torch.Tensor | None


@torch.no_grad()
def token_rows(moe: MoEModel, ids: torch.Tensor) -> TokenRows:
    """The rows of the tokens ``ids`` (gathered before the float copy: a large vocabulary's whole
    matrices in float32 would be gigabytes per model)."""
    embedding_module = moe.model.get_input_embeddings()
    head_module = moe.model.get_output_embeddings()
    embedding = embedding_module.weight.detach()[ids.to(embedding_module.weight.device)].float().cpu()
    if head_module is None or getattr(head_module, "weight", None) is None:
        return TokenRows(embedding, None)
    gain = norm_gain(final_norm(moe), embedding.shape[1])
    head = head_module.weight.detach()[ids.to(head_module.weight.device)].float().cpu() * gain
    tied = head_module.weight is embedding_module.weight and bool(torch.allclose(gain, gain[0].expand_as(gain)))
    return TokenRows(embedding, None if tied else head)


class _Captured(Exception):
    """Raised inside a forward pass once the residual states are captured (stops the pass there)."""


@torch.no_grad()
def probe_residuals(moe: MoEModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The residual stream entering decoder layer 0's feed-forward norm on ``input_ids [B, T]``: ``[B * T, H]`` float32.

    The forward pass stops there, so nothing after the first attention block runs (or
    needs its weights in memory).
    """
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().float().cpu())
        raise _Captured

    norm = feed_forward_norm(moe, 0)
    handle = norm.register_forward_pre_hook(grab)
    try:
        ids = input_ids.to(moe.model.get_input_embeddings().weight.device)
        moe.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UnsupportedModelError(f"{moe.model_type}: the forward pass never reached decoder layer 0's feed-forward norm.")
    return captured[0].reshape(-1, captured[0].shape[-1])
