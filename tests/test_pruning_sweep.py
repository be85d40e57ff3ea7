"""The knowledge-loss sweep: mask mode equals the pruned model, files, resume, baselines, refusals."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from moeguard.cli import main
from moeguard.data import load_task
from moeguard.errors import InputError, PlanError
from moeguard.models import GroupRouting, load_moe
from moeguard.pruning import sweep as sweep_module
from moeguard.pruning.figures import knowledge_loss_figure
from moeguard.pruning.plans import LayerLimits
from moeguard.pruning.sweep import SweepPoint, default_keeps, evaluate_point, load_sweep, rows_to_csv, run_sweep, text_of_tasks

TARGET, OTHER = "reverse", "sort"  # both learned by the tiny model
SETTINGS = dict(criteria=["frequency", "reap"], keeps=[4], other_tasks=[OTHER], limit=24, attribution_limit=96,
                random_seeds=(0, 1, 2, 3), progress=False)


@pytest.fixture(scope="module")
def tiny(trained_tiny):
    return load_moe(trained_tiny)


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / TARGET
    weights = {name: (p.data_ptr(), p._version) for name, p in tiny.model.named_parameters()}
    fingerprint = tiny.fingerprint()
    result = run_sweep(tiny, TARGET, out_dir=out, **SETTINGS)
    assert tiny.fingerprint() == fingerprint
    assert weights == {name: (p.data_ptr(), p._version) for name, p in tiny.model.named_parameters()}
    # The table and the figure are drawn from the result, at the edge (as `moeguard sweep` does).
    (out / "sweep.csv").write_text(rows_to_csv(result.rows()))
    knowledge_loss_figure(result, out / "knowledge_loss.png")
    return result


def test_keeping_the_top_experts_retains_more_of_the_task_than_random_and_least_used(swept):
    """The attacker's best criterion beats random plans (mean of 4 seeds) and the least-used plan.
    Which criterion is best depends on the training run (measured at keep 4: frequency 0.79, reap 0.33,
    random 0.00-0.63, least used 0.04); each criterion beats the least-used plan."""
    assert swept.full.accuracy[TARGET] >= 0.8  # the tiny model has learned the task (>= 0.95 of 200; these are 24)
    retained = {c: swept.mean_retained(c, 4) for c in ("frequency", "reap", "random", "least_used:frequency")}
    top = max(retained["frequency"], retained["reap"])
    assert top > retained["random"] and top > retained["least_used:frequency"], retained
    loss = {c: swept.mean_over_seeds(c, 4, lambda p: p.answer_loss) for c in retained}
    best = min(loss["frequency"], loss["reap"])
    assert swept.full.answer_loss <= best < min(loss["random"], loss["least_used:frequency"]), loss
    assert max(loss["frequency"], loss["reap"]) < loss["least_used:frequency"], loss


def test_a_sweep_point_equals_the_physically_pruned_model(swept, trained_tiny):
    point = next(p for p in swept.points if p.criterion == "frequency" and p.keep == 4)
    pruned = load_moe(trained_tiny)
    pruned.prune({layer: kept for layer, kept in enumerate(point.kept)})
    assert point.answer_loss > swept.full.answer_loss  # a point where pruning changed the model
    datas = [load_task(TARGET, "test", limit=24), load_task(OTHER, "test", limit=24)]
    measured = SweepPoint(criterion="pruned", keep=4, seed=None, fraction_kept=0.0, kept=[], accuracy={}, perplexity=None,
                          seconds=0.0)
    evaluate_point(pruned, measured, datas, text_of_tasks(datas), 32)
    assert measured.accuracy == point.accuracy
    assert measured.answer_loss == pytest.approx(point.answer_loss, rel=1e-5)
    assert measured.perplexity == pytest.approx(point.perplexity, rel=1e-5)


def test_sweep_writes_json_csv_and_the_knowledge_loss_figure(swept):
    out = swept.out_dir
    data = json.loads((out / "sweep.json").read_text())
    assert data["task"] == TARGET and len(data["points"]) == 2 + 4 + 1  # criteria, random seeds, least used
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["criterion"] for r in rows] == ["full", "frequency", "reap", *["random"] * 4, "least_used:frequency"]
    assert {"accuracy_reverse", "accuracy_sort", "target_retained", "others_retained", "target_answer_loss",
            "perplexity"} <= set(rows[0])
    assert (out / "knowledge_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "attribution.json").is_file()
    reloaded = load_sweep(out)
    assert reloaded.points[0].accuracy == swept.points[0].accuracy
    text = swept.describe()
    assert "least_used:frequency" in text and "answer loss" in text


def test_a_rerun_only_evaluates_missing_points_and_other_settings_are_refused(swept, tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept.out_dir, out)
    data = json.loads((out / "sweep.json").read_text())
    data["points"] = data["points"][:3]  # as if interrupted after three of five points
    (out / "sweep.json").write_text(json.dumps(data))
    resumed = run_sweep(tiny, TARGET, out_dir=out, **SETTINGS)
    assert resumed.evaluated == [p.key for p in swept.points[3:]]
    assert [p.accuracy for p in resumed.points] == [p.accuracy for p in swept.points]
    with pytest.raises(InputError, match=r"started with other settings: limit=24 \(now 10\)"):
        run_sweep(tiny, TARGET, out_dir=out, **{**SETTINGS, "limit": 10})


def test_impossible_plans_are_refused_before_anything_is_evaluated(tiny, monkeypatch):
    monkeypatch.setattr(sweep_module, "evaluate_point", lambda *a: pytest.fail("evaluated before checking plans"))
    with pytest.raises(PlanError, match="top_k=2"):
        run_sweep(tiny, TARGET, **{**SETTINGS, "keeps": [4, 1]})


def test_default_keep_counts_follow_the_expert_count_and_the_routing_limits():
    assert default_keeps([LayerLimits(0, 8, 2), LayerLimits(1, 8, 2)]) == [8, 6, 4, 3, 2]
    assert default_keeps([LayerLimits(0, 64, 8)]) == [64, 48, 32, 24, 16]
    assert default_keeps([LayerLimits(0, 4, 2)]) == [4, 3, 2]
    # 2 groups scored by their 2 best experts: odd counts and fewer than 2 per group cannot be routed
    grouped = [LayerLimits(0, 8, 2, GroupRouting(num_groups=2, groups_per_token=1))]
    assert default_keeps(grouped) == [8, 6, 4]


def test_sweep_command_reuses_a_given_attribution_and_prints_the_table(swept, trained_tiny, tmp_path, capsys):
    code = main(["-q", "sweep", "--model", str(trained_tiny), "--task", TARGET, "--criteria", "frequency", "--keep", "4",
                 "--attribution", str(swept.out_dir / "attribution.json"), "--other-tasks", "none", "--limit", "8",
                 "--out", str(tmp_path / "sweep")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "knowledge loss on reverse" in printed and "least_used:frequency" in printed and "random" in printed
    assert not (tmp_path / "sweep" / "attribution.json").exists()
    assert (tmp_path / "sweep" / "sweep.csv").is_file()
