"""The pure functions of forensics: the residual map, the signatures' invariances, standardisation,
matching, alignment and their nulls, the calibration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_moe

from moeguard.forensics.alignment import fit_map, map_agreement, map_kind, procrustes
from moeguard.forensics.calibration import BUILTIN_NULL, NullCalibration
from moeguard.forensics.derivatives import random_basis
from moeguard.forensics.matching import (
    alignment_null,
    assignment_null,
    match_experts,
    matched_mean,
    monotone_alignment,
    monotone_totals,
    pair_threshold,
)
from moeguard.forensics.residual import norm_gain
from moeguard.forensics.signatures import expert_neurons, expert_rows
from moeguard.forensics.similarity import EVIDENCE_FLOOR, mix_components, neuron_directions, neuron_similarity, standardise

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("suspect_width", [16, 20, 12])
def test_procrustes_recovers_a_rotation_a_padding_and_a_projection(suspect_width):
    parent_rows = rows(200, 16, 0)
    basis = random_basis(suspect_width, 16, seed=1)  # orthonormal columns (wider), rows (narrower) or both
    suspect_rows = 3.0 * parent_rows @ basis.T
    fitted = fit_map({"rows": (suspect_rows, parent_rows)}, "test")
    torch.testing.assert_close(fitted.basis, basis)
    assert fitted.residual < 1e-7
    assert fitted.kind.startswith({16: "rotation", 20: "wider", 12: "narrower"}[suspect_width])
    if suspect_width >= 16:  # an isometry: the polar factor of the cross-product is the least-squares map
        torch.testing.assert_close(procrustes(suspect_rows.T @ parent_rows), basis)


def test_a_fitted_map_reports_each_source_and_their_agreement():
    parent_rows = rows(300, 8, 2)
    basis = random_basis(8, 8, seed=3)
    noisy = parent_rows @ basis.T + 0.3 * rows(300, 8, 4)
    exact = parent_rows[:100] @ basis.T
    fitted = fit_map({"exact": (exact, parent_rows[:100]), "noisy": (noisy, parent_rows)}, "test")
    torch.testing.assert_close(fitted.basis, basis, atol=0.05, rtol=0)
    fits = {s.name: s for s in fitted.sources}
    assert fits["exact"].own_residual < 1e-10 and 0.2 < fits["noisy"].residual < 0.5
    assert fitted.agreement > 0.95
    assert map_agreement(basis, random_basis(8, 8, seed=9)) < 0.6
    assert map_kind(torch.eye(8, dtype=torch.float64)[torch.randperm(8)]) == "signed permutation"


def test_norm_gain_reads_rmsnorm_layernorm_and_one_plus_w_norms():
    gain = torch.linspace(0.5, 2.0, 10)
    rms = tiny_moe("qwen3_moe").model.model.norm.__class__(10, eps=1e-2)
    rms.weight.data = gain.clone()
    layer = torch.nn.LayerNorm(10)
    layer.weight.data, layer.bias.data = gain.clone(), torch.randn(10)

    class OnePlus(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(gain - 1)

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    for norm in (rms, layer, OnePlus()):
        torch.testing.assert_close(norm_gain(norm, 10), gain, atol=1e-5, rtol=1e-5)


def test_neuron_similarity_ignores_neuron_order_scale_and_sign():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, 16, 8, generator=generator) for _ in range(3)]  # [E, I, H]: gate, up, down
    order = torch.randperm(16, generator=generator)
    scale = torch.exp(torch.randn(3, 16, 1, generator=generator)) * torch.sign(torch.randn(3, 16, 1, generator=generator))
    moved = [parts[0][:, order], (parts[1] * scale)[:, order], (parts[2] / scale)[:, order]]
    similarity = neuron_similarity(neuron_directions(moved, None, None), neuron_directions(parts, None, None))
    torch.testing.assert_close(similarity.diagonal(), torch.ones(3))
    assert float(similarity.fill_diagonal_(0).max()) < 0.8
    basis = random_basis(8, 8, seed=5).float()  # a rotated suspect, mapped back by the basis
    rotated = [p @ basis.T for p in moved]
    mapped = neuron_similarity(neuron_directions(rotated, basis.double(), None), neuron_directions(parts, None, None))
    torch.testing.assert_close(mapped.diagonal(), torch.ones(3))


def test_mix_components_finds_what_a_merged_expert_averages_and_in_which_proportions():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(5, 24, 32, generator=generator) for _ in range(3)]  # [E, I, H]: gate, up, down
    parent = neuron_directions(parts, None, None)
    order = torch.randperm(24, generator=generator)
    merged = [(0.6 * p[1] + 0.4 * p[3])[order].unsqueeze(0) for p in parts]  # expert 1 averaged with expert 3
    similarity, weight = mix_components(neuron_directions(merged, None, None)[0], parent, main=1)
    others = [k for k in range(5) if k not in (1, 3)]
    assert float(similarity[3]) > 0.9 and float(similarity[others].max()) < 0.6
    assert float(weight[1]) > float(weight[3]) > 1.5 * float(weight[others].max())
    assert 1.2 < float(weight[1] / weight[3]) < 1.8  # about 0.6 / 0.4
    tuned = [(p[1] + 0.05 * torch.randn(24, 32, generator=generator))[order].unsqueeze(0) for p in parts]  # no partner
    similarity, _ = mix_components(neuron_directions(tuned, None, None)[0], parent, main=1)
    assert float(similarity.max()) < 0.6


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_neurons_split_gate_and_up_as_the_experts_module_stores_them(family):
    moe = tiny_moe(family)
    layer = moe.layers[0]
    (gate, up), (down,) = expert_neurons(layer)
    reads, _ = expert_rows(layer)
    assert gate.shape == up.shape == down.shape == (8, 32, 64)
    x = torch.randn(5, 64)
    gate_up = layer.experts.gate_up_proj[0]
    out = x @ gate_up if layer.experts.is_transposed else x @ gate_up.T
    torch.testing.assert_close(out[:, 0::2] if family == "gpt_oss" else out[:, :32], x @ gate[0].T)
    assert reads.shape == (8, 64, 64)


def test_standardise_centres_each_expert_on_its_background_and_floors_the_spread():
    generator = torch.Generator().manual_seed(1)
    similarity = 0.2 + 0.1 * torch.randn(4, 8, generator=generator, dtype=torch.float64)
    similarity[[0, 1, 2, 3], [5, 1, 6, 2]] = 1.0
    z = standardise(similarity)
    assert z.median(dim=1).values.abs().max() < 1e-12
    assert (z[[0, 1, 2, 3], [5, 1, 6, 2]] > 5).all()
    tight = 0.2 + 1e-4 * torch.randn(4, 8, generator=generator, dtype=torch.float64)
    tight[0, 0] = 0.25  # a small excess over a tiny spread counts only by its share of the way to identity
    background = float(tight[0].median())
    assert float(standardise(tight)[0, 0]) == pytest.approx((0.25 - background) / (EVIDENCE_FLOOR * (1 - background)), rel=1e-6)


def test_assignment_recovers_a_planted_matching_in_a_rectangular_matrix():
    generator = torch.Generator().manual_seed(0)
    evidence = torch.randn(3, 7, generator=generator)
    evidence[[0, 1, 2], [5, 1, 6]] += 10
    assert match_experts(evidence) == ([0, 1, 2], [5, 1, 6])
    assert matched_mean(evidence) == pytest.approx(float(evidence[[0, 1, 2], [5, 1, 6]].mean()))
    rows_, cols = match_experts(evidence.T)  # more suspect experts than parent experts: 4 stay unmatched
    assert len(rows_) == 3 and sorted(cols) == [0, 1, 2]


def test_the_simulated_assignment_null_matches_a_fresh_simulation():
    null = assignment_null(4, 8, 2)
    generator = torch.Generator().manual_seed(123)
    fresh = [matched_mean((standardise(torch.randn(4, 8, generator=generator)) + standardise(torch.randn(4, 8, generator=generator)))
                          / math.sqrt(2)) for _ in range(400)]
    assert null.mean == pytest.approx(float(np.mean(fresh)), abs=0.1)
    assert null.std == pytest.approx(float(np.std(fresh)), rel=0.2)


def test_monotone_alignment_is_the_best_increasing_map_and_its_totals_agree():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(20, 3, 6, generator=generator, dtype=torch.float64)
    for score, total in zip(scores, monotone_totals(scores.numpy())):
        best = max(itertools.combinations(range(6), 3), key=lambda cols: sum(float(score[r, c]) for r, c in enumerate(cols)))
        assert monotone_alignment(score) == list(best)
        assert total == pytest.approx(sum(float(score[r, c]) for r, c in enumerate(best)))
    null = alignment_null(3, 6)
    assert null.mean > 0 and null.std > 0  # choosing the best alignment favours high totals


def test_pair_threshold_grows_with_the_number_of_candidate_pairs():
    assert 4.75 < pair_threshold(1e-6, 1) < 4.76
    assert pair_threshold(1e-6, 64) < pair_threshold(1e-6, 128 * 128)


def test_reference_calibration_is_a_student_t_prediction_and_the_built_in_null_a_normal():
    calibration = NullCalibration("reference", [0.0, 1.0, 2.0, 3.0, 4.0])
    assert calibration.z(2.0 + 10 * calibration.std * math.sqrt(1.2)) == pytest.approx(10)
    assert calibration.p_value(calibration.mean) == pytest.approx(0.5)
    assert calibration.z_threshold(1e-6) > BUILTIN_NULL.z_threshold(1e-6) > 4.75
    assert BUILTIN_NULL.z(3.0) == 3.0 and BUILTIN_NULL.p_value(0.0) == pytest.approx(0.5)
