"""The attacker's configuration is chosen on the tuning seeds only, by reaching the target first and cost second."""

from __future__ import annotations

import pytest

from moeguard.attack.measure import HeadStartSettings
from moeguard.attack.tuning import Outcome, choose_configuration, configuration_label, rank, tune
from moeguard.errors import InputError

GRID = {"selection": ("search", "attribution", "random"), "lr": (3e-3, 1e-3, 1e-2), "loss": ("logits", "answers")}
TUNING, REPORT = (1000, 1001), (0, 1, 2, 3, 4)


def cost_table(configuration, seed):
    """A hand-made landscape: attribution at lr 1e-2 with answers is cheapest; search at 1e-3 never reaches."""
    cost = {"search": 100.0, "attribution": 60.0, "random": 80.0}[configuration["selection"]]
    cost *= {3e-3: 1.0, 1e-3: 1.5, 1e-2: 0.8}[configuration["lr"]]
    cost *= {"logits": 1.0, "answers": 0.9}[configuration["loss"]]
    reached = not (configuration["selection"] == "search" and configuration["lr"] == 1e-3)
    return Outcome(reached, cost + seed % 2, 0.95 if reached else 0.5)


def test_tuning_measures_the_tuning_seeds_only_and_finds_the_best_configuration():
    seen = []

    def measure(configuration, seed):
        seen.append(seed)
        return cost_table(configuration, seed)

    for strategy in ("coordinate", "grid"):
        seen.clear()
        tuning = tune(GRID, measure, TUNING, strategy=strategy)
        assert set(seen) == set(TUNING)
        assert tuning.chosen == {"selection": "attribution", "lr": 1e-2, "loss": "answers"}
    coordinate = tune(GRID, cost_table, TUNING, strategy="coordinate")
    assert len(coordinate.tried) == 1 + 2 + 2 + 1  # one pass, one axis at a time
    assert len(tune(GRID, cost_table, TUNING, strategy="grid").tried) == 3 * 3 * 2


def test_what_fresh_seeds_would_have_shown_cannot_change_the_choice():
    """A configuration that is best on the report seeds but not on the tuning seeds is not chosen."""

    def measure(configuration, seed):
        if seed in REPORT:
            raise AssertionError(f"report seed {seed} was measured during tuning")
        return cost_table(configuration, seed)

    chosen = tune(GRID, measure, TUNING).chosen
    # On the report seeds 'random' would be free; the tuner never sees that.
    assert chosen["selection"] == "attribution"


def test_reaching_the_target_outranks_cost_and_closeness_breaks_ties_between_failures():
    always = [Outcome(True, 500.0, 0.95), Outcome(True, 500.0, 0.95)]
    sometimes = [Outcome(True, 10.0, 0.95), Outcome(False, 300.0, 0.7)]
    close = [Outcome(False, 300.0, 0.85)]
    far = [Outcome(False, 300.0, 0.4)]
    assert rank(always) < rank(sometimes)
    assert rank(close) < rank(far)
    tried = {"a": ({"x": 1}, sometimes), "b": ({"x": 2}, always)}
    assert choose_configuration(tried) == {"x": 2}


def test_a_single_configuration_is_chosen_without_running_it():
    def measure(configuration, seed):
        raise AssertionError("nothing to tune")

    tuning = tune({"lr": (3e-3,), "loss": ("logits",)}, measure, TUNING)
    assert tuning.chosen == {"lr": 3e-3, "loss": "logits"} and not tuning.tried


def test_labels_name_every_axis_in_order():
    assert configuration_label({"selection": "search", "lr": 3e-3, "router_reinit": True}) == \
        "selection=search/lr=0.003/router_reinit=True"


def test_tuning_and_report_seeds_must_not_overlap_and_grids_must_not_be_empty():
    with pytest.raises(InputError, match="both tuning and report seeds"):
        HeadStartSettings(tuning_seeds=(0, 7), report_seeds=(0, 1)).check()
    with pytest.raises(InputError, match="at least one value"):
        HeadStartSettings(carve_lrs=()).check()
    with pytest.raises(InputError, match="unknown selection"):
        HeadStartSettings(selections=("oracle",)).check()
    with pytest.raises(InputError, match="at least one value of lr"):
        tune({"lr": ()}, cost_table, TUNING)
    HeadStartSettings().check()
