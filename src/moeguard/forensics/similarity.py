"""Expert signatures in the parent's residual space, their similarities, and their standardisation.

Notation: suspect experts ``i``, parent experts ``j``; ``Q [H_S, H_P]`` maps the parent's
residual space into the suspect's (:mod:`moeguard.forensics.alignment`), so a hidden
vector ``v`` of the suspect is ``Q^T v`` in the parent's terms.

Two signatures per expert, each unchanged by every function-preserving change of the
expert and of the residual stream once mapped:

- **responses** ``f_e(norm(x))`` to shared probe residuals ``x``: invariant to neuron
  order and scale, weight layout and dtype (:func:`moeguard.forensics.signatures.expert_responses`);
  they fade fastest under fine-tuning (a product of three matrices);
- **neurons**: each neuron's gate row and up row (folded with the norm gain) and down
  column, as unit vectors. :func:`neuron_similarity` looks every suspect neuron up
  among a parent expert's neurons, so neuron order, a neuron's scale (up times ``a``,
  down divided by ``a``) and its sign do not matter; weights fade only linearly
  under fine-tuning, and independently trained experts share almost no neurons.
  Large models use a sample of the suspect's neurons and a random projection of the
  hidden space (cosines are preserved up to ``~1/sqrt(d)``).

Router rows are compared too (:func:`cosine_matrix`), but only reported: routers of
independent models trained on the same data read similar directions, and an attacker
can re-initialise them.

Similarities are cosines; :func:`standardise` turns a suspect x parent matrix into
evidence in units of its own background spread.
"""

from __future__ import annotations

import math

import torch

# Above these sizes the neuron signature samples suspect neurons and projects the hidden space.
NEURON_SAMPLE = 256
# The least distance from the background to identity that one unit of evidence stands for (see standardise).
EVIDENCE_FLOOR = 0.02
PROJECTED_DIMENSIONS = 256
# Work sizes that bound detect's transient memory on large layers (results do not depend on them).
EXPERTS_PER_CHUNK = 8
COSINE_ELEMENTS = 1 << 25


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x_i / |x_i|`` over the flattened trailing axes (float32; a zero row stays zero)."""
    flat = x.flatten(1).float()
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).reshape(x.shape)


def cosine_matrix(suspect: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``C [Es, Ep]``: cosine of every suspect row with every parent row (trailing axes flattened)."""
    return unit_rows(suspect).flatten(1) @ unit_rows(parent).flatten(1).T


def neuron_sampling(neurons: int, hidden: int, *, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(sample, projection)`` for the neuron signature: which suspect neurons (None: all) and a
    ``[H_P, d]`` random projection (None: none), fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(neurons, generator=generator)[:NEURON_SAMPLE].sort().values if neurons > NEURON_SAMPLE else None
    projection = None
    if hidden > PROJECTED_DIMENSIONS:
        projection = torch.randn(hidden, PROJECTED_DIMENSIONS, generator=generator) / math.sqrt(PROJECTED_DIMENSIONS)
    return sample, projection


def neuron_directions(parts: list[torch.Tensor], basis: torch.Tensor | None, projection: torch.Tensor | None,
                      sample: torch.Tensor | None = None) -> torch.Tensor:
    """``[E, n, P, d]``: unit vectors of every (sampled) neuron's ``P`` parts in the parent's space.

    ``parts`` are ``[E, I, H_own]`` (gate rows and up rows folded with the norm gain,
    down columns); ``basis [H_own, H_P]`` maps them into the parent's space (None: this
    is the parent), ``projection [H_P, d]`` shortens them (None: ``d = H_P``), and
    ``sample`` picks neurons (None: all).
    """
    chunks = []
    # A few experts at a time: the stacked, mapped parts of a whole layer of a large model
    # (128 experts x 768 neurons x 3 parts x 2048) would be gigabytes, the result is not.
    for start in range(0, parts[0].shape[0], EXPERTS_PER_CHUNK):
        vectors = torch.stack([part[start : start + EXPERTS_PER_CHUNK].float() for part in parts], dim=2)  # [c, I, P, H_own]
        if sample is not None:
            vectors = vectors[:, sample]
        if basis is not None:
            vectors = vectors @ basis.float()
        if projection is not None:
            vectors = vectors @ projection
        chunks.append(vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    return torch.cat(chunks)


def _best_neurons(suspect: torch.Tensor, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best [n, Ep], index [n, Ep])``: for every suspect neuron and parent expert, the highest
    ``mean_p |cos|`` with one of the expert's neurons and which neuron (``suspect [n, P, d]``, ``parent [Ep, I, P, d]``)."""
    num_parent, neurons, parts, dim = parent.shape
    best, index = [], []
    # Suspect neurons in blocks and parts summed in place, so that the cosines held at once
    # stay near COSINE_ELEMENTS whatever the number of experts and neurons.
    rows_per_block = max(1, COSINE_ELEMENTS // (num_parent * neurons))
    for start in range(0, len(suspect), rows_per_block):
        block = suspect[start : start + rows_per_block]
        cosines = torch.zeros(len(block), num_parent * neurons)
        for p in range(parts):
            cosines += (block[:, p] @ parent[:, :, p].reshape(num_parent * neurons, dim).T).abs_()
        value, where = (cosines / parts).reshape(len(block), num_parent, neurons).max(dim=2)
        best.append(value)
        index.append(where)
    return torch.cat(best), torch.cat(index)


def neuron_similarity(suspect: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``N [Es, Ep]``: how well suspect expert ``i``'s neurons are found among parent expert ``j``'s.

    ``N[i, j] = mean_n max_m mean_p |<s_{i,n,p}, q_{j,m,p}>|`` over suspect neurons ``n``,
    parent neurons ``m`` and parts ``p`` (``suspect [Es, n, P, d]``, ``parent [Ep, I, P, d]``,
    unit vectors). The best partner of each neuron is looked up, so neuron order does not
    matter; unit parts and absolute cosines make a neuron's scale and sign irrelevant
    (up times ``a``, down divided by ``a``). A carved expert's neurons find themselves
    (``N = 1``), an unrelated expert's only chance partners.
    """
    best = _best_neurons(suspect.flatten(0, 1), parent)[0]  # [Es*n, Ep]
    return best.reshape(suspect.shape[0], suspect.shape[1], -1).mean(dim=1)


def neuron_partners(suspect: torch.Tensor, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each suspect neuron's best parent neuron and the sign of each of its parts there.

    ``suspect [n, P, d]`` and ``parent [I, P, d]`` are one expert's unit neuron parts (as
    in :func:`neuron_similarity`); returns ``best [n]`` (the parent neuron with the highest
    ``mean_p |cos|``) and ``signs [n, P]`` (``+-1``: a neuron's part may have been negated).
    """
    cosines = torch.einsum("npd,mpd->nmp", suspect, parent)
    best = cosines.abs().mean(dim=2).argmax(dim=1)
    signs = torch.sign(cosines[torch.arange(len(best)), best])
    return best, torch.where(signs == 0, torch.ones_like(signs), signs)


def mix_components(suspect: torch.Tensor, parent: torch.Tensor, main: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a suspect expert mixes besides parent expert ``main``, and in which proportions.

    ``suspect [n, P, d]`` is one suspect expert's unit neuron parts, ``parent [Ep, I, P, d]``
    the parent's (as in :func:`neuron_similarity`). Each suspect neuron part loses its
    component along its partner ``b(n)`` in expert ``main`` (:func:`neuron_partners`):

        r_{n,p} = unit(s_{n,p} - <s_{n,p}, q_{main,b(n),p}> q_{main,b(n),p}).

    A neuron of a weight average ``sum_k w_k W_k`` keeps, once its main component is
    gone, only the other components' neurons, which the remainder finds among each
    parent expert's neurons whatever their order (``m_k(n)``, the best as in
    :func:`neuron_similarity`); a kept expert that was only fine-tuned leaves its
    update, which resembles no other parent expert. Returns ``(similarity [Ep], weight
    [Ep])``: the remainder's neuron similarity ``mean_n max_m mean_p |<r_{n,p}, q_{k,m,p}>|``
    with each parent expert (``main``'s entry: the median of the others, it has no
    remainder of itself), and the suspect neurons' own cosine with the neurons found,
    ``c_k = mean_{n,p} |<s_{n,p}, q_{k,m_k(n),p}>|`` (``m_main = b``), which for nearly
    orthogonal components is proportional to ``w_k``.
    """
    best, signs = neuron_partners(suspect, parent[main])
    along = parent[main][best] * signs.unsqueeze(-1)  # [n, P, d]
    remainder = suspect - (suspect * along).sum(-1, keepdim=True) * along
    remainder = remainder / remainder.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    found, index = _best_neurons(remainder, parent)  # [n, Ep]
    similarity = found.mean(0)
    others = torch.cat([similarity[:main], similarity[main + 1:]])
    similarity[main] = others.median() if len(others) else 0.0
    index[:, main] = best
    chosen = parent[torch.arange(parent.shape[0]), index]  # [n, Ep, P, d]
    weight = (chosen * suspect.unsqueeze(1)).sum(-1).abs().mean(dim=(0, 2))
    return similarity, weight


def standardise(similarity: torch.Tensor) -> torch.Tensor:
    """Evidence ``Z [Es, Ep]`` from a similarity matrix, in units of its own background.

    Each expert of the smaller side is centred on the median ``m`` of its similarities
    to the larger side (a derived expert has one outstanding entry, which the median
    ignores); the centred entries are divided by the pooled robust spread
    ``1.4826 * median |.|``, but by no less than ``EVIDENCE_FLOOR * (1 - m)``: one unit of
    evidence is never less than that share of the way from the background to identity.
    Location and scale come from the matrix itself, so the evidence does not depend on
    how similar unrelated experts happen to be in a given model; the floor keeps the
    small excess similarity of experts that independently trained models learn alike
    (whose background spread can be tiny) from counting as strong evidence.
    """
    return standardise_batch(similarity.unsqueeze(0))[0]


def standardise_batch(similarity: torch.Tensor) -> torch.Tensor:
    """:func:`standardise` of every matrix in ``similarity [n, Es, Ep]``."""
    x = similarity.double()
    axis = 2 if x.shape[2] >= x.shape[1] else 1
    median = x.median(dim=axis, keepdim=True).values
    centred = x - median
    spread = 1.4826 * centred.abs().flatten(1).median(dim=1).values.reshape(-1, 1, 1)
    return centred / torch.maximum(spread, EVIDENCE_FLOOR * (1 - median)).clamp_min(1e-12)


def pair_evidence(*signals: torch.Tensor) -> torch.Tensor:
    """Evidence that suspect expert ``i`` is parent expert ``j``: ``Z = sum_k Z_k / sqrt(K)``."""
    return sum(signals) / math.sqrt(len(signals))
