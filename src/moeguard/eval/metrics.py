"""Pure functions behind the task metrics: token log-likelihoods and confidence intervals (Wilson, bootstrap)."""

from __future__ import annotations

import math

import torch

from moeguard.data.batching import IGNORE_INDEX

Z_95 = 1.959963984540054  # standard normal quantile at 0.975


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion p = successes / n.

    ``(c - h, c + h)`` with ``c = (p + z^2 / 2n) / (1 + z^2 / n)`` and
    ``h = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)``. Unlike the normal
    approximation it stays inside [0, 1] and is sensible at p = 0 or 1.
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def target_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``(sum of log p(label_t | tokens < t), number of scored tokens)``.

    ``logits[b, t]`` predicts token ``t + 1``, so the score of row b is
    ``sum_{t: labels[b, t+1] != -100} log_softmax(logits[b, t])[labels[b, t+1]]``.
    """
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(shifted_logits, dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(dim=1), scored.sum(dim=1)


def perplexity(nll_sums: torch.Tensor, token_counts: torch.Tensor) -> float:
    """``exp(sum_i nll_i / sum_i tokens_i)``: token-level perplexity over all examples."""
    return math.exp(float(nll_sums.sum()) / max(1, int(token_counts.sum())))


def bootstrap_ratio_interval(
    numerators: torch.Tensor, denominators: torch.Tensor, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum_i a_i / sum_i b_i``, resampling whole examples.

    Each resample draws n examples with replacement and recomputes the ratio; the
    interval is the (1-level)/2 and (1+level)/2 quantiles of those values. With every
    ``b_i = 1`` this is the interval of a mean (ROUGE-L, token F1); with ``a_i`` a text's
    summed token loss and ``b_i`` its token count, that of the mean token loss.
    """
    n = numerators.shape[0]
    if n == 0:
        return (math.nan, math.nan)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n, (resamples, n), generator=generator)
    values = numerators.double().cpu()[picks].sum(1) / denominators.double().cpu()[picks].sum(1).clamp(min=1e-300)
    low, high = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype))
    return (float(low), float(high))


def bootstrap_mean_interval(values: torch.Tensor, **kwargs) -> tuple[float, float]:
    """:func:`bootstrap_ratio_interval` of the mean of per-example ``values``."""
    return bootstrap_ratio_interval(values, torch.ones_like(values, dtype=torch.float64), **kwargs)


def bootstrap_perplexity_interval(
    nll_sums: torch.Tensor, token_counts: torch.Tensor, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`perplexity`: ``exp`` of the interval of the mean token loss
    (:func:`bootstrap_ratio_interval` of ``nll_sums / token_counts``; exp is monotone)."""
    low, high = bootstrap_ratio_interval(nll_sums, token_counts, resamples=resamples, seed=seed, level=level)
    return (math.exp(low), math.exp(high))
