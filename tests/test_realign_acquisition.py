"""Acquisition functions and recovery metrics equal their formulas on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from moeguard.realign import acquisition as acq
from moeguard.realign.result import label_schedule
from moeguard.realign.metrics import labels_to_reach, recovery, retention
from moeguard.realign.pool import removed_expert_masks, select

# Two examples, 4 positions, vocabulary 3. Answer tokens: row 0 positions 2-3, row 1 position 3.
ANSWER_MASK = torch.tensor([[False, False, True, True], [False, False, False, True]])
INPUT_IDS = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 1]])
PROBS = {  # the distributions that predict each answer token (at the position before it)
    (0, 1): [0.7, 0.2, 0.1],
    (0, 2): [0.4, 0.4, 0.2],
    (1, 2): [0.1, 0.1, 0.8],
}


def hand_logits() -> torch.Tensor:
    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))  # positions without answers: noise
    for (row, position), probs in PROBS.items():
        logits[row, position] = torch.tensor(probs).log() + 5.0  # any shift: softmax gives probs back
    return logits


def test_answer_positions_are_those_one_before_each_answer_token():
    example, position = acq.answer_token_positions(ANSWER_MASK)
    assert list(zip(example.tolist(), position.tolist())) == [(0, 1), (0, 2), (1, 2)]


def test_least_confidence_margin_and_entropy_are_means_over_answer_tokens():
    logits = hand_logits()
    lc = acq.least_confidence(logits, ANSWER_MASK)
    torch.testing.assert_close(lc, torch.tensor([((1 - 0.7) + (1 - 0.4)) / 2, 1 - 0.8]))
    margin = acq.margin(logits, ANSWER_MASK)
    torch.testing.assert_close(margin, torch.tensor([((1 - 0.5) + (1 - 0.0)) / 2, 1 - 0.7]))

    def h(p):
        return -sum(x * math.log(x) for x in p)

    entropy = acq.entropy(logits, ANSWER_MASK)
    torch.testing.assert_close(entropy, torch.tensor([(h(PROBS[0, 1]) + h(PROBS[0, 2])) / 2, h(PROBS[1, 2])]))


def test_sequence_nll_sums_minus_log_probability_of_the_answer_tokens():
    nll = acq.sequence_nll(hand_logits(), INPUT_IDS, ANSWER_MASK)
    # row 0 answers tokens 2 (p=0.1) then 0 (p=0.4); row 1 answers token 1 (p=0.1).
    torch.testing.assert_close(nll, torch.tensor([-math.log(0.1) - math.log(0.4), -math.log(0.1)]))


def test_an_example_without_answer_tokens_scores_zero():
    mask = ANSWER_MASK.clone()
    mask[1] = False
    assert acq.entropy(hand_logits(), mask)[1] == 0 and acq.sequence_nll(hand_logits(), INPUT_IDS, mask)[1] == 0


def test_mean_pooling_ignores_masked_tokens():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(acq.mean_pooled(hidden, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))


def test_k_center_greedy_picks_the_point_farthest_from_every_centre_each_time():
    candidates = torch.tensor([[0.0, 1.0], [10.0, 0.0], [9.0, 0.0], [0.0, -5.0], [4.0, 4.0]])
    centers = torch.tensor([[0.0, 0.0]])
    # distances to (0,0): 1, 10, 9, 5, 5.66 -> pick 1; then min distances: 1, 0, 1, 5, 5.66 -> pick 4 (4,4);
    # then (0,-5) is 5 from (0,0) and 9.85 from (4,4) -> 5, the largest left.
    assert acq.k_center_greedy(candidates, centers, 3) == [1, 4, 3]
    # Without centres the first pick is the candidate farthest from the mean (4.6, 0): (0, -5).
    assert acq.k_center_greedy(candidates, torch.empty(0, 2), 1) == [3]


def test_k_center_greedy_never_picks_a_duplicate_twice():
    candidates = torch.zeros(4, 2)
    assert sorted(acq.k_center_greedy(candidates, torch.zeros(1, 2), 4)) == [0, 1, 2, 3]


def test_badge_embedding_is_the_output_layer_gradient_of_the_pseudo_label_loss():
    torch.manual_seed(0)
    vocab, width = 5, 3
    weight = torch.randn(vocab, width, requires_grad=True)
    hidden = torch.randn(2, 4, width)
    logits = hidden @ weight.T
    embeddings = acq.badge_embeddings(logits.detach(), hidden, ANSWER_MASK)
    for row in range(2):
        example, position = acq.answer_token_positions(ANSWER_MASK)
        rows = position[example == row]
        token_logits = hidden[row, rows] @ weight.T
        pseudo = token_logits.argmax(-1)
        loss = torch.nn.functional.cross_entropy(token_logits, pseudo, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, weight)
        torch.testing.assert_close(embeddings[row], gradient.flatten(), rtol=1e-5, atol=1e-6)


def test_badge_sketches_preserve_inner_products_of_large_embeddings_approximately():
    generator = torch.Generator().manual_seed(0)
    vocab, width = 4000, 256
    hidden = torch.randn(6, 4, width, generator=generator)
    logits = torch.randn(6, 4, vocab, generator=generator) * 3
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:, 2:] = True
    exact = acq.badge_embeddings(logits, hidden, mask)
    sketched = acq.badge_embeddings(
        logits, hidden, mask, acq.gaussian_sketch(vocab, 256, generator), acq.gaussian_sketch(width, 64, generator)
    )
    assert sketched.shape == (6, 256 * 64) and exact.shape == (6, vocab * width)
    norms_exact, norms_sketched = exact.norm(dim=1), sketched.norm(dim=1)
    assert torch.allclose(norms_sketched / norms_exact, torch.ones(6), atol=0.25)
    assert acq.gaussian_sketch(10, 32, generator) is None  # small enough: kept exact


def test_kmeans_pp_seeding_starts_at_the_largest_norm_and_never_repeats():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [-3.0, 0.0], [0.0, 0.05]])
    picks = acq.kmeans_pp_seeding(points, 5, torch.Generator().manual_seed(0))
    assert picks[0] == 2 and sorted(picks) == [0, 1, 2, 3, 4]
    # Second pick is drawn with probability D^2 / sum D^2: (-3, 0) is far more likely than the cluster at 0.
    seconds = [acq.kmeans_pp_seeding(points, 2, torch.Generator().manual_seed(s))[1] for s in range(200)]
    distances = (points - points[2]).norm(dim=1).pow(2)
    expected = distances[3] / distances.sum()
    assert abs(seconds.count(3) / 200 - float(expected)) < 0.1


def test_removed_routing_share_is_the_weight_sent_to_removed_experts_over_all_weight():
    # Layer with 4 experts, expert 1 and 3 removed; three tokens, two from example 0, one from example 1.
    top_k_index = torch.tensor([[0, 1], [3, 2], [1, 3]])
    top_k_weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    example = torch.tensor([0, 0, 1])
    removed = torch.tensor([False, True, False, True])
    lost, total = acq.removed_routing_mass(top_k_index, top_k_weights, example, removed, 2)
    torch.testing.assert_close(lost, torch.tensor([0.4 + 0.7, 1.0]))
    torch.testing.assert_close(total, torch.tensor([2.0, 1.0]))
    share = acq.routing_loss_share(lost, total)
    torch.testing.assert_close(share, torch.tensor([0.55, 1.0]))
    assert acq.routing_loss_share(torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_removed_expert_masks_mark_what_the_keep_sets_leave_out():
    masks = removed_expert_masks([4, 4], [[0, 2], None])
    assert masks[0].tolist() == [False, True, False, True] and not masks[1].any()


def test_top_scored_takes_the_highest_scores_with_ties_to_the_lower_index():
    assert acq.top_scored(torch.tensor([0.1, 0.9, 0.5, 0.9]), 3) == [1, 3, 2]


def test_selection_only_returns_unlabelled_examples_and_exactly_k():
    values = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0])
    candidates, labelled = [1, 3, 4, 5], [0, 2]
    generator = torch.Generator().manual_seed(0)
    assert select("entropy", values, candidates, labelled, 2, generator) == [4, 5]
    embeddings = torch.randn(6, 3, generator=generator)
    for name, rows in (("random", None), ("coreset", embeddings), ("badge", embeddings)):
        picked = select(name, rows, candidates, labelled, 3, generator)
        assert len(picked) == len(set(picked)) == 3 and set(picked) <= set(candidates)


def test_label_schedule_ends_exactly_at_the_budget():
    assert label_schedule(20, 5, 4) == [5, 10, 15, 20]
    assert label_schedule(24, 5, 4) == [5, 12, 18, 24]  # 19 = 7 + 6 + 6
    assert label_schedule(7, 7, 1) == [7]
    for budget, seed, rounds in [(10, 1, 10), (100, 33, 3), (64, 16, 5)]:
        schedule = label_schedule(budget, seed, rounds)
        assert schedule[0] == seed and schedule[-1] == budget and len(schedule) == rounds
        assert all(b > a for a, b in zip(schedule, schedule[1:]))


def test_retention_recovery_and_labels_to_reach_follow_their_definitions():
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert math.isnan(retention(0.3, 0.0))
    assert recovery(0.6, 0.3, 0.9) == pytest.approx(0.5)
    assert recovery(0.2, 0.3, 0.9) < 0
    assert math.isnan(recovery(0.5, 0.9, 0.9))
    reached = labels_to_reach([0, 8, 16, 24], [0, 10, 20, 30], [0.2, 0.85, 0.91, 0.95])
    assert reached.reached and (reached.labels, reached.steps) == (16, 20)
    assert "16 labels" in reached.describe()
    missed = labels_to_reach([0, 8], [0, 10], [0.2, 0.5])
    assert not missed.reached and missed.labels is None and "not reached within budget" in missed.describe()
