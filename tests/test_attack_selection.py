"""Choosing the experts to keep: subset search on hand-made losses, and on a real model's masked loss."""

from __future__ import annotations

import pytest

from moeguard.attack.selection import MaskedLoss, backward_elimination, select_experts, swap_refinement
from moeguard.data import batches, load_task
from moeguard.models import load_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def redundant_pair_loss(kept):
    """One layer of four experts: 0 and 1 stand in for each other (losing both costs 10), 2 and 3 cost 1 each."""
    (layer,) = kept
    loss = 10.0 if 0 not in layer and 1 not in layer else 0.0
    return loss + sum(1.0 for expert in (2, 3) if expert not in layer)


def test_backward_elimination_sees_experts_that_only_matter_together():
    # Masking one expert at a time ranks 2 and 3 first (1.0 each, 0 and 1 cost nothing alone): keeping them costs 10.
    single = {e: redundant_pair_loss([[x for x in range(4) if x != e]]) for e in range(4)}
    assert sorted(single, key=single.get, reverse=True)[:2] == [2, 3]
    assert redundant_pair_loss([[2, 3]]) == 10.0
    result = backward_elimination(redundant_pair_loss, [4], keep=2)
    assert result.loss == 1.0 and len(result.kept[0]) == 2 and {0, 1} & set(result.kept[0])
    assert result.evaluations == 4 + 3


def test_elimination_keeps_the_best_experts_of_every_layer_under_an_additive_loss():
    values = [[5.0, 0.1, 3.0, 0.2], [0.3, 0.4, 4.0, 6.0]]

    def loss(kept):
        return sum(v for layer, row in enumerate(values) for e, v in enumerate(row) if e not in kept[layer])

    result = backward_elimination(loss, [4, 4], keep=2)
    assert result.kept == [[0, 2], [2, 3]] and result.loss == pytest.approx(0.1 + 0.2 + 0.3 + 0.4)


def test_swaps_improve_a_poor_keep_set_and_count_their_evaluations():
    start = backward_elimination(redundant_pair_loss, [4], keep=2)
    poor = type(start)([[2, 3]], redundant_pair_loss([[2, 3]]), 0)
    better = swap_refinement(redundant_pair_loss, poor, [4])
    assert better.loss == 1.0 and better.evaluations > 0


def test_every_selection_keeps_the_count_asked_and_says_what_it_cost(trained_tiny):
    moe = load_moe(trained_tiny)
    data = load_task("reverse", "pool", limit=16)
    search = select_experts(moe, "search", 2, search_data=data)
    assert [len(k) for k in search.kept] == [2] * moe.num_layers
    loss_of = MaskedLoss(moe, next(batches(moe.tokenizer, data, batch_size=16)))
    assert search.loss == pytest.approx(loss_of(search.kept))
    assert search.forward_tokens == search.evaluations * loss_of.tokens_per_call > 0
    attribution = select_experts(moe, "attribution", 2, search_data=data, criteria=("frequency", "reap"))
    assert attribution.detail in ("criterion frequency", "criterion reap") and attribution.forward_tokens > 0
    # Search compares whole sets on the same loss the attribution plans are judged by: it is never worse here.
    assert search.loss <= attribution.loss + 1e-6
    first, second = (select_experts(moe, "random", 2, search_data=data, seed=s) for s in (0, 1))
    assert first.forward_tokens == 0 and first.kept != second.kept
