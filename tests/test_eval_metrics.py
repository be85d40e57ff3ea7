"""The math behind the metrics: Wilson intervals, target log-likelihoods, perplexity and its bootstrap."""

from __future__ import annotations

import math

import pytest
import torch

from moeguard.eval import bootstrap_perplexity_interval, perplexity, target_log_likelihoods, wilson_interval


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.8389, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_target_log_likelihoods_sum_the_log_probability_of_each_labelled_next_token():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, -100, 6, 1]])
    sums, counts = target_log_likelihoods(logits, labels)
    log_probs = torch.log_softmax(logits, -1)
    expected = [log_probs[0, 0, 3] + log_probs[0, 1, 4], log_probs[1, 2, 6] + log_probs[1, 3, 1]]
    torch.testing.assert_close(sums, torch.stack(expected))
    assert counts.tolist() == [2, 2]


def test_perplexity_is_exp_of_the_mean_token_nll_and_its_bootstrap_interval_brackets_it():
    nll = torch.tensor([2.0, 6.0, 1.0, 3.0])
    tokens = torch.tensor([2, 3, 1, 2])
    assert perplexity(nll, tokens) == pytest.approx(math.exp(12 / 8))
    low, high = bootstrap_perplexity_interval(nll, tokens, seed=1)
    assert low < perplexity(nll, tokens) < high
    assert bootstrap_perplexity_interval(nll, tokens, seed=1) == (low, high)
    same = torch.full((50,), 2.0)
    assert bootstrap_perplexity_interval(same, torch.ones(50, dtype=torch.long)) == pytest.approx((math.exp(2), math.exp(2)))
    varied = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 4
    wide = bootstrap_perplexity_interval(varied[:20], torch.ones(20, dtype=torch.long))
    narrow = bootstrap_perplexity_interval(varied, torch.ones(2000, dtype=torch.long))
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
