"""Expert signatures in the parent's residual space, their similarities, and their standardisation.

Notation: suspect experts ``i``, parent experts ``j``; ``Q [H_S, H_P]`` maps the parent's
residual space into the suspect's (:mod:`moeguard.forensics.alignment`), so a hidden
vector ``v`` of the suspect is ``Q^T v`` in the parent's terms.

Three signatures per expert, each unchanged by every function-preserving change of the
expert and of the residual stream once mapped:

- **responses** ``f_e(norm(x))`` to shared probe residuals ``x``: invariant to neuron
  order and scale, weight layout and dtype (:func:`moeguard.forensics.signatures.expert_responses`);
- **weight Gram**: the second moment of the expert's unit weight vectors in hidden
  space, ``G_e = sum_rows r r^T / |r|^2`` (read rows folded with the norm gain; write
  rows apart), with its isotropic part removed. A sum over neurons does not depend on
  their order, and unit rows do not depend on a per-neuron scale (up times ``a``, down
  divided by ``a``), so this is the weight signal that survives neuron permutation.
  Large hidden sizes use a fixed random sketch ``G_e Z`` (``Z [H_P, k]``);
- **router row** (folded with the norm gain).

Similarities are cosines; :func:`standardise` turns a suspect x parent matrix into
evidence in units of its own background spread.
"""

from __future__ import annotations

import math

import torch

# Above this hidden size the Gram matrices are sketched with this many random directions.
EXACT_GRAM_UP_TO = 256
SKETCH_DIRECTIONS = 128


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x_i / |x_i|`` over the flattened trailing axes (float32; a zero row stays zero)."""
    flat = x.flatten(1).float()
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).reshape(x.shape)


def cosine_matrix(suspect: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``C [Es, Ep]``: cosine of every suspect row with every parent row (trailing axes flattened)."""
    return unit_rows(suspect).flatten(1) @ unit_rows(parent).flatten(1).T


def sketch_directions(hidden: int, *, seed: int) -> torch.Tensor | None:
    """``Z [H, k]`` for the Gram sketch, or None when ``H`` is small enough for exact Gram matrices."""
    if hidden <= EXACT_GRAM_UP_TO:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(hidden, SKETCH_DIRECTIONS, generator=generator) / math.sqrt(SKETCH_DIRECTIONS)


def gram_signature(rows: torch.Tensor, basis: torch.Tensor | None, sketch: torch.Tensor | None) -> torch.Tensor:
    """``[E, D]``: each expert's centred Gram matrix of unit rows, in the parent's space, flattened.

    ``rows [E, K, H_own]``; ``basis [H_own, H_P]`` maps the parent's space into this
    model's (None: this is the parent). With ``Q = basis`` and ``Z = sketch`` the
    signature is ``Q^T R^T R Q Z`` for unit rows ``R`` (``Z = I`` without a sketch), minus
    its projection on ``vec(Z)`` (the isotropic part ``(tr / H) Z``), normalised.
    """
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    if basis is None:
        parent_hidden = rows.shape[-1]
        directions = sketch if sketch is not None else torch.eye(parent_hidden)
        projected = unit @ directions  # [E, K, k]
        gram = unit.transpose(1, 2) @ projected  # [E, H_P, k]
    else:
        basis = basis.float()
        directions = sketch if sketch is not None else torch.eye(basis.shape[1])
        projected = unit @ (basis @ directions)
        gram = basis.T @ (unit.transpose(1, 2) @ projected)
    flat = gram.flatten(1)
    isotropic = directions.flatten() / directions.flatten().norm()
    flat = flat - (flat @ isotropic).unsqueeze(1) * isotropic
    return unit_rows(flat)


def standardise(similarity: torch.Tensor) -> torch.Tensor:
    """Evidence ``Z [Es, Ep]`` from a similarity matrix, in units of its own background.

    Each expert of the smaller side is centred on the median of its similarities to
    the larger side (a derived expert has one outstanding entry, which the median
    ignores); the centred entries are divided by their pooled robust spread
    ``1.4826 * median |.|``. Location and scale come from the matrix itself, so the
    evidence does not depend on how similar unrelated experts happen to be in a given
    model, only on how much one pair stands out from the rest.
    """
    return standardise_batch(similarity.unsqueeze(0))[0]


def standardise_batch(similarity: torch.Tensor) -> torch.Tensor:
    """:func:`standardise` of every matrix in ``similarity [n, Es, Ep]``."""
    x = similarity.double()
    axis = 2 if x.shape[2] >= x.shape[1] else 1
    centred = x - x.median(dim=axis, keepdim=True).values
    spread = 1.4826 * centred.abs().flatten(1).median(dim=1).values
    return centred / spread.clamp_min(1e-12).reshape(-1, 1, 1)


def pair_evidence(*signals: torch.Tensor) -> torch.Tensor:
    """Evidence that suspect expert ``i`` is parent expert ``j``: ``Z = sum_k Z_k / sqrt(K)``."""
    return sum(signals) / math.sqrt(len(signals))
