"""The pure functions of forensics: permutation group, standardisation, matching, alignment, test."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_moe

from moeguard.forensics.matching import group_test, match_experts, matched_mean, monotone_alignment, pair_threshold
from moeguard.forensics.probes import conjugate_responses, conjugate_rows, cyclic_shifts, orbit_probes
from moeguard.forensics.signatures import expert_responses, expert_weight_rows, router_rows
from moeguard.forensics.similarity import leave_one_out_z, response_similarities, row_similarities

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cyclic_shifts_form_a_group_of_the_requested_order():
    perms = cyclic_shifts(70, 8)  # q = 8: coordinates 64..69 stay fixed
    assert torch.equal(perms[0], torch.arange(70))
    for s, t in itertools.product(range(8), repeat=2):
        assert torch.equal(perms[s][perms[t]], perms[(s + t) % 8])
    assert torch.equal(perms[3][64:], torch.arange(64, 70))
    assert all(len(set(p.tolist())) == 70 for p in perms)


def test_orbit_probes_are_closed_under_the_shifts():
    probes = orbit_probes(32, 8, 3, seed=1)
    perms = cyclic_shifts(32, 8)
    assert probes.shape == (3, 8, 32)
    for k in range(8):
        assert torch.equal(probes[:, k], probes[:, 0][:, perms[k]])


def _conjugate_model_in_place(moe, shift: int, perms: torch.Tensor) -> None:
    """Move the hidden coordinates of every expert weight and router row by ``g^s`` (the real thing)."""
    from moeguard.forensics.signatures import _hidden_axis

    index = perms[shift]
    with torch.no_grad():
        for layer in moe.layers:
            hidden = router_rows(layer).shape[1]
            for ref in layer.tensors("router") + layer.tensors("experts"):
                tensor = ref.get()
                if tensor.ndim == 2 and tensor.shape[-1] == hidden and ref.role == "router":
                    tensor.copy_(tensor[:, index])
                elif tensor.ndim == 3:
                    axis = _hidden_axis(layer, ref.attr, tensor.shape, hidden)
                    tensor.copy_(tensor.index_select(axis, index))
                elif ref.attr == "down_proj_bias":
                    tensor.copy_(tensor[:, index])


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_reindexed_responses_and_rows_equal_those_of_the_conjugated_model(family):
    moe = tiny_moe(family)
    perms = cyclic_shifts(64, 16)
    probes = orbit_probes(64, 16, 2)
    responses, weights, router = expert_responses(moe, 0, probes), expert_weight_rows(moe.layers[0]), router_rows(moe.layers[0])
    _conjugate_model_in_place(moe, 5, perms)
    torch.testing.assert_close(expert_responses(moe, 0, probes), conjugate_responses(responses, perms, 5), rtol=1e-4, atol=1e-6)
    assert torch.equal(expert_weight_rows(moe.layers[0]), conjugate_rows(weights, perms, 5))
    assert torch.equal(router_rows(moe.layers[0]), conjugate_rows(router, perms, 5))


def test_similarities_are_cosines_under_each_shift():
    perms = cyclic_shifts(12, 4)
    a, b = torch.randn(3, 2, 4, 12), torch.randn(5, 2, 4, 12)
    sims = response_similarities(a, b, perms)
    moved = conjugate_responses(a, perms, 2)
    expected = torch.nn.functional.cosine_similarity(moved.flatten(1)[:, None], b.flatten(1)[None], dim=-1)
    torch.testing.assert_close(sims[2], expected, rtol=1e-5, atol=1e-6)
    rows = row_similarities(a[:, 0, 0], b[:, 0, 0], perms)
    expected = torch.nn.functional.cosine_similarity(a[:, 0, 0, perms[3]][:, None], b[:, 0, 0][None], dim=-1)
    torch.testing.assert_close(rows[3], expected, rtol=1e-5, atol=1e-6)


def test_leave_one_out_z_standardises_each_sample_against_the_others():
    samples = torch.randn(7, 3, 2, dtype=torch.float64)
    z = leave_one_out_z(samples)
    for s in range(7):
        others = torch.cat([samples[:s], samples[s + 1 :]])
        torch.testing.assert_close(z[s], (samples[s] - others.mean(0)) / others.std(0))


def test_assignment_recovers_a_planted_matching_in_a_rectangular_matrix():
    generator = torch.Generator().manual_seed(0)
    evidence = torch.randn(3, 7, generator=generator)
    evidence[[0, 1, 2], [5, 1, 6]] += 10
    rows, cols = match_experts(evidence)
    assert (rows, cols) == ([0, 1, 2], [5, 1, 6])
    assert matched_mean(evidence) == pytest.approx(float(evidence[[0, 1, 2], [5, 1, 6]].mean()))
    rows, cols = match_experts(evidence.T)  # more suspect experts than parent experts: 4 stay unmatched
    assert len(rows) == 3 and sorted(cols) == [0, 1, 2]


def test_monotone_alignment_is_the_best_increasing_map():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        score = torch.randn(3, 6, generator=generator)
        best = max(itertools.combinations(range(6), 3), key=lambda cols: sum(float(score[r, c]) for r, c in enumerate(cols)))
        assert monotone_alignment(score) == list(best)


def test_group_test_ranks_the_observation_among_the_null():
    statistics = torch.tensor([5.0, 1.0, 2.0, 3.0, 6.0])
    test = group_test(statistics)
    assert test.p_exact == pytest.approx(2 / 5)
    null = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert test.z == pytest.approx((5 - null.mean().item()) / null.std().item())
    assert 0 < test.p_value < 0.5


def test_pair_threshold_grows_with_the_number_of_candidate_pairs():
    assert 4.75 < pair_threshold(1e-6, 1) < 4.76
    assert pair_threshold(1e-6, 64) < pair_threshold(1e-6, 128 * 128)
