"""Keyed embeddings: a representation only the full expert set can read.

The carver's head start lives in the shared weights: on the default demo model a
carve whose kept experts are re-initialised re-aligns nearly as fast as the carve
itself, while re-initialising the embeddings or attention makes it as slow as (or
slower than) training from scratch (``benchmarks/RESULTS.md``). This defense makes
the embeddings useless without every expert of the first MoE layer:

- a random set ``U`` of ``d`` residual coordinates is chosen, and every token ``t``
  gets a random key ``k(t)`` supported on ``U`` (norm ``scale`` times the mean norm of
  an embedding row), added to its input embedding: ``e'(t) = e(t) + k(t)``;
- the first MoE decoder layer's norms are zeroed on ``U``, so neither its attention
  nor its router and experts see the keys; they pass through the residual stream;
- hardening trains that layer (attention, router, experts; the embeddings, the norms
  and every later layer frozen) so that its output equals the undefended model's
  (``repair``, a regression on the residual stream after the layer) while attention
  does not write along any token's own key (``key_hold``). The only way to match is for each token's
  own experts to write ``-k(t)``: a lookup from the token's identity, which no
  expert can generalise to tokens routed elsewhere, since the keys are random.

A carve keeps a few experts per layer; tokens whose experts were removed keep their
key, a vector far larger than the residual stream around it, in every later layer.
Later layers are unchanged, so the full model computes what the undefended one did to
within the repair error. The defense is not a function-preserving reparametrisation,
but its coordinates can be found (where the first layer's norms are zero), which is
what the canonicalising attacker of :mod:`moeguard.attack.canonical` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeguard.attack.canonical import first_decoder_layer, hidden_size, layer_norms
from moeguard.errors import InputError, UnsupportedModelError
from moeguard.eval.evaluate import causal_lm
from moeguard.models import MoEModel


@dataclass
class KeyedEmbedding:
    """The key coordinates ``U`` and every token's key ``[vocab, hidden]`` (zero outside ``U``)."""

    coordinates: torch.Tensor
    keys: torch.Tensor


def token_keys(vocab: int, hidden: int, dims: int, norm: float, seed: int) -> KeyedEmbedding:
    """``d = dims`` random coordinates of ``hidden`` and a Gaussian key of norm ``norm`` per token on them."""
    if not 0 < dims < hidden:
        raise InputError(f"key_dims must be between 1 and the hidden size - 1 ({hidden - 1}), got {dims}.",
                         arguments=("key_dims",))
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.randperm(hidden, generator=generator)[:dims].sort().values
    values = torch.randn(vocab, dims, generator=generator)
    keys = torch.zeros(vocab, hidden)
    keys[:, coordinates] = norm * values / values.norm(dim=1, keepdim=True)
    return KeyedEmbedding(coordinates, keys)


def blinded_norms(moe: MoEModel) -> list[nn.Module]:
    """The first MoE decoder layer's norms (before attention and before the MoE block), refused when missing."""
    layer = first_decoder_layer(moe)
    norms = layer_norms(layer, hidden_size(moe))
    if len(norms) < 2:
        raise UnsupportedModelError(
            f"{type(layer).__name__}: expected the two norms before attention and before the MoE block, found "
            f"{len(norms)}; keyed embeddings need a pre-norm decoder layer."
        )
    return norms


@torch.no_grad()
def add_keys(moe: MoEModel, *, scale: float, dims: int, seed: int) -> KeyedEmbedding:
    """Add every token's key to the input embedding and blind the first MoE layer's norms to ``U``, in place."""
    embedding = causal_lm(moe).get_input_embeddings().weight
    vocab, hidden = embedding.shape
    norm = scale * float(embedding.float().norm(dim=1).mean())
    keyed = token_keys(vocab, hidden, dims, norm, seed)
    embedding.add_(keyed.keys.to(device=embedding.device, dtype=embedding.dtype))
    for module in blinded_norms(moe):
        module.weight[keyed.coordinates.to(module.weight.device)] = 0
    return keyed


def trainable_parameters(moe: MoEModel) -> list[nn.Parameter]:
    """What hardening trains: the first MoE decoder layer without its norms (which must stay blind to ``U``)."""
    frozen = {id(p) for norm in blinded_norms(moe) for p in norm.parameters()}
    return [p for p in first_decoder_layer(moe).parameters() if id(p) not in frozen and p.requires_grad]


def key_leak(written: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_t (<a_t, k(t)> / |k(t)|^2)^2``: how much of its own key attention writes at each token (cancelling it
    would be ``-1``); ``written [B, T, H]`` are attention's outputs, ``keys [B, T, H]`` each token's key."""
    norms = keys.float().pow(2).sum(-1).clamp_min(1e-12)
    along = (written.float() * keys.float()).sum(-1) / norms
    weights = mask.to(along.dtype)
    return (along.pow(2) * weights).sum() / weights.sum().clamp_min(1)
