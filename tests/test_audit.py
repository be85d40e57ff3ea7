"""The audit: its numbers are the stage results', it resumes, it refuses bad input early, its page renders."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moeguard.audit import AuditConfig, load_report, run_audit
from moeguard.audit.headline import BestPlan, best_plans, pruned_parameter_counts, realign_candidates, smallest_retaining
from moeguard.audit.run import expert_indexed_parameters
from moeguard.cli import main
from moeguard.errors import InputError
from moeguard.models import load_moe
from moeguard.pruning.sweep import SweepPoint, SweepResult, load_sweep
from moeguard.realign import RealignConfig, RealignResult

from conftest import tiny_moe

TASKS = ["reverse", "upper"]


def quick_config(model: Path, out: Path, **overrides) -> AuditConfig:
    settings = dict(model=str(model), tasks=TASKS, out=str(out), test_size=24, other_size=8, pool_size=48,
                    attribution_examples=32, realign=RealignConfig(budget=12, rounds=2, steps_per_round=8))
    settings.update(overrides)
    return AuditConfig.quick_preset(**settings)


@pytest.fixture(scope="module")
def audited(trained_tiny, tmp_path_factory):
    from moeguard.zoo.demo import intra_op_threads

    out = tmp_path_factory.mktemp("audit")
    with intra_op_threads(1):
        report = run_audit(quick_config(trained_tiny, out), progress=False)
    return report, out


# ---------------------------------------------------------------- pure functions
def _sweep(points: list[tuple[str, int, float]]) -> SweepResult:
    full = SweepPoint(criterion="full", keep=8, seed=None, fraction_kept=1.0, kept=[list(range(8))] * 2,
                      accuracy={"t": 0.8}, perplexity=None, seconds=0.0)
    made = [SweepPoint(criterion=c, keep=k, seed=None, fraction_kept=k / 8, kept=[list(range(k))] * 2,
                       accuracy={"t": 0.8 * r}, perplexity=None, seconds=0.0) for c, k, r in points]
    return SweepResult(task="t", model=None, model_fingerprint="f", num_experts=[8, 8], full=full, points=made)


def test_the_best_plan_per_keep_count_ignores_the_baselines():
    sweep = _sweep([("frequency", 6, 1.0), ("reap", 6, 0.95), ("random", 6, 1.0), ("frequency", 4, 0.5),
                    ("reap", 4, 0.7), ("least_used:frequency", 4, 1.0), ("frequency", 2, 0.0), ("reap", 2, 0.1)])
    plans = best_plans(sweep)
    assert [(p.keep, p.criterion) for p in plans] == [(6, "frequency"), (4, "reap"), (2, "reap")]
    assert plans[1].retained == pytest.approx(0.7)


def test_pruning_alone_is_judged_by_the_smallest_plan_that_keeps_the_target_and_realignment_starts_below_it():
    plans = [BestPlan(keep=k, criterion=c, fraction_kept=f, retained=r, kept=[])
             for k, c, f, r in [(6, "frequency", 0.75, 1.0), (4, "reap", 0.5, 0.92), (3, "reap", 0.375, 0.5), (2, "reap", 0.25, 0.1)]]
    assert smallest_retaining(plans, 0.9).keep == 4
    assert [p.keep for p in realign_candidates(plans, 0.9)] == [3, 2]
    assert smallest_retaining(plans, 1.01) is None
    assert [p.keep for p in realign_candidates(plans, 1.01)] == [6, 4, 3, 2]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_compressed_size_equals_the_parameter_count_of_the_physically_pruned_model(family):
    moe = tiny_moe(family)
    keep = 4
    full = moe.parameter_counts()
    predicted = pruned_parameter_counts(full, expert_indexed_parameters(moe), moe.num_experts, moe.top_k, [keep] * moe.num_layers)
    moe.prune({layer: [0, 1, 4, 5] for layer in range(moe.num_layers)})  # two per group for the grouped router
    actual = moe.parameter_counts()
    assert (predicted.total, predicted.active_per_token) == (actual.total, actual.active_per_token)


def test_the_default_attacker_adds_ablation_where_it_is_affordable_and_routable():
    from moeguard.audit.run import attack_criteria

    assert attack_criteria(AuditConfig(), tiny_moe("qwen3_moe")) == ("frequency", "reap", "ablation")
    assert attack_criteria(AuditConfig(), tiny_moe("deepseek_v3")) == ("frequency", "reap")  # group-limited router
    assert attack_criteria(AuditConfig(), tiny_moe("mixtral", layers=40)) == ("frequency", "reap")  # 320 experts
    assert attack_criteria(AuditConfig(criteria=("ean",)), tiny_moe("qwen3_moe")) == ("ean",)


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_the_report_numbers_are_the_stage_results(audited, trained_tiny):
    report, out = audited
    saved = load_report(out)
    assert saved["headline"] == json.loads(json.dumps(report.headline()))
    assert saved["model"]["fingerprint"] == load_moe(trained_tiny).fingerprint()
    assert set(saved["versions"]) >= {"moeguard", "torch", "transformers", "python"}
    cache = out / ".cache" / saved["model"]["fingerprint"][:16]
    evaluated = json.loads(next(cache.glob("evaluate-*.json")).read_text())["result"]
    for row in saved["headline"]:
        task = saved["model"]["tasks"][row["task"]]
        assert row["full_accuracy"] == evaluated[row["task"]]["value"]
        sweep = next(load_sweep(d) for d in cache.glob("sweep-*") if load_sweep(d).task == row["task"])
        # Pruning alone: the smallest share of experts at which some real criterion keeps 90% of the task.
        passing = [p.fraction_kept for p in sweep.points
                   if p.criterion in ("frequency",) and sweep.retained(p) >= 0.9]
        assert row["fraction_without"] == pytest.approx(min(passing) if passing else 1.0)
        assert task["sweep"] == json.loads(json.dumps(sweep.rows()))
        for run in task["realign_runs"]:
            history = RealignResult.from_dict(json.loads(Path(run["history"]).read_text()))
            assert run["labels"] == history.threshold.labels
            assert run["final_retention"] == history.final.retention
            assert run["kept"] == history.kept
        if row["labels"] is not None:
            assert row["fraction_with"] < row["fraction_without"]
            cheapest = min((r for r in task["realign_runs"] if r["labels"] is not None), key=lambda r: (r["fraction_kept"], r["labels"]))
            assert (row["keep_with"], row["labels"]) == (cheapest["keep"], cheapest["labels"])
        else:
            assert row["fraction_with"] == row["fraction_without"]
    for name in ("report.html", "figures/headline.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_a_rerun_recomputes_nothing(audited, trained_tiny):
    report, out = audited
    again = run_audit(quick_config(trained_tiny, out), progress=False)
    assert again.headline() == report.headline()
    assert {"evaluate", "attribution", "sweep"} <= set(again.model.work)
    assert all(work["computed"] == 0 and work["reused"] > 0 for work in again.model.work.values()), again.model.work


@pytest.mark.slow
def test_an_interrupted_audit_resumes_where_it_stopped(trained_tiny, tmp_path, monkeypatch, one_thread):
    import moeguard.pruning.sweep as sweep_module

    real = sweep_module.evaluate_point
    calls = {"n": 0}

    def interrupted_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    config = quick_config(trained_tiny, tmp_path, tasks=["upper"])
    monkeypatch.setattr(sweep_module, "evaluate_point", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_audit(config, progress=False)
    assert not (tmp_path / "report.json").exists()

    monkeypatch.undo()
    report = run_audit(config, progress=False)
    assert report.model.work["attribution"] == {"reused": 1, "computed": 0}
    sweep = load_sweep(next((tmp_path / ".cache").glob("*/sweep-*")))
    evaluated = 1 + sum(1 for p in sweep.points if p.keep < 8)  # the full model and every point that masks something
    assert report.model.work["sweep"]["computed"] == evaluated - 3
    assert report.model.tasks["upper"].sweep == sweep.rows()


@pytest.mark.slow
def test_an_identical_copy_as_the_defended_model_costs_the_attacker_exactly_as_much(audited, trained_tiny, tmp_path):
    _, first = audited
    out = tmp_path / "audit"
    shutil.copytree(first, out)  # the same stage cache: both models have the same weights fingerprint
    copy_dir = tmp_path / "copy"
    shutil.copytree(trained_tiny, copy_dir)
    compared = run_audit(quick_config(trained_tiny, out, compare=str(copy_dir)), progress=False)
    for name, comparison in compared.defense.items():
        assert comparison.utility_cost == 0.0
        assert comparison.fraction_with[0] == comparison.fraction_with[1]
        if comparison.undefended_labels:
            assert comparison.cost_multiplier == 1.0 and not comparison.censored
    saved = load_report(out)
    assert saved["compare"]["fingerprint"] == saved["model"]["fingerprint"]
    assert "defense" in saved["figures"]
    assert "id='defense'" in (out / "report.html").read_text()
    if shutil.which("chromium") or shutil.which("chromium-browser"):  # the wider page still fits the window
        values, _ = render_in_chromium(out / "report.html", tmp_path)
        assert values["broken"] == "0" and int(values["width"]) <= 1280


@pytest.mark.slow
def test_the_audit_measures_the_head_start_at_the_attackers_keep_count(trained_tiny, tmp_path, one_thread):
    from moeguard.attack import HeadStartSettings

    small = HeadStartSettings(
        selections=("attribution",), carve_lrs=(3e-3,), scratch_lrs=(3e-3,), losses=("logits",), try_router_reinit=False,
        try_canonicalise=False, carve_steps=20, scratch_steps=30, scratch_compute_multiple=1.0, student_batch=16,
        evaluate_every=10, tuning_seeds=(), report_seeds=(0,), curve_test_size=24, selection_examples=16, resamples=100,
    )
    config = quick_config(trained_tiny, tmp_path, tasks=["upper"], keeps=[4, 2], headstart=True, headstart_attack=small)
    report = run_audit(config, progress=False)
    task = report.model.tasks["upper"]
    # The attacker's smallest carve, or (its label budget too small) the largest keep count it tried to re-align.
    tried = max(run.keep for run in task.realign_runs) if task.realign_runs else None
    assert task.headstart["keep"] == (task.cost.keep if task.cost else task.keep_without if task.keep_without not in (None, 8) else tried)
    assert task.headstart["target"] == pytest.approx(0.9 * task.headstart["full_accuracy"])
    row = report.headline()[0]
    assert row["head_start"] == task.headstart["describe"]
    assert {"flops", "tokens"} <= set(task.headstart["head_start"])
    h = task.headstart["head_start"]["flops"]
    if task.headstart["stopped_by_compute"]:  # the scratch arm stopped at the carve's compute: H >= 1, marked
        assert h["bound"] == "lower" and float(h["value"]) >= 1.0
        assert row["head_start"].startswith(">= ") and row["head_start"].endswith("(cap 1x)")
        assert "1x the carve's compute" in task.headstart["bound_note"]
    else:
        assert "(cap" not in row["head_start"]
    assert (tmp_path / report.figures["headstart"]).stat().st_size > 0
    assert "Head start: what the stolen weights save" in (tmp_path / "report.html").read_text()
    again = run_audit(config, progress=False)
    assert again.model.work["headstart"] == {"reused": 1, "computed": 0}
    assert again.model.tasks["upper"].headstart["describe"] == task.headstart["describe"]


@pytest.mark.slow
def test_user_data_files_are_audited_like_builtin_tasks(trained_tiny, tmp_path, one_thread):
    from moeguard.data import load_task, save_jsonl

    upper = save_jsonl(load_task("upper", "pool", limit=80), tmp_path / "shouting.jsonl")
    # Keep 6 of 8 gives the attacker a carve on any training run (how far below it upper can be carved varies).
    report = run_audit(quick_config(trained_tiny, tmp_path / "audit", tasks=None, data=[str(upper)], keeps=[6, 4, 2],
                                    forensics=True), progress=False)
    task = report.model.tasks["shouting"]
    assert task.source == str(upper) and task.test_examples == 16  # 20% of 80 held out
    assert task.full_accuracy > 0.9 and task.skipped is None
    assert {row["keep"] for row in task.sweep} == {8, 6, 4, 2}
    # The owner recognises the carved model and traces every kept expert (pruned, shuffled copy).
    assert task.forensics["derived"] and task.forensics["layers_recovered"] == task.forensics["layers"] == 2
    assert task.forensics["recovered"] == task.forensics["kept"]
    assert "id='forensics'" in (tmp_path / "audit" / "report.html").read_text()


def test_a_model_that_knows_no_task_is_reported_as_such_for_any_family(tmp_path):
    from moeguard.data import build_char_tokenizer
    from moeguard.models.random_init import random_moe

    tokenizer = build_char_tokenizer()
    moe = random_moe("mixtral", vocab=len(tokenizer))
    moe.tokenizer = tokenizer
    path = moe.save(tmp_path / "random-mixtral")
    report = run_audit(AuditConfig.quick_preset(model=str(path), tasks=["upper"], out=str(tmp_path / "audit"), test_size=8),
                       progress=False)
    assert report.model.model_type == "mixtral"
    assert "no task knowledge" in report.model.tasks["upper"].skipped
    assert "skipped" in (tmp_path / "audit" / "report.html").read_text()


# ---------------------------------------------------------------- bad input, refused before any work
@pytest.fixture
def no_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("moeguard.models.loading.load_moe", forbidden)
    monkeypatch.setattr("moeguard.zoo.cache.demo_model_path", forbidden)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "reverse,nosuchtask"], "unknown built-in task 'nosuchtask'; valid tasks: addition"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: model path /nonexistent/model does not exist"),
        (["--budget", "2"], "--budget 2 is too small"),
        (["--budget", "100000"], "budget (100000) is larger than the pool"),
        (["--data", "/nonexistent.jsonl"], "no such file"),
        (["--acquisition", "psychic"], "unknown acquisition function 'psychic'"),
        (["--compare", "/nonexistent/defended"], "--compare /nonexistent/defended: model path /nonexistent/defended does not exist"),
    ],
)
def test_bad_arguments_are_refused_before_any_long_work(argv, message, tmp_path, capsys, no_model_loading):
    code = main(["-q", "audit", "--out", str(tmp_path / "audit"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_directory_without_a_model_is_refused(tmp_path, no_model_loading):
    with pytest.raises(InputError, match="has no config.json"):
        run_audit(AuditConfig(model=str(tmp_path), out=str(tmp_path / "out")))


# ---------------------------------------------------------------- the page, in a real browser
CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const rows = document.querySelectorAll('#summary tr').length;
  const mark = document.createElement('div');
  mark.id = 'render-check';
  mark.textContent = `images=${images.length} broken=${broken} summary_rows=${rows} width=${document.body.scrollWidth}`;
  document.body.appendChild(mark);
});
</script>
"""


def render_in_chromium(report_html: Path, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """What headless Chromium saw of the page (image counts, summary rows, page width) and a screenshot."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    page = tmp_path / "checked.html"
    page.write_text(report_html.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    mark = dom.split('id="render-check">', 1)[1].split("<", 1)[0]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    return dict(part.split("=") for part in mark.split()), shot


def test_the_report_renders_in_headless_chromium(audited, tmp_path):
    report, out = audited
    values, shot = render_in_chromium(out / "report.html", tmp_path)
    expected_images = 1 + sum(len(t.figures) for t in report.model.tasks.values())
    assert int(values["images"]) == expected_images and values["broken"] == "0"
    assert int(values["summary_rows"]) == 1 + len(TASKS)
    assert int(values["width"]) <= 1280  # nothing forces horizontal scrolling
    from PIL import Image

    pixels = torch.tensor(list(Image.open(shot).convert("L").getdata()), dtype=torch.float32)
    assert pixels.std() > 10  # not a blank page
    assert not math.isnan(float(pixels.mean()))


# ---------------------------------------------------------------- the defense comparison, on hand-made audits
def _task(name, *, keep_without, cost=None, runs=(), accuracy=1.0):
    from moeguard.audit.results import TaskAudit

    fraction = (keep_without or 8) / 8
    audit = TaskAudit(task=name, source="hand-made", full_accuracy=accuracy, test_examples=100, keep_without=keep_without,
                      fraction_without=fraction, fraction_with=(cost.keep / 8) if cost else fraction, cost=cost,
                      realign_runs=list(runs))
    audit.keep_with = cost.keep if cost else keep_without
    return audit


def _run(keep, labels, *, acquisition="entropy", budget=64):
    from moeguard.audit.results import RealignRun

    return RealignRun(keep=keep, criterion="reap", acquisition=acquisition, fraction_kept=keep / 8, kept=[], budget=budget,
                      pruned_retention=0.1, final_retention=0.95 if labels else 0.5, reached=labels is not None,
                      labels=labels, steps=None if labels is None else 2 * labels, tokens=None, seconds=None, curve=[],
                      history="history.json")


def _model(tasks):
    from moeguard.audit.results import ModelAudit

    return ModelAudit(role="model", source="m", fingerprint="f", model_type="qwen3_moe", num_experts=[8] * 4,
                      top_k=[2] * 4, parameters={"total": 1, "active_per_token": 1}, criteria=["frequency"],
                      tasks={t.task: t for t in tasks})


def test_the_cost_multiplier_compares_labels_at_the_undefended_attacks_keep_count():
    from moeguard.audit.run import compare_models

    plain = _model([
        _task("realigned", keep_without=4, cost=_run(2, 16)),
        _task("free", keep_without=2),
        _task("resisted", keep_without=2),
        _task("unreached", keep_without=6, cost=_run(3, 32)),
        _task("unbroken", keep_without=None),
    ])
    guarded = _model([
        _task("realigned", keep_without=8, runs=[_run(2, 48)], accuracy=0.9),
        _task("free", keep_without=8, runs=[_run(2, 32)]),
        _task("resisted", keep_without=2),
        _task("unreached", keep_without=8, runs=[_run(3, None)]),
        _task("unbroken", keep_without=None),
    ])
    found = compare_models(plain, guarded)
    assert (found["realigned"].cost_multiplier, found["realigned"].censored) == (3.0, False)
    assert found["realigned"].utility_cost == pytest.approx(0.1)
    assert math.isinf(found["free"].cost_multiplier) and found["free"].describe_multiplier() == "inf"
    assert (found["resisted"].defended_labels, found["resisted"].cost_multiplier) == (0, 1.0)
    assert found["unreached"].censored and found["unreached"].cost_multiplier == 2.0
    assert found["unreached"].describe_multiplier() == ">=2.00x"
    assert found["unbroken"].cost_multiplier is None and "nothing to compare" in found["unbroken"].note
    assert json.loads(json.dumps(found["free"].to_dict()))["cost_multiplier"] == "inf"


def test_the_forensics_stage_traces_the_carved_model_without_copying_the_audited_one(tmp_path):
    from moeguard.audit.run import ModelAuditor
    from moeguard.audit.tasks import AuditTask
    from moeguard.data import load_task

    moe = tiny_moe("qwen3_moe")
    before = moe.fingerprint()
    task = AuditTask("upper", load_task("upper", "pool", limit=2), load_task("upper", "test", limit=2), "built-in task upper")
    auditor = ModelAuditor(moe, "model", AuditConfig(out=str(tmp_path)), tmp_path, progress=False)
    result = auditor.forensics(task, [[0, 3, 5], [1, 2, 7]])
    assert result["derived"] and result["layers_recovered"] == result["layers"] == 2
    assert result["recovered"] == result["kept"] == [[0, 3, 5], [1, 2, 7]]
    assert moe.fingerprint() == before and auditor.cache.work()["forensics"] == {"reused": 0, "computed": 1}
