"""Expert matching, layer alignment and their null distributions, as pure functions."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

from moeguard.forensics.similarity import standardise_batch

NULL_SAMPLES = 2000


def match_experts(evidence: torch.Tensor) -> tuple[list[int], list[int]]:
    """The one-to-one matching of suspect rows to parent columns with the most evidence.

    Solves ``max_sigma sum_i Z[i, sigma(i)]`` over injective ``sigma`` (rectangular
    linear assignment; with more rows than columns some rows stay unmatched).
    Returns ``(rows, cols)`` sorted by row.
    """
    rows, cols = linear_sum_assignment(evidence.detach().cpu().numpy(), maximize=True)
    return rows.tolist(), cols.tolist()


def matched_mean(evidence: torch.Tensor | np.ndarray) -> float:
    """``A = (1 / min(Es, Ep)) max_sigma sum_i Z[i, sigma(i)]``: the layer's raw statistic."""
    values = evidence.detach().cpu().numpy() if isinstance(evidence, torch.Tensor) else evidence
    rows, cols = linear_sum_assignment(values, maximize=True)
    return float(values[rows, cols].mean())


@dataclass(frozen=True)
class NullMoments:
    """Mean and standard deviation of a statistic when nothing is related."""

    mean: float
    std: float

    def standardise(self, value: float) -> float:
        return (value - self.mean) / max(self.std, 1e-12)


@functools.lru_cache(maxsize=512)
def assignment_null(rows: int, cols: int, signals: int, samples: int = NULL_SAMPLES) -> NullMoments:
    """Moments of :func:`matched_mean` of the evidence of ``signals`` unrelated ``[rows, cols]`` similarity matrices.

    Simulated: every signal is an i.i.d. Gaussian matrix, standardised as the real
    ones are (:func:`moeguard.forensics.similarity.standardise`), the signals summed
    and divided by ``sqrt(signals)``, the assignment solved. This accounts for the
    matching's own optimism and for the standardisation's small-sample noise; it does
    not know about experts that independent models learn alike, which is what
    calibrating on independent reference models is for.
    """
    generator = torch.Generator().manual_seed(1_000_003 * rows + 1009 * cols + signals)
    total = sum(standardise_batch(torch.randn(samples, rows, cols, generator=generator, dtype=torch.float64)) for _ in range(signals))
    evidence = (total / math.sqrt(signals)).numpy()
    return _moments(np.array([matched_mean(z) for z in evidence]))


def monotone_alignment(score: torch.Tensor) -> list[int]:
    """The increasing map ``a: rows -> columns`` maximising ``sum_r score[r, a(r)]`` (needs rows <= columns).

    Dynamic programming: ``best[r, c]`` is the best total of rows ``0..r`` with row
    ``r`` on column ``c``; ``best[r, c] = score[r, c] + max_{c' < c} best[r-1, c']``.
    Entries of ``-inf`` are forbidden.
    """
    rows, cols = score.shape
    if rows > cols:
        raise ValueError(f"monotone_alignment needs rows <= columns, got {rows} x {cols}.")
    values = score.double().cpu().numpy()
    best = np.full((rows, cols), -np.inf)
    came_from = np.zeros((rows, cols), dtype=np.int64)
    best[0] = values[0]
    for r in range(1, rows):
        running, arg = -np.inf, -1
        for c in range(cols):
            if c > 0 and best[r - 1, c - 1] > running:
                running, arg = best[r - 1, c - 1], c - 1
            best[r, c] = values[r, c] + running
            came_from[r, c] = arg
    columns = [int(np.argmax(best[-1]))]
    for r in range(rows - 1, 0, -1):
        columns.append(int(came_from[r, columns[-1]]))
    return columns[::-1]


def monotone_totals(scores: np.ndarray) -> np.ndarray:
    """``[n]``: the best monotone-alignment total of each ``scores[n, rows, cols]`` (rows <= cols), vectorised."""
    best = scores[:, 0].copy()
    for r in range(1, scores.shape[1]):
        shifted = np.concatenate([np.full((len(best), 1), -np.inf), np.maximum.accumulate(best, axis=1)[:, :-1]], axis=1)
        best = scores[:, r] + shifted
    return best.max(axis=1)


@functools.lru_cache(maxsize=64)
def alignment_null(rows: int, cols: int, samples: int = NULL_SAMPLES) -> NullMoments:
    """Moments of the best monotone total of ``rows`` layer scores into ``cols`` layers when each is ``N(0, 1)``."""
    generator = np.random.default_rng(7919 * rows + cols)
    return _moments(monotone_totals(generator.standard_normal((samples, min(rows, cols), max(rows, cols)))))


def _moments(values: np.ndarray) -> NullMoments:
    return NullMoments(float(values.mean()), float(values.std(ddof=1)))


def pair_threshold(alpha: float, num_pairs: int) -> float:
    """The evidence ``Z`` above which a single expert pair counts as matched.

    Bonferroni over the ``Es * Ep`` candidate pairs of a layer: ``Phi^-1(1 - alpha / (Es Ep))``.
    """
    return float(norm.isf(alpha / max(num_pairs, 1)))


def z_threshold(alpha: float) -> float:
    """The standard-normal ``z`` equivalent of the p-value threshold ``alpha``."""
    return float(norm.isf(alpha)) if alpha > 0 else math.inf
