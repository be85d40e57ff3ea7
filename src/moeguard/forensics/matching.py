"""Expert matching, layer alignment and the randomisation test, as pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm


def match_experts(evidence: torch.Tensor) -> tuple[list[int], list[int]]:
    """The one-to-one matching of suspect rows to parent columns with the most evidence.

    Solves ``max_sigma sum_i Z[i, sigma(i)]`` over injective ``sigma`` (rectangular
    linear assignment; with more rows than columns some rows stay unmatched).
    Returns ``(rows, cols)`` sorted by row.
    """
    rows, cols = linear_sum_assignment(evidence.detach().cpu().numpy(), maximize=True)
    return rows.tolist(), cols.tolist()


def matched_mean(evidence: torch.Tensor) -> float:
    """``T = (1 / min(Es, Ep)) max_sigma sum_i Z[i, sigma(i)]``: the layer statistic."""
    rows, cols = match_experts(evidence)
    return float(evidence[rows, cols].mean())


def group_statistics(evidence: torch.Tensor) -> torch.Tensor:
    """``T[s]`` = :func:`matched_mean` of ``evidence[s]`` for every permutation ``s`` (``[m, Es, Ep] -> [m]``).

    The matching is solved again for every null sample, so the maximisation that
    favours ``s = 0`` under the null is part of the null as well.
    """
    return torch.tensor([matched_mean(z) for z in evidence], dtype=torch.float64)


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


@dataclass(frozen=True)
class GroupTest:
    """The randomisation test of one statistic against its permutation samples.

    ``z = (T_0 - mean_{s>=1} T_s) / std_{s>=1} T_s``; ``p_value = 1 - Phi(z)`` (the
    Gaussian approximation of the null, able to state strong evidence);
    ``p_exact = #{s : T_s >= T_0} / m`` (exact under exchangeability, never below ``1/m``).
    """

    statistic: float
    null_mean: float
    null_std: float
    z: float
    p_value: float
    p_exact: float


def group_test(statistics: torch.Tensor) -> GroupTest:
    """:class:`GroupTest` of ``statistics[0]`` against ``statistics[1:]``."""
    observed = float(statistics[0])
    null = statistics[1:].double()
    mean, std = float(null.mean()), float(null.std())
    z = (observed - mean) / max(std, 1e-12)
    p_exact = float((statistics >= observed).sum()) / len(statistics)
    return GroupTest(observed, mean, std, z, float(norm.sf(z)), p_exact)


def pair_threshold(alpha: float, num_pairs: int) -> float:
    """The evidence ``Z`` above which a single expert pair counts as matched.

    Bonferroni over the ``Es * Ep`` candidate pairs of a layer: ``Phi^-1(1 - alpha / (Es Ep))``.
    """
    return float(norm.isf(alpha / max(num_pairs, 1)))


def z_threshold(alpha: float) -> float:
    """The model-level ``z`` equivalent of the p-value threshold ``alpha``."""
    return float(norm.isf(alpha)) if alpha > 0 else math.inf
