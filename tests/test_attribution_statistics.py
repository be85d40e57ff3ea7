"""On hand-made routing data every statistic and score equals its formula."""

from __future__ import annotations

import math

import pytest
import torch

from moeguard.attribution import CRITERIA, Attribution, scores
from moeguard.attribution.statistics import coactivation_counts, sum_by_expert, tokens_by_part
from moeguard.attribution.summary import (
    average_ranks,
    effective_experts,
    overlap,
    spearman,
    specialisation,
    stability,
    top_set_jaccard,
)
from moeguard.errors import FingerprintMismatchError, InputError

# Four tokens routed top-2 among 4 experts; tokens 0 and 2 belong to part 0, 1 and 3 to part 1.
INDEX = torch.tensor([[0, 1], [1, 2], [0, 1], [3, 1]])
WEIGHTS = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
NORMS = torch.tensor([[2.0, 1.0], [4.0, 3.0], [6.0, 5.0], [1.0, 7.0]])
PART = torch.tensor([0, 1, 0, 1])


def test_routing_counts_split_by_part_and_add_up_to_tokens_times_k():
    counts = sum_by_expert(INDEX, PART, 4)
    assert counts.tolist() == [[2, 2, 0, 0], [0, 2, 1, 1]]
    assert counts.dtype == torch.int64
    assert int(counts.sum()) == INDEX.numel()
    assert tokens_by_part(PART).tolist() == [2, 2]


def test_weighted_sums_are_sums_of_values_over_the_routed_pairs():
    gate = sum_by_expert(INDEX, PART, 4, WEIGHTS)
    assert torch.allclose(gate, torch.tensor([[1.2, 0.8, 0, 0], [0, 0.7, 0.4, 0.9]], dtype=torch.float64))
    weighted = sum_by_expert(INDEX, PART, 4, WEIGHTS * NORMS)
    expected_expert_1 = 0.3 * 1.0 + 0.5 * 5.0  # part 0: tokens 0 and 2
    assert weighted[0, 1].item() == pytest.approx(expected_expert_1)


def test_coactivation_counts_pairs_and_holds_counts_on_the_diagonal():
    c = coactivation_counts(INDEX, 4)
    assert torch.equal(c, c.T)
    assert c.diagonal().tolist() == sum_by_expert(INDEX, PART, 4).sum(0).tolist()
    assert c[0, 1].item() == 2 and c[1, 2].item() == 1 and c[1, 3].item() == 1 and c[0, 2].item() == 0


def hand_made(num_experts=(4,), index=INDEX, weights=WEIGHTS, norms=NORMS, part=PART, top_k=2, width=None) -> Attribution:
    """An attribution of one or more layers that all saw the same hand-made routing."""
    layers = len(num_experts)
    width = width or max(num_experts)
    stack = lambda t: torch.stack([t] * layers, dim=1)  # noqa: E731  [P, E] -> [P, L, E]
    sums = {
        "samples": tokens_by_part(part),
        "tokens": stack(tokens_by_part(part)),
        "routed": stack(sum_by_expert(index, part, width)),
        "gate_mass": stack(sum_by_expert(index, part, width, weights)),
        "weighted_norm": stack(sum_by_expert(index, part, width, weights * norms)),
        "output_norm": stack(sum_by_expert(index, part, width, norms)),
    }
    return Attribution(
        model_fingerprint="f" * 64, model_source="hand-made", model_type="mixtral", task="t", task_source=None,
        tokens="all", num_experts=list(num_experts), top_k=[top_k] * layers,
        expert_ids=[list(range(e)) for e in num_experts], sums=sums,
        coactivation=torch.stack([coactivation_counts(index, width)] * layers),
    )


def test_every_criterion_equals_its_formula_on_hand_made_routing():
    a = hand_made()
    n, k = 4, 2
    frequency = scores(a, "frequency")[0]
    assert torch.allclose(frequency, torch.tensor([2, 4, 1, 1], dtype=torch.float64) / (n * k))
    assert frequency.sum().item() == pytest.approx(1.0)
    gate = scores(a, "gate_mass")[0]
    assert torch.allclose(gate, torch.tensor([1.2, 1.5, 0.4, 0.9], dtype=torch.float64) / n)
    # REAP of expert 1: mean over its 4 routed tokens of weight x norm.
    reap = scores(a, "reap")[0]
    assert reap[1].item() == pytest.approx((0.3 * 1 + 0.6 * 4 + 0.5 * 5 + 0.1 * 7) / 4)
    assert reap[3].item() == pytest.approx(0.9 * 1.0)
    ean = scores(a, "ean")[0]
    assert ean[1].item() == pytest.approx((1 + 4 + 5 + 7) / 4)
    assert ean[2].item() == pytest.approx(3.0)


def test_ablation_score_is_the_rise_of_the_mean_loss():
    a = hand_made()
    a.sums["base_loss"] = torch.tensor([3.0, 5.0], dtype=torch.float64)  # 8 over 4 loss tokens: mean 2
    a.sums["loss_tokens"] = torch.tensor([2, 2])
    a.sums["masked_loss"] = torch.tensor([[[4.0, 3.0, 2.0, 2.0]], [[8.0, 5.0, 6.0, 10.0]]], dtype=torch.float64)
    assert scores(a, "ablation")[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0])


def test_frequencies_sum_to_one_per_layer_for_any_routing():
    generator = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(16, generator=generator)[:4] for _ in range(50)])
    part = torch.randint(0, 2, (50,), generator=generator)
    a = hand_made((16, 16, 16), index=index, weights=torch.rand(50, 4), norms=torch.rand(50, 4), part=part, top_k=4)
    assert torch.allclose(scores(a, "frequency").sum(1), torch.ones(3, dtype=torch.float64))


def test_an_expert_no_token_reaches_scores_zero_not_nan():
    a = hand_made((6,))
    for criterion in ("frequency", "gate_mass", "reap", "ean"):
        row = scores(a, criterion)[0]
        assert row[4].item() == 0 and row[5].item() == 0 and not torch.isnan(row).any()


def test_random_scores_depend_only_on_the_seed():
    a = hand_made()
    assert torch.equal(scores(a, "random", seed=7), scores(a, "random", seed=7))
    assert not torch.equal(scores(a, "random", seed=7), scores(a, "random", seed=8))


def test_an_unknown_criterion_is_refused_with_the_valid_ones_listed():
    with pytest.raises(InputError, match=r"unknown attribution criterion 'gate'; valid criteria: frequency, gate_mass, reap, ean, ablation, random"):
        scores(hand_made(), "gate")


def test_a_criterion_that_was_not_collected_says_how_to_collect_it():
    with pytest.raises(InputError, match=r"'ablation' needs statistics.*collect it again with criteria including 'ablation'"):
        scores(hand_made(), "ablation")


def test_layers_with_fewer_experts_are_padded_and_never_rank_above_real_experts():
    """Layer 1 has 4 experts, layer 0 has 6: the tensors are 6 wide and layer 1's last 2 slots are padding."""
    a = hand_made((6, 4))
    assert a.width == 6 and a.valid()[1].tolist() == [True] * 4 + [False] * 2
    for criterion in ("frequency", "gate_mass", "reap", "ean", "random"):
        s = scores(a, criterion)
        assert s.shape == (2, 6)
        assert torch.isinf(s[1, 4:]).all() and (s[1, 4:] < 0).all()
        assert torch.isfinite(s[0]).all()
        assert set(s[1].topk(4).indices.tolist()) == {0, 1, 2, 3}
    assert scores(a, "frequency")[1, :4].sum().item() == pytest.approx(1.0)


def test_effective_experts_is_exp_entropy():
    uniform = torch.full((1, 8), 1 / 8)
    assert effective_experts(uniform).item() == pytest.approx(8.0)
    two = torch.tensor([[0.5, 0.5, 0, 0]])
    assert effective_experts(two).item() == pytest.approx(2.0)
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert effective_experts(p).item() == pytest.approx(math.exp(-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))))


def test_spearman_uses_average_ranks_for_ties():
    assert average_ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # rho with ties, from the definition: Pearson correlation of the average ranks
    a, b = torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 4])
    ra, rb = torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([1.0, 3, 2, 4])
    assert spearman(a, b) == pytest.approx(torch.corrcoef(torch.stack([ra, rb]))[0, 1].item())
    assert math.isnan(spearman(torch.ones(4), torch.tensor([1.0, 2, 3, 4])))


def test_top_set_jaccard_counts_shared_experts_over_the_union():
    a = torch.tensor([[5.0, 4, 3, 0, 0, 0]])
    b = torch.tensor([[0.0, 4, 5, 3, 0, 0]])
    assert top_set_jaccard(a, b, [3]).tolist() == [pytest.approx(2 / 4)]
    assert top_set_jaccard(a, a, [3]).tolist() == [1.0]


def test_stability_correlates_the_two_halves():
    # Part 0 and part 1 route identically -> the halves agree perfectly.
    index = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2], [3, 1], [3, 1]])
    part = torch.tensor([0, 1, 0, 1, 0, 1])
    same = hand_made(index=index, weights=torch.full((6, 2), 0.5), norms=torch.ones(6, 2), part=part)
    assert stability(same, "frequency").tolist() == [pytest.approx(1.0)]
    # Reversed preferences in the two halves -> negative correlation.
    index = torch.tensor([[0, 1], [3, 2], [0, 1], [3, 2], [0, 2], [3, 1]])
    opposite = hand_made(index=index, weights=torch.full((6, 2), 0.5), norms=torch.ones(6, 2), part=part)
    assert stability(opposite, "frequency").item() < 0
    summary = specialisation(same)
    assert set(summary.stability) == {"frequency", "gate_mass", "reap", "ean"}
    assert summary.to_dict()["effective_experts"] == pytest.approx(effective_experts(scores(same, "frequency")).tolist())


def test_a_half_cannot_be_split_again():
    even, odd = hand_made().halves()
    assert even.samples == 2 and odd.samples == 2
    with pytest.raises(InputError, match="already one half"):
        even.halves()


def test_overlap_compares_top_sets_of_tasks_of_the_same_model_only():
    a = hand_made()
    b = hand_made(index=torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]]))  # top-2 {1, 2}; a's is {0, 1}
    table = overlap([a, b], "frequency", top_m=2)
    assert table.shape == (2, 2, 1)
    assert table[0, 0].item() == 1.0 and table[0, 1].item() == pytest.approx(1 / 3)
    other = hand_made()
    other.model_fingerprint = "0" * 64
    with pytest.raises(FingerprintMismatchError, match="different models"):
        overlap([a, other], "frequency")
    with pytest.raises(InputError, match="top_m=5 for layer 0, which has 4 experts"):
        overlap([a, b], "frequency", top_m=5)


def test_every_criterion_name_is_stable():
    assert tuple(CRITERIA) == ("frequency", "gate_mass", "reap", "ean", "ablation", "random")


def test_loss_by_part_sums_the_next_token_loss_of_each_part():
    from moeguard.attribution.ablation import loss_by_part

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=generator)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 4, 0], [-100, 3, -100, -100]])
    part = torch.tensor([0, 1, 0])
    sums, counts = loss_by_part(logits, labels, part)
    log_probs = logits.log_softmax(-1)
    expected = [0.0, 0.0]
    for b in range(3):
        for t in range(3):
            if labels[b, t + 1] != -100:
                expected[int(part[b])] -= log_probs[b, t, labels[b, t + 1]].item()
    assert counts.tolist() == [3, 2]
    assert sums.tolist() == pytest.approx(expected, rel=1e-6)
    # A part without labelled tokens contributes nothing (not NaN).
    sums, counts = loss_by_part(logits, labels, torch.tensor([0, 0, 0]))
    assert counts.tolist() == [5, 0] and sums[1].item() == 0.0
