"""Similarity matrices between suspect and parent experts, under every null permutation.

Notation: suspect experts ``i``, parent experts ``j``, shifts ``s = 0 .. m-1`` of the
hidden coordinates (``s = 0`` is the comparison itself, ``s >= 1`` are null samples;
see :mod:`moeguard.forensics.probes`).
"""

from __future__ import annotations

import math

import torch

from moeguard.forensics.probes import conjugate_responses, conjugate_rows


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x_i / |x_i|`` over the flattened trailing axes (float32; a zero row stays zero)."""
    flat = x.flatten(1).float()
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).reshape(x.shape)


def response_similarities(suspect: torch.Tensor, parent: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``C [m, Es, Ep]`` with ``C[s, i, j] = cos(vec(g^s . Y^S_i), vec(Y^P_j))``.

    ``suspect [Es, B, m, H]`` and ``parent [Ep, B, m, H]`` are expert responses on
    the orbit probes; ``g^s . Y`` is the response of the conjugated expert.
    Conjugation only moves entries, so rows are normalised once.
    """
    suspect, parent = unit_rows(suspect), unit_rows(parent).flatten(1)
    return torch.stack([conjugate_responses(suspect, perms, s).flatten(1) @ parent.T for s in range(len(perms))])


def row_similarities(suspect: torch.Tensor, parent: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``R [m, Es, Ep]`` with ``R[s, i, j] = cos(vec(g^s V^S_i), vec(V^P_j))``.

    ``V [E, ..., H]`` has the hidden axis last (router rows ``[E, H]``, expert weights
    ``[E, K, H]``); ``g^s`` gathers that axis, as it does for a conjugated model.
    """
    suspect, parent = unit_rows(suspect), unit_rows(parent).flatten(1)
    return torch.stack([conjugate_rows(suspect, perms, s).flatten(1) @ parent.T for s in range(len(perms))])


def leave_one_out_z(samples: torch.Tensor) -> torch.Tensor:
    """Standardise every sample against the others along axis 0.

    ``Z_s = (C_s - mean_{t != s} C_t) / std_{t != s} C_t`` (sample std, ``m - 2`` degrees
    of freedom). Treating every sample alike keeps ``s = 0`` exchangeable with the null
    samples, so the randomisation test stays exact.
    """
    m = samples.shape[0]
    if m < 3:
        raise ValueError(f"leave-one-out standardisation needs at least 3 samples, got {m}.")
    x = samples.double()
    total, squares = x.sum(0), (x * x).sum(0)
    n = m - 1
    mean = (total - x) / n
    variance = ((squares - x * x) - n * mean * mean) / (n - 1)
    return (x - mean) / variance.clamp_min(0).sqrt().clamp_min(1e-12)


def pair_evidence(*signals: torch.Tensor) -> torch.Tensor:
    """Evidence that suspect expert ``i`` is parent expert ``j``: ``Z = sum_k Z_k / sqrt(K)``.

    Every signal is in units of its own null spread, so the strongest one counts
    most by itself; under the null ``Z`` is close to ``N(0, 1)``.
    """
    return sum(signals) / math.sqrt(len(signals))
