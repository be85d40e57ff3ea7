"""The defense evaluation: its settings, the authorised task, and one small end-to-end run."""

from __future__ import annotations

import dataclasses
import math

import pytest

from moeguard.attack import HeadStartSettings
from moeguard.attack.labels import LabelSettings
from moeguard.data import BUILTIN_TASKS
from moeguard.defense.costs import cost_multiplier
from moeguard.defense.evaluation import DefenseEvalSettings, authorised_task
from moeguard.errors import InputError
from moeguard.realign import RealignConfig


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
    with pytest.raises(InputError, match="target tasks"):
        DefenseEvalSettings(target_tasks=("reverse",), tasks=("upper",)).check()
    with pytest.raises(InputError, match="attack_keeps"):
        DefenseEvalSettings(attack_keeps=()).check()
    with pytest.raises(InputError, match="unknown attribution criterion"):
        DefenseEvalSettings(criteria=("frequency", "magic")).check()
    with pytest.raises(InputError, match="both tuning and report seeds"):
        DefenseEvalSettings(headstart=HeadStartSettings(tuning_seeds=(1,), report_seeds=(1, 2))).check()
    with pytest.raises(InputError, match="unknown acquisition"):
        DefenseEvalSettings(labels=LabelSettings(acquisitions=("psychic",))).check()


TINY_HEADSTART = HeadStartSettings(
    selections=("attribution", "random"), carve_lrs=(3e-3,), scratch_lrs=(3e-3,), losses=("logits",),
    try_router_reinit=False, carve_steps=20, scratch_steps=30, student_batch=16, warmup_steps=5, evaluate_every=10,
    tuning_seeds=(100,), report_seeds=(0, 1), curve_test_size=24, selection_examples=16, resamples=200,
)


@pytest.mark.slow
def test_an_evaluation_runs_end_to_end_resumes_from_its_cache_and_scores_a_model_against_itself_as_the_same(
    trained_tiny, tmp_path, one_thread
):
    import json

    from moeguard.defense.evaluation import evaluate_defenses
    from moeguard.defense.report import TABLE_NAME, write_report

    settings = DefenseEvalSettings(
        target_tasks=("upper",), tasks=("reverse", "upper"), keeps=(6, 4), attack_keeps=(2,), criteria=("frequency",),
        headstart=TINY_HEADSTART, labels=LabelSettings(acquisitions=("sequence_nll",), round_steps=(3,), label_lrs=(3e-3,), label_tuning_seeds=(100,)),
        attack=RealignConfig(budget=16, rounds=2, steps_per_round=3, batch_size=8, acquisition="sequence_nll"),
        pool_size=32, test_size=16, attribution_samples=32, authorised_steps=3, authorised_examples=64,
    )
    models = {"undefended": trained_tiny, "same": trained_tiny}
    result = evaluate_defenses(models, settings, tmp_path, progress=False)
    write_report(result, tmp_path)  # the tables and figures are drawn from the result, at the edge
    base, same = result.models
    assert base.utility == same.utility and base.utility["upper"] > 0.8
    key = "upper/keep2"
    ours, theirs = same.headstart[key], base.headstart[key]
    assert ours.scratch_shared and not theirs.scratch_shared
    # The same weights attacked the same way give the same curves and the same head start.
    assert [c.points for c in ours.carve.curves] == [c.points for c in theirs.carve.curves]
    assert ours.head_start["flops"].value == theirs.head_start["flops"].value
    multiplier = result.label_multiplier(same, key)
    assert multiplier is not None and multiplier.value == 1.0
    assert same.authorised["compliant"]
    curve = tmp_path / "runs" / "same" / "headstart" / "upper-keep2" / "carve" / "report"
    saved_curve = next(curve.glob("*/seed0/curve.json"))
    stamp = saved_curve.stat().st_mtime_ns
    again = evaluate_defenses(models, settings, tmp_path, progress=False)
    assert saved_curve.stat().st_mtime_ns == stamp  # the finished curve was read back, not trained again

    def measured(evaluation):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in evaluation.to_dict()["models"]]

    def without_time(value):
        if isinstance(value, dict):
            return {k: without_time(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [without_time(v) for v in value]
        return "nan" if isinstance(value, float) and math.isnan(value) else value  # nan != nan

    assert without_time(measured(again)) == without_time(measured(result))
    saved = json.loads((tmp_path / "defense_eval.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["undefended", "same"]
    assert "Head start" in (tmp_path / TABLE_NAME).read_text()
    assert {"utility", "knowledge_loss", "headstart_curves", "headstart_vs_utility"} <= set(saved["figures"])
    with pytest.raises(InputError, match="other settings"):
        evaluate_defenses(models, dataclasses.replace(settings, pool_size=48), tmp_path, progress=False)
