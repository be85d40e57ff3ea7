"""The head start's arithmetic on hand-made curves: crossings, censoring, FLOPs, the bootstrap interval."""

from __future__ import annotations

import math

import pytest

from moeguard.attack.headstart import (
    RunCost,
    bootstrap_ratio_interval,
    crossing_step,
    forward_flops,
    head_start,
    ratio_of_means,
    run_cost,
    training_flops,
    value_at,
)


def test_the_crossing_is_interpolated_between_the_evaluations_around_the_target():
    steps, accuracy = [0, 25, 50, 75], [0.1, 0.5, 0.8, 0.95]
    # 0.9 lies 2/3 of the way from 0.8 (step 50) to 0.95 (step 75).
    assert crossing_step(steps, accuracy, 0.9) == pytest.approx(50 + 25 * 2 / 3)
    assert crossing_step(steps, accuracy, 0.5) == 25  # exactly on a point


def test_the_first_crossing_counts_even_when_the_curve_falls_back_later():
    assert crossing_step([0, 10, 20, 30], [0.0, 0.95, 0.6, 0.99], 0.9) == pytest.approx(10 * 0.9 / 0.95)


def test_a_curve_that_starts_at_the_target_costs_nothing_and_one_that_never_reaches_it_is_censored():
    assert crossing_step([0, 25], [0.93, 0.97], 0.9) == 0
    assert crossing_step([0, 25, 50], [0.1, 0.5, 0.89], 0.9) is None
    free = run_cost([0, 25], [0, 800], [0, 8e6], [0.93, 0.97], 0.9, overhead=5.0)
    assert free == RunCost(True, 0.0, 0.0, 5.0)
    censored = run_cost([0, 25, 50], [0, 800, 1700], [0, 8e6, 1.7e7], [0.1, 0.5, 0.89], 0.9, overhead=5.0)
    assert censored == RunCost(False, 50.0, 1700.0, 1.7e7 + 5.0)


def test_the_compute_at_the_crossing_is_interpolated_like_the_step():
    cost = run_cost([0, 10, 20], [0, 100, 300], [0, 1000, 3000], [0.0, 0.5, 1.0], 0.75)
    assert cost.reached and cost.steps == 15 and cost.tokens == 200 and cost.flops == 2000
    assert value_at(15, [0, 10, 20], [0, 100, 300]) == 200
    with pytest.raises(ValueError):
        value_at(25, [0, 10, 20], [0, 100, 300])


def test_flops_are_six_per_parameter_and_token_for_training_and_two_for_a_forward_pass():
    assert training_flops(1000, 50) == 300_000
    assert forward_flops(1000, 50) == 100_000


def reached(flops: float) -> RunCost:
    return RunCost(True, 0.0, flops / 10, flops)


def test_the_head_start_is_the_ratio_of_mean_costs_and_exact_when_every_run_reached():
    result = head_start([reached(100), reached(300)], [reached(40), reached(60)], "flops", resamples=500)
    assert result.value == pytest.approx(200 / 50)
    assert result.bound == "exact" and result.scratch_reached == 2 and result.carve_reached == 2
    assert result.interval.low <= result.value <= result.interval.high
    tokens = head_start([reached(100)], [reached(50)], "tokens", resamples=10)
    assert tokens.value == pytest.approx(2.0)


def test_censored_runs_make_the_head_start_a_bound_in_the_direction_they_push_it():
    unreached = RunCost(False, 3000, 1e5, 1e6)
    assert head_start([unreached, reached(100)], [reached(50)], resamples=10).bound == "lower"
    assert head_start([reached(100)], [unreached], resamples=10).bound == "upper"
    assert head_start([unreached], [unreached], resamples=10).bound == "unknown"
    assert "?" in head_start([unreached], [unreached], resamples=10).describe()
    assert head_start([unreached], [reached(50)], resamples=10).describe().startswith(">= ")


def test_the_bootstrap_interval_covers_the_spread_of_the_seeds_and_shrinks_to_a_point_without_one():
    single = bootstrap_ratio_interval([10.0], [5.0], resamples=200)
    assert single.low == single.high == 2.0
    same = bootstrap_ratio_interval([10.0, 10.0, 10.0], [5.0, 5.0, 5.0], resamples=200)
    assert same.low == same.high == 2.0
    spread = bootstrap_ratio_interval([5.0, 10.0, 15.0, 20.0, 25.0], [5.0] * 5, resamples=4000, seed=1)
    # The mean of five draws from {1..5} lies in [1, 5]; a 95% interval sits well inside it and around 3.
    assert 1.0 <= spread.low < 3.0 < spread.high <= 5.0
    assert spread.high - spread.low > 1.0
    assert bootstrap_ratio_interval([5.0, 10.0, 15.0, 20.0, 25.0], [5.0] * 5, resamples=4000, seed=1) == spread


def test_a_free_carve_gives_an_infinite_head_start():
    assert math.isinf(ratio_of_means([10.0], [0.0]))
    assert math.isnan(ratio_of_means([0.0], [0.0]))


def test_the_scratch_arm_is_capped_at_a_multiple_of_the_mean_carve_cost_and_not_when_a_carve_was_censored():
    from moeguard.attack.measure import scratch_compute_cap

    assert scratch_compute_cap([reached(40), reached(60)], 2.0) == pytest.approx(100.0)
    assert scratch_compute_cap([reached(40), RunCost(False, 200, 1e4, 1e5)], 2.0) is None
    assert scratch_compute_cap([], 2.0) is None


def test_a_scratch_run_stopped_at_the_cap_gives_a_lower_bound_of_at_least_the_multiple():
    # The scratch run stops at the first evaluation at or beyond 2 x the carve's cost: it spent at least that.
    stopped = run_cost([0, 50, 100], [0, 800, 1600], [0.0, 110.0, 220.0], [0.0, 0.1, 0.3], target=0.9)
    result = head_start([stopped], [reached(100)], resamples=10)
    assert not stopped.reached and result.bound == "lower" and result.value >= 2.0
    assert result.describe().startswith(">= 2.20")


def test_the_compute_multiple_must_be_at_least_one_and_leaves_an_unbounded_identity_unchanged():
    from moeguard.attack import HeadStartSettings
    from moeguard.errors import InputError

    with pytest.raises(InputError, match="scratch_compute_multiple"):
        HeadStartSettings(scratch_compute_multiple=0.5).check()
    HeadStartSettings(scratch_compute_multiple=2.0).check()
    assert "scratch_compute_multiple" not in HeadStartSettings().to_dict()
    assert HeadStartSettings(scratch_compute_multiple=2.0).to_dict()["scratch_compute_multiple"] == 2.0
