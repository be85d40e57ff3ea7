"""Prune plans chosen from hand-made scores: uniform, coverage, global, group-aware, protect, guards."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_moe
from moeguard.errors import InputError, PlanError
from moeguard.models.layers import GroupRouting
from moeguard.pruning.plans import LayerLimits, make_plan, normalised_mass, priority_order, take

# Two layers of 8 experts, top-2. Layer 0 is concentrated, layer 1 is flat.
SCORES = torch.tensor(
    [
        [0.40, 0.30, 0.10, 0.10, 0.05, 0.05, 0.00, 0.00],
        [0.125] * 8,
    ],
    dtype=torch.float64,
)
PLAIN = [LayerLimits(0, 8, 2), LayerLimits(1, 8, 2)]
# Group-limited like DeepSeek-V3: 2 groups of 4, groups scored by their 2 best experts, 1 group per token.
GROUPED = [LayerLimits(0, 8, 2, GroupRouting(num_groups=2, groups_per_token=1))]


def test_uniform_keeps_the_top_m_of_every_layer_ties_to_the_lower_index():
    plan = make_plan(SCORES, PLAIN, keep=3)
    assert plan.kept == [[0, 1, 2], [0, 1, 2]]
    assert plan.is_uniform and plan.method == "uniform"
    assert plan.keep_sets() == {0: [0, 1, 2], 1: [0, 1, 2]}
    assert plan.fraction_kept == pytest.approx(6 / 16)


def test_uniform_follows_the_scores_not_the_indices():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.05]])
    assert make_plan(scores, PLAIN[:1], keep=3).kept == [[2, 4, 5]]


def test_least_used_keeps_the_bottom_m():
    plan = make_plan(SCORES, PLAIN, keep=3, least_used=True)
    assert plan.kept[0] == [4, 6, 7]  # 4 and 5 tie at 0.05: the lower index goes first
    assert plan.label == "least_used:frequency"
    assert plan.selection()["ranking"] == "least_used"


def test_coverage_keeps_the_smallest_set_reaching_the_mass_per_layer():
    plan = make_plan(SCORES, PLAIN, coverage=0.75)
    # layer 0: 0.4 + 0.3 = 0.7 < 0.75, + 0.1 = 0.8; layer 1: six experts of 0.125 = 0.75
    assert plan.kept == [[0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert not plan.is_uniform
    assert plan.coverage == 0.75 and plan.keep is None


def test_coverage_never_goes_below_top_k():
    scores = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]])
    assert make_plan(scores, PLAIN[:1], coverage=0.5).kept == [[0, 1]]


def test_coverage_ignores_negative_scores_and_handles_all_zero_layers():
    scores = torch.tensor([[0.5, -2.0, 0.5, 0.0, -1.0, 0.0, 0.0, 0.0], [0.0] * 8])
    weights = normalised_mass(scores[0])
    assert weights.tolist() == [0.5, 0, 0.5, 0, 0, 0, 0, 0]
    assert normalised_mass(scores[1]).tolist() == [0.125] * 8
    plan = make_plan(scores, PLAIN, coverage=1.0)
    assert plan.kept == [[0, 2], list(range(8))]


def test_global_budget_goes_where_the_normalised_mass_is():
    plan = make_plan(SCORES, PLAIN, budget=6)
    # both start at top_k=2; the next expert is worth 0.10 in layer 0 and 0.125 in layer 1
    assert plan.kept == [[0, 1], [0, 1, 2, 3]]
    assert sum(plan.keep_counts) == 6 and plan.method == "global"


def test_global_budget_outside_the_feasible_range_is_refused():
    with pytest.raises(PlanError, match=r"at least 4 .* choose a budget in 4\.\.16"):
        make_plan(SCORES, PLAIN, budget=3)
    with pytest.raises(PlanError, match=r"budget in 4\.\.16"):
        make_plan(SCORES, PLAIN, budget=17)


def test_global_least_used_spends_the_budget_on_the_least_mass():
    plan = make_plan(SCORES, PLAIN, budget=6, least_used=True)
    assert plan.kept == [[4, 5, 6, 7], [0, 1]]


def test_group_aware_uniform_keeps_the_best_of_every_group_evenly():
    plan = make_plan(SCORES[:1], GROUPED, keep=4)
    assert plan.kept == [[0, 1, 4, 5]]  # the top 4 overall would be 0..3, all in group 0


def test_group_aware_uniform_refuses_a_count_that_cannot_be_even():
    with pytest.raises(PlanError, match=r"group-limited .* Keep a multiple of 2"):
        make_plan(SCORES[:1], GROUPED, keep=3)


def test_group_aware_refuses_fewer_than_the_experts_a_group_is_scored_by():
    with pytest.raises(PlanError, match="must keep at least 2"):
        make_plan(SCORES[:1], GROUPED, keep=2)


def test_group_aware_coverage_grows_all_groups_together():
    plan = make_plan(SCORES[:1], GROUPED, coverage=0.9)
    # 1 per group is infeasible; 2 per group carry 0.8; 3 per group carry 0.9
    assert plan.kept == [[0, 1, 2, 4, 5, 6]]


def test_group_aware_global_budget_moves_in_whole_group_steps():
    limits = [GROUPED[0], LayerLimits(1, 8, 2)]
    plan = make_plan(SCORES, limits, budget=9)
    assert len(plan.kept[0]) % 2 == 0
    assert sum(plan.keep_counts) == 9
    assert plan.kept[0] == [0, 1, 4, 5]


def test_take_is_nested_and_group_balanced():
    order = priority_order(SCORES[0])
    routing = GroupRouting(num_groups=2, groups_per_token=1)
    assert take(order, 4, routing) == [0, 1, 4, 5]
    assert set(take(order, 4, routing)) <= set(take(order, 6, routing))


def test_protected_experts_are_always_kept():
    plan = make_plan(SCORES, PLAIN, keep=2, protect=[(0, 7), (1, 5)])
    assert 7 in plan.kept[0] and plan.kept[0] == [0, 7]
    assert 5 in plan.kept[1] and len(plan.kept[1]) == 2
    assert plan.selection()["protect"] == [[0, 7], [1, 5]]
    coverage = make_plan(SCORES, PLAIN, coverage=0.7, protect=[(0, 6)])
    assert coverage.kept[0] == [0, 1, 6]


def test_protecting_more_than_the_plan_keeps_is_refused():
    with pytest.raises(PlanError, match=r"layer 0: keep=2 keeps 2 experts, but 3 protected experts do not fit"):
        make_plan(SCORES, PLAIN, keep=2, protect=[(0, 5), (0, 6), (0, 7)])
    with pytest.raises(PlanError, match="protected experts .* do not fit in an even share"):
        make_plan(SCORES[:1], GROUPED, keep=4, protect=[(0, 1), (0, 2), (0, 3)])


def test_protect_entries_outside_the_model_are_refused():
    with pytest.raises(PlanError, match="names MoE layer 5, but the model has 2"):
        make_plan(SCORES, PLAIN, keep=2, protect=[(5, 0)])
    with pytest.raises(PlanError, match=r"layer 1 has 8 experts \(0\.\.7\)"):
        make_plan(SCORES, PLAIN, keep=2, protect=[(1, 8)])


def test_guards_refuse_fewer_than_top_k_and_more_than_the_layer_has():
    with pytest.raises(PlanError, match="top_k=2"):
        make_plan(SCORES, PLAIN, keep=1)
    with pytest.raises(PlanError, match="keep=9 experts per layer, but layer 0 has 8"):
        make_plan(SCORES, PLAIN, keep=9)
    with pytest.raises(PlanError, match=r"coverage must be a fraction in \(0, 1\]"):
        make_plan(SCORES, PLAIN, coverage=1.5)


def test_exactly_one_size_and_matching_scores_are_required():
    with pytest.raises(InputError, match="exactly one of keep"):
        make_plan(SCORES, PLAIN, keep=2, coverage=0.5)
    with pytest.raises(InputError, match="exactly one of keep"):
        make_plan(SCORES, PLAIN)
    with pytest.raises(InputError, match="computed on another model"):
        make_plan(SCORES[:1], PLAIN, keep=2)


def test_padding_columns_of_narrower_layers_are_never_chosen():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.4, float("-inf"), float("-inf")]])
    plan = make_plan(scores, [LayerLimits(0, 4, 1), LayerLimits(1, 2, 1)], coverage=1.0)
    assert plan.kept == [[0, 1, 2, 3], [0, 1]]


def test_plans_from_real_layers_pass_the_model_guards_and_mask_it():
    moe = tiny_moe("deepseek_v3")  # top-4 over 2 groups of 4
    scores = torch.arange(moe.num_layers * 8, dtype=torch.float64).reshape(moe.num_layers, 8)
    plan = make_plan(scores, moe.layers, keep=4)
    assert plan.kept == [[2, 3, 6, 7]] * moe.num_layers
    with moe.mask_experts(plan.keep_sets()):
        pass
    selection = plan.selection()
    assert selection["method"] == "uniform" and selection["keep"] == 4 and selection["keep_counts"] == [4, 4]
