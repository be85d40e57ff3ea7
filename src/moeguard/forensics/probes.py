"""Probe inputs and the hidden-coordinate permutations behind the null distribution.

Two independently trained models differ, among everything else, by an arbitrary
relabelling of their residual-stream coordinates: initialisation draws every
coordinate the same way and training treats them alike, so a model and the same
model with its hidden coordinates permuted are equally likely outcomes of training.
Comparing a suspect with a *conjugated* copy of itself (hidden coordinates moved by
a permutation ``P``: ``f'(x) = P f(P^T x)`` for an expert, ``r' = P r`` for a router
row) therefore gives samples of the comparison statistic under "not derived".

The permutations used are the powers of one block-cyclic shift ``g`` of order ``m``.
The probes are the ``g``-orbits of a few Gaussian base vectors, so the conjugated
expert's responses are the original responses re-indexed, and every null sample
comes without running the model again.
"""

from __future__ import annotations

import torch

from moeguard.errors import InputError


def cyclic_shifts(hidden: int, group_size: int) -> torch.Tensor:
    """Gather indices ``[m, H]`` of the powers ``g^0 .. g^(m-1)`` of a block-cyclic shift.

    With ``q = floor(H / m)``, ``g^s`` moves coordinate ``h < m q`` to ``(h + s q) mod (m q)``
    and fixes the rest. As a gather, ``(g^s v)[h] = v[perms[s, h]]`` with
    ``perms[s, h] = (h - s q) mod (m q)``, so ``perms[s][perms[t]] = perms[s + t]``.
    """
    if not 2 <= group_size <= hidden:
        raise InputError(f"the permutation group size must be between 2 and the hidden size {hidden}, got {group_size}.")
    q = hidden // group_size
    span = group_size * q
    h = torch.arange(hidden)
    shifts = torch.arange(group_size).unsqueeze(1) * q
    perms = torch.where(h < span, (h - shifts) % span, h)
    return perms


def orbit_probes(hidden: int, group_size: int, bases: int, *, seed: int = 0) -> torch.Tensor:
    """Probe inputs ``X [B, m, H]`` with ``X[b, k] = g^k x_b`` for Gaussian ``x_b ~ N(0, I_H)``.

    The probe set is closed under the shift group, which is what makes the null
    samples free (see :func:`conjugate_responses`).
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(bases, hidden, generator=generator)
    perms = cyclic_shifts(hidden, group_size)
    return base[:, perms]


def conjugation_index(perms: torch.Tensor, shift: int) -> torch.Tensor:
    """Gather index over the flattened ``(m, H)`` axes that conjugates responses by ``g^s``.

    ``index[k H + h] = ((k - s) mod m) H + perms[s, h]``; see :func:`conjugate_responses`.
    """
    m, hidden = perms.shape
    source_orbit = (torch.arange(m) - shift) % m
    return (source_orbit.unsqueeze(1) * hidden + perms[shift].unsqueeze(0)).reshape(-1)


def conjugate_responses(responses: torch.Tensor, perms: torch.Tensor, shift: int) -> torch.Tensor:
    """Responses of the conjugated experts ``g^s f (g^s)^T`` on the same probes.

    ``responses [..., B, m, H]`` hold ``Y[b, k] = f(g^k x_b)``; the conjugated expert
    answers ``g^s f(g^(k-s) x_b) = g^s Y[b, k-s]``: the orbit axis moves by ``s`` and
    the output coordinates are gathered with ``perms[s]``.
    """
    flat = responses.flatten(-2)
    index = conjugation_index(perms, shift).to(flat.device)
    return flat.index_select(-1, index).reshape(responses.shape)


def conjugate_rows(rows: torch.Tensor, perms: torch.Tensor, shift: int) -> torch.Tensor:
    """Hidden-axis rows (last axis) of the conjugated model: ``r . g^(-s) x = (g^s r) . x``.

    This covers router rows and expert weights alike: input-side rows read
    ``g^(-s) x``, output-side columns write ``g^s y``; both become ``g^s`` of the row.
    """
    return rows[..., perms[shift]]
