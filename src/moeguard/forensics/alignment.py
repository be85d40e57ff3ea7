"""Recovering the map between a suspect's and a parent's residual streams.

A derivative's residual stream is ``x_S = c Q x_P`` for some ``Q`` with orthonormal
columns (see :mod:`moeguard.forensics.residual`), so every vector the two models attach
to the same token - the embedding row written for it, the head row that reads it, the
residual state at the same position of the same text - is related by the same ``Q``.
Given paired rows ``S [n, H_S]`` and ``P [n, H_P]`` the map is the orthogonal Procrustes
solution

    Q = argmin_{Q^T Q = I} |S - c P Q^T|_F = U V^T,   where  S^T P = U Sigma V^T,

and its quality the relative residual ``min_c |S - c P Q^T|_F / |S|_F`` (0 for an exact
map, close to 1 for unrelated models). Two sources are used, each normalised to unit
Frobenius norm before their cross-products are summed:

- **token rows**: embedding rows and (norm-folded) head rows of tokens both
  vocabularies have, matched by token string (a re-ordered or extended vocabulary
  pairs up correctly);
- **residual states**: both models' residual streams entering decoder layer 0's
  feed-forward norm on the same random token sequences (carving never changes them).

Their agreement (``tr(Q_1^T Q_2) / min(H_S, H_P)``, 1 when each source alone gives the
same map) is the consistency check. A narrower suspect (``H_S < H_P``) gets ``Q`` with
orthonormal rows: a projection, which only approximates the parent's function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from moeguard.forensics.residual import probe_residuals, token_rows
from moeguard.models import MoEModel


# Fewer shared tokens than this cannot pin down a map (and say the vocabularies are different ones).
MIN_SHARED_TOKENS = 32
MAX_TOKEN_ROWS = 32768


def usable_vocabulary(moe: MoEModel) -> dict[str, int] | None:
    """The model's token -> id table, or None without a tokenizer or when it covers under half the embedding rows
    (a placeholder tokenizer that transformers builds for a directory without tokenizer files, for one)."""
    if moe.tokenizer is None:
        return None
    vocabulary = moe.tokenizer.get_vocab()
    rows = moe.model.get_input_embeddings().weight.shape[0]
    return vocabulary if len(vocabulary) >= rows / 2 else None


def matched_token_ids(a: MoEModel, b: MoEModel) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Ids of the same tokens in ``a`` and in ``b``, and how they were matched.

    By token string when both models have usable tokenizers, otherwise by id (the
    shared range of both embedding tables). Only ids that have an embedding row are kept.
    """
    rows_a = a.model.get_input_embeddings().weight.shape[0]
    rows_b = b.model.get_input_embeddings().weight.shape[0]
    vocab_a, vocab_b = usable_vocabulary(a), usable_vocabulary(b)
    if vocab_a is not None and vocab_b is not None:
        pairs = sorted((vocab_a[t], vocab_b[t]) for t in vocab_a.keys() & vocab_b.keys() if vocab_a[t] < rows_a and vocab_b[t] < rows_b)
        ids_a = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        ids_b = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return ids_a, ids_b, f"{len(pairs)} tokens matched by string"
    shared = torch.arange(min(rows_a, rows_b))
    missing = "both sides" if vocab_a is None and vocab_b is None else "one side"
    return shared, shared.clone(), f"{len(shared)} token ids assumed to match (no usable tokenizer on {missing})"


def procrustes(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U V^T`` of ``cross [H_S, H_P] = U Sigma V^T`` (float64)."""
    u, _, vt = torch.linalg.svd(cross.double(), full_matrices=False)
    return u @ vt


def least_squares_map(sources: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``[H_S, H_P]``: the polar factor of the least-squares map ``X = argmin sum |S - P X^T|^2`` (rows unit-scaled per source).

    For a narrower suspect (``H_S < H_P``) the polar factor of the cross-product is not
    the least-squares map (``|P Q^T|`` depends on ``Q`` when ``Q^T Q != I``); solving the
    regression first and orthonormalising its rows is.
    """
    normalised = [(s.double() / s.double().norm(), p.double() / p.double().norm()) for s, p in sources]
    gram = sum(p.T @ p for _, p in normalised)
    cross = sum(p.T @ s for s, p in normalised)
    ridge = 1e-8 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    return procrustes(torch.linalg.solve(gram + ridge, cross).T)


def cross_product(suspect_rows: torch.Tensor, parent_rows: torch.Tensor) -> torch.Tensor:
    """``S^T P / (|S|_F |P|_F)``: one source's share of the Procrustes problem."""
    s, p = suspect_rows.double(), parent_rows.double()
    return s.T @ p / (s.norm() * p.norm()).clamp_min(1e-30)


def fit_residual(suspect_rows: torch.Tensor, parent_rows: torch.Tensor, basis: torch.Tensor) -> float:
    """``min_c |S - c P Q^T|_F / |S|_F``: 0 when the map explains the rows exactly, 1 when not at all."""
    s, predicted = suspect_rows.double(), parent_rows.double() @ basis.T
    scale = (s * predicted).sum() / (predicted * predicted).sum().clamp_min(1e-30)
    return float((s - scale * predicted).norm() / s.norm().clamp_min(1e-30))


def map_agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """``tr(Q_1^T Q_2) / min(H_S, H_P)``: 1 for the same map, about 0 for unrelated ones."""
    return float((first * second).sum() / min(first.shape))


@dataclass
class SourceFit:
    """How well the chosen map explains one source of paired rows."""

    name: str
    rows: int
    residual: float  # relative residual of the joint map on this source
    own_residual: float  # relative residual of this source's own best map


@dataclass
class ResidualMap:
    """``x_S ~ c basis @ x_P``: the suspect's residual space in terms of the parent's."""

    basis: torch.Tensor = field(repr=False)  # [H_S, H_P], float64
    suspect_hidden: int
    parent_hidden: int
    kind: str
    tokens: str
    sources: list[SourceFit]
    agreement: float | None
    # The token sources' summed normalised cross-products, to refine the map with (None: not a Procrustes fit).
    cross: torch.Tensor | None = field(default=None, repr=False)
    refined: str = ""

    @property
    def residual(self) -> float | None:
        """The joint map's worst relative residual over its sources (None when no source was available)."""
        return max((s.residual for s in self.sources), default=None)

    def describe(self) -> str:
        if not self.sources:
            return f"spaces assumed aligned ({self.tokens})"
        fits = ", ".join(f"{s.name} {s.residual:.3g} ({s.rows} rows)" for s in self.sources)
        agreement = f"; sources agree {self.agreement:.3f}" if self.agreement is not None else ""
        refined = f"; {self.refined}" if self.refined else ""
        return f"{self.kind} by orthogonal Procrustes, residual {fits}{agreement}; {self.tokens}{refined}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "orthogonal Procrustes" if self.sources else "identity (no shared tokens)",
            "kind": self.kind,
            "suspect_hidden": self.suspect_hidden,
            "parent_hidden": self.parent_hidden,
            "tokens": self.tokens,
            "residual": self.residual,
            "agreement": self.agreement,
            "refined": self.refined,
            "sources": [vars(s) for s in self.sources],
        }


def map_kind(basis: torch.Tensor) -> str:
    """What a map looks like: identity, signed permutation, rotation, widening (padding) or projection."""
    rows, cols = basis.shape
    if rows > cols:
        return f"wider suspect ({rows} vs {cols}: padding)"
    if rows < cols:
        return f"narrower suspect ({rows} vs {cols}: projection)"
    if torch.allclose(basis, torch.eye(rows, dtype=basis.dtype), atol=1e-3):
        return "identity"
    if bool((basis.abs().amax(dim=1) > 0.999).all()):
        return "signed permutation"
    return "rotation"


def fit_map(sources: dict[str, tuple[torch.Tensor, torch.Tensor]], tokens: str) -> ResidualMap:
    """The joint map of paired ``(suspect_rows, parent_rows)`` sources, with its fit per source: orthogonal
    Procrustes for a suspect at least as wide as the parent, least squares then orthonormal rows for a narrower one."""
    def solve(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        suspect_hidden, parent_hidden = pairs[0][0].shape[1], pairs[0][1].shape[1]
        if suspect_hidden < parent_hidden:
            return least_squares_map(pairs)
        return procrustes(sum(cross_product(s, p) for s, p in pairs))

    basis = solve(list(sources.values()))
    own = {name: solve([pair]) for name, pair in sources.items()}
    fits = [
        SourceFit(name, int(s.shape[0]), fit_residual(s, p, basis), fit_residual(s, p, own[name]))
        for name, (s, p) in sources.items()
    ]
    maps = list(own.values())
    agreement = map_agreement(maps[0], maps[1]) if len(maps) == 2 else None
    suspect_hidden, parent_hidden = basis.shape
    cross = sum(cross_product(s, p) for s, p in sources.values()) if suspect_hidden >= parent_hidden else None
    return ResidualMap(basis, suspect_hidden, parent_hidden, map_kind(basis), tokens, fits, agreement, cross)


@dataclass
class CrossProduct:
    """``S^T P`` of paired rows with their sums of squares, so that several sets combine into one source."""

    product: torch.Tensor  # [H_S, H_P], float64
    suspect_energy: float
    parent_energy: float

    @classmethod
    def of(cls, suspect_rows: torch.Tensor, parent_rows: torch.Tensor) -> "CrossProduct":
        s, p = suspect_rows.double(), parent_rows.double()
        return cls(s.T @ p, float((s * s).sum()), float((p * p).sum()))

    def __add__(self, other: "CrossProduct") -> "CrossProduct":
        return CrossProduct(self.product + other.product, self.suspect_energy + other.suspect_energy,
                            self.parent_energy + other.parent_energy)

    def normalised(self) -> torch.Tensor:
        """The combined rows' :func:`cross_product`."""
        return self.product / max((self.suspect_energy * self.parent_energy) ** 0.5, 1e-30)


def refined_basis(alignment: ResidualMap, extra: CrossProduct) -> torch.Tensor:
    """The Procrustes map of the alignment's token sources plus one more source of paired rows."""
    return procrustes(alignment.cross + extra.normalised())


def probe_token_sequences(count: int, length: int, *, seed: int) -> torch.Tensor:
    """``[count, length]`` positions into the matched-token list (the same for both models)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, length, generator=generator)


def token_row_sample(shared: int, *, seed: int) -> torch.Tensor:
    """Which of ``shared`` matched tokens pair the token rows: all up to ``MAX_TOKEN_ROWS``, else a
    sorted random sample of that many fixed by ``seed`` (many times the hidden size of any release,
    and it keeps a 150k-token vocabulary's rows from costing gigabytes)."""
    if shared <= MAX_TOKEN_ROWS:
        return torch.arange(shared)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(shared, generator=generator)[:MAX_TOKEN_ROWS].sort().values


def residual_map(suspect: MoEModel, parent: MoEModel, *, seed: int = 0, sequence_length: int = 32) -> ResidualMap | None:
    """The map from the parent's residual space to the suspect's (see the module docstring).

    Returns None when nothing pairs the two spaces (fewer than ``MIN_SHARED_TOKENS``
    shared tokens and different widths); with too few shared tokens but equal widths
    the identity is assumed and said.
    """
    suspect_ids, parent_ids, tokens = matched_token_ids(suspect, parent)
    suspect_hidden = suspect.model.get_input_embeddings().weight.shape[1]
    parent_hidden = parent.model.get_input_embeddings().weight.shape[1]
    if len(suspect_ids) < MIN_SHARED_TOKENS:
        if suspect_hidden != parent_hidden:
            return None
        return ResidualMap(torch.eye(parent_hidden, dtype=torch.float64), suspect_hidden, parent_hidden, "identity", tokens, [], None)
    rows = token_row_sample(len(suspect_ids), seed=seed)
    suspect_rows, parent_rows = token_rows(suspect, suspect_ids[rows]), token_rows(parent, parent_ids[rows])
    suspect_tokens = [suspect_rows.embedding]
    parent_tokens = [parent_rows.embedding]
    if suspect_rows.head is not None or parent_rows.head is not None:
        # A tied head is the embedding itself: pair it with the other side's head all the same.
        suspect_head = suspect_rows.head if suspect_rows.head is not None else suspect_rows.embedding
        parent_head = parent_rows.head if parent_rows.head is not None else parent_rows.embedding
        suspect_tokens.append(suspect_head * (suspect_tokens[0].norm() / suspect_head.norm().clamp_min(1e-30)))
        parent_tokens.append(parent_head * (parent_tokens[0].norm() / parent_head.norm().clamp_min(1e-30)))
    sequences = max(4, math.ceil(4 * max(suspect_hidden, parent_hidden) / sequence_length))
    positions = (probe_token_sequences(sequences, sequence_length, seed=seed) * len(suspect_ids)).long()
    sources = {
        "token rows": (torch.cat(suspect_tokens), torch.cat(parent_tokens)),
        "residual states": (probe_residuals(suspect, suspect_ids[positions]), probe_residuals(parent, parent_ids[positions])),
    }
    return fit_map(sources, tokens)
