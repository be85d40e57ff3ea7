"""The defense evaluation: attack-cost arithmetic on hand-made runs, the tables, and one small end-to-end run."""

from __future__ import annotations

import dataclasses
import math

import pytest

from moeguard.data import BUILTIN_TASKS, load_task
from moeguard.defense.costs import AttackRun, cost_multiplier, grid_cost
from moeguard.defense.evaluation import DefenseEvalSettings, authorised_task
from moeguard.errors import InputError
from moeguard.realign import RealignConfig


def run(criterion, scope, lr, seed, labels, steps, budget=(100, 40)):
    return AttackRun(criterion=criterion, scope=scope, lr=lr, seed=seed, labels=labels, steps=steps, budget_labels=budget[0],
                     budget_steps=budget[1], final_retention=0.9 if labels is not None else 0.5)


def test_the_worst_case_is_the_attackers_best_configuration_averaged_over_its_seeds():
    runs = [
        run("frequency", "all", 1e-3, 0, 20, 10),
        run("frequency", "all", 1e-3, 1, 40, 20),  # config mean 30 labels, 15 steps
        run("reap", "router", 1e-3, 0, 10, 30),
        run("reap", "router", 1e-3, 1, None, None),  # not reached: counts as the budget (100, 40)
    ]
    labels = grid_cost(runs, "labels")
    assert labels.best == ("frequency", "all", 1e-3)
    assert labels.best_cost == 30 and labels.mean_cost == (30 + 55) / 2
    assert not labels.censored and labels.reached == 3 and labels.runs == 4
    steps = grid_cost(runs, "steps")
    assert steps.best == ("frequency", "all", 1e-3) and steps.best_cost == 15 and steps.mean_cost == (15 + 35) / 2


def test_a_best_configuration_with_an_unreached_seed_is_flagged_as_a_lower_bound():
    runs = [run("frequency", "all", 1e-3, 0, None, None), run("frequency", "all", 1e-3, 1, 10, 5)]
    cost = grid_cost(runs, "labels")
    assert cost.best_cost == 55 and cost.censored


def test_cost_multiplier_handles_a_free_undefended_attack():
    assert cost_multiplier(60, 20) == 3
    assert cost_multiplier(0, 0) == 1
    assert math.isinf(cost_multiplier(10, 0))


def test_the_authorised_task_is_new_to_every_model_and_its_splits_are_disjoint():
    train, test = authorised_task("train", 300), authorised_task("test", 100)
    assert train.name not in BUILTIN_TASKS
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    example = test.examples[0]
    word = example.prompt.removeprefix("dbl ").removesuffix("=")
    assert example.answer == "".join(c + c for c in word)
    assert authorised_task("test", 100).examples == test.examples  # seeded


def test_settings_are_checked_before_any_work():
    with pytest.raises(InputError, match="target task"):
        DefenseEvalSettings(target_task="reverse", tasks=("upper",)).check()
    with pytest.raises(InputError, match=r"attack keep counts \[4, 3\]"):
        DefenseEvalSettings(attack_keeps=(4, 3)).check()
    with pytest.raises(InputError, match="unknown attribution criterion"):
        DefenseEvalSettings(criteria=("frequency", "magic")).check()
    with pytest.raises(InputError, match="trainable scope"):
        DefenseEvalSettings(scopes=("everything",)).check()


@pytest.mark.slow
def test_an_evaluation_runs_end_to_end_resumes_from_its_cache_and_scores_a_model_against_itself_as_1x(
    trained_tiny, tmp_path, one_thread
):
    import json

    from moeguard.defense.evaluation import evaluate_defenses
    from moeguard.defense.report import TABLE_NAME, write_report

    settings = DefenseEvalSettings(
        target_task="reverse", tasks=("reverse", "upper"), keeps=(6, 4), attack_keeps=(4,), criteria=("frequency",),
        scopes=("all",), lrs=(1e-3,), seeds=(0,),
        attack=RealignConfig(budget=32, rounds=2, steps_per_round=3, batch_size=16, acquisition="random"), pool_size=64,
        test_size=16, attribution_samples=32, authorised_steps=3, authorised_examples=64,
    )
    models = {"undefended": trained_tiny, "same": trained_tiny}
    result = evaluate_defenses(models, settings, tmp_path, progress=False)
    write_report(result, tmp_path)  # the tables and figures are drawn from the result, at the edge
    base, same = result.models
    assert base.utility == same.utility and base.utility["reverse"] > 0.8  # >= 0.95 of 200 examples; these are 16
    assert result.multipliers(same, "4") == {"labels_worst_case": 1.0, "labels_mean": 1.0, "steps_worst_case": 1.0, "steps_mean": 1.0}
    assert same.authorised["compliant"]
    # Adaptive attacks are cached under the configuration they ran with (frequency/all/lr=1e-3 is the only one).
    adaptive = tmp_path / "runs" / "same" / "keep4" / "adaptive"
    assert (adaptive / "distillation" / "frequency-all-lr0.001" / "seed0" / "history.json").is_file()
    assert (adaptive / "router_reinit" / "frequency-all-lr0.001" / "seed0" / "history.json").is_file()
    assert (adaptive / "distillation" / "teacher_pool.json").is_file()
    history = tmp_path / "runs" / "same" / "keep4" / "attacks" / "frequency-all-lr0.001-seed0" / "history.json"
    stamp = history.stat().st_mtime_ns
    again = evaluate_defenses(models, settings, tmp_path, progress=False)
    assert history.stat().st_mtime_ns == stamp  # the finished run was read back, not run again
    def measured(evaluation):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in evaluation.to_dict()["models"]]

    assert measured(again) == measured(result)
    saved = json.loads((tmp_path / "defense_eval.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["undefended", "same"]
    assert "Attack cost at keep 4" in (tmp_path / TABLE_NAME).read_text()
    assert {"utility", "knowledge_loss", "attack_cost", "recovery_keep4"} <= set(saved["figures"])
    with pytest.raises(InputError, match="other settings"):
        evaluate_defenses(models, dataclasses.replace(settings, attack=dataclasses.replace(settings.attack, budget=16)),
                          tmp_path, progress=False)


def test_adaptive_attacks_of_different_best_configurations_never_share_a_cache(tmp_path):
    from moeguard.defense.evaluation import adaptive_dir

    dirs = {adaptive_dir(tmp_path, attack, config) for attack in ("distillation", "router_reinit")
            for config in [("ablation", "all", 1e-3), ("ablation", "all", 3e-3), ("ablation", "experts", 1e-3),
                           ("reap", "all", 1e-3)]}
    assert len(dirs) == 8
