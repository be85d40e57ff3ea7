"""The task-type table: retention on hand-made numbers, the language-modelling reference, metric
declarations in files, and every task type through evaluation, sweep and re-alignment on a small
model trained on tasks of all three types."""

from __future__ import annotations

import math

import pytest

from moeguard.data import Example, TaskData, load_jsonl, load_task, save_jsonl
from moeguard.data.task_types import TASK_TYPES, retention, unigram_entropy, unigram_reference
from moeguard.errors import DataError, InputError
from moeguard.realign.metrics import recovery


def test_accuracy_retention_is_the_share_of_the_full_accuracy_kept():
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.9, 0.9) == 1.0
    assert math.isnan(retention(0.3, 0.0))  # the full model knows nothing: nothing to retain


def test_loss_retention_is_the_share_of_the_full_models_improvement_over_the_reference_kept():
    # unigram reference 2.0 nats, full model 0.5: a pruned model at 1.25 keeps half the improvement
    assert retention(1.25, 0.5, 2.0, higher_is_better=False) == pytest.approx(0.5)
    assert retention(0.5, 0.5, 2.0, higher_is_better=False) == 1.0
    assert retention(2.0, 0.5, 2.0, higher_is_better=False) == 0.0  # knows token frequencies only
    assert retention(2.6, 0.5, 2.0, higher_is_better=False) == pytest.approx(-0.4)  # worse than token frequencies
    assert retention(0.35, 0.5, 2.0, higher_is_better=False) == pytest.approx(1.1)  # better than the full model
    assert math.isnan(retention(1.0, 2.5, 2.0, higher_is_better=False))  # full model no better than the reference
    # 90% of the way means the same on both: a pruned loss of 0.65 is 90% retention of 2.0 -> 0.5
    assert retention(0.65, 0.5, 2.0, higher_is_better=False) == pytest.approx(retention(0.81, 0.9))
    assert recovery(1.0, 1.5, 0.5, higher_is_better=False) == pytest.approx(0.5)  # won back half of the loss rise
    assert math.isnan(recovery(0.4, 0.5, 0.5, higher_is_better=False))


def test_the_unigram_reference_is_the_entropy_of_the_scored_token_frequencies():
    # tokens 1, 1, 2, 3: p = 1/2, 1/4, 1/4
    assert unigram_entropy([1, 1, 2, 3]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert unigram_entropy([7, 7, 7]) == 0.0 and math.isnan(unigram_entropy([]))
    # each text's first token (bos) is never predicted, so it is not scored
    assert unigram_reference([[0, 1, 1], [0, 2, 3]]) == pytest.approx(unigram_entropy([1, 1, 2, 3]))
    assert [t.reference([[0, 1, 2]]) for t in TASK_TYPES.values()] == [0.0, 0.0, pytest.approx(math.log(2))]


def test_a_files_header_declares_its_metric_and_answer_pattern_and_they_round_trip(tmp_path):
    data = TaskData("summaries", "generate", [Example(prompt="key the fox=", answer="fox")], "memory", metric="rouge_l",
                    answer_pattern=r"answer: (.*)")
    path = save_jsonl(data, tmp_path / "summaries.jsonl")
    assert path.read_text().splitlines()[0] == '{"metric": "rouge_l", "answer_pattern": "answer: (.*)"}'
    loaded = load_jsonl(path)
    assert (loaded.metric, loaded.answer_pattern, loaded.examples) == ("rouge_l", r"answer: (.*)", data.examples)
    assert load_jsonl(path, metric="rouge_l").metric == "rouge_l"
    with pytest.raises(InputError, match="line 1 declares metric 'rouge_l', but metric='token_f1' was given"):
        load_jsonl(path, metric="token_f1")
    plain = save_jsonl(TaskData("qa", "generate", data.examples), tmp_path / "qa.jsonl")
    assert load_jsonl(plain).metric is None and load_jsonl(plain, metric="token_f1").metric == "token_f1"
    with pytest.raises(DataError, match="metric 'loss' does not score generate examples"):
        load_jsonl(plain, metric="loss")


def test_built_in_tasks_cover_every_type_and_mixtures_of_kinds_train_but_are_not_scored():
    kinds = {name: load_task(name, limit=1).kind for name in ("topic", "dyck", "keywords")}
    assert kinds == {"topic": "choice", "dyck": "lm", "keywords": "generate"}
    from moeguard.data import mixture
    from moeguard.eval import evaluate

    mixed = mixture([load_task(name, limit=2) for name in kinds])
    assert mixed.kind == "mixed"
    with pytest.raises(InputError, match="mixes examples of several kinds"):
        evaluate(object(), object(), mixed)


def test_classification_attributes_and_trains_on_the_correct_choice_and_text_on_every_token():
    from conftest import tiny_moe
    from moeguard.attribution import collect_attribution
    from moeguard.data import batches, build_char_tokenizer
    from moeguard.data.batching import IGNORE_INDEX

    tokenizer = build_char_tokenizer()
    choice = TaskData("mc", "choice", [Example(prompt="cls fox cat=", choices=("animal", "fruit"), label=0),
                                       Example(prompt="cls fig=", choices=("animal", "fruit"), label=1)])
    batch = next(batches(tokenizer, choice, batch_size=2))
    for row, example in enumerate(choice.examples):
        labelled = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == example.choices[example.label] + "<eos>"
    moe = tiny_moe("qwen3_moe")
    answer = collect_attribution(moe, batches(tokenizer, choice, batch_size=2), tokens="answer", criteria=["frequency"],
                                 progress=False)
    assert answer.token_counts[0] == len("animal<") + len("fruit<")  # each choice's characters and its eos
    text = TaskData("lm", "lm", [Example(text="dyck (())."), Example(text="dyck []().")])
    batch = next(batches(tokenizer, text, batch_size=2))
    assert (batch["labels"] == batch["input_ids"]).all()  # every token of a text is trained on (the first is never predicted)


# ---------------------------------------------------------------- every type through the stages, on a trained model
TYPES = {"topic": "choice", "dyck": "lm", "keywords": "generate"}


@pytest.fixture(scope="module")
def types_model(trained_tiny_types):
    from moeguard.models import load_moe

    return load_moe(trained_tiny_types)


@pytest.mark.slow
@pytest.mark.parametrize("task, acquisition", [("topic", "badge"), ("dyck", "routing"), ("keywords", "entropy")])
def test_every_task_type_sweeps_and_realigns_on_a_trained_model(types_model, task, acquisition, one_thread):
    from moeguard.pruning.sweep import run_sweep
    from moeguard.realign import RealignConfig, builtin_data, realign

    others = [name for name in TYPES if name != task]
    swept = run_sweep(types_model, task, criteria=["frequency"], keeps=[2], other_tasks=others, limit=40,
                      attribution_limit=64, progress=False)
    scored = swept.scoring[task]
    assert scored["kind"] == TYPES[task] and {swept.scoring[o]["kind"] for o in others} == {TYPES[o] for o in others}
    assert swept.metric(task) == {"topic": "choice_accuracy", "dyck": "loss", "keywords": "rouge_l"}[task]
    full, reference = swept.full.accuracy[task], scored["reference"]
    # the full model knows the task (the fixture checked it on the whole test split)
    assert (full >= 0.8) if scored["higher_is_better"] else (full < 0.5 * reference)
    # pruned to its 2 least used experts of 8, the model loses most of the task; retention is measured in the
    # task's own metric from its no-knowledge reference (0, or the unigram loss of the text)
    damaged = next(p for p in swept.points if p.criterion.startswith("least_used"))
    assert swept.retained(damaged) == pytest.approx((damaged.accuracy[task] - reference) / (full - reference))
    assert swept.retained(damaged) < 0.7
    # re-aligning that plan on the task (an lm task trains on its texts) wins back a good part of the loss
    data = builtin_data(task, pool_size=64, test_size=40, other_size=16, other_tasks=others)
    settings = RealignConfig(budget=32, rounds=2, steps_per_round=20, lr=3e-3, acquisition=acquisition, eval_batch_size=40)
    result = realign(types_model, data, settings, keep=dict(enumerate(damaged.kept)), progress=False)
    assert (result.metric, result.reference_score) == (swept.metric(task), pytest.approx(reference))
    assert result.unpruned_accuracy == pytest.approx(full, rel=1e-4)
    assert result.pruned_accuracy == pytest.approx(damaged.accuracy[task], rel=1e-4)
    for record in result.rounds:
        assert record.retention == pytest.approx(retention(record.accuracy, full, reference,
                                                           higher_is_better=scored["higher_is_better"]), rel=1e-4)
    assert result.final.recovery >= 0.25, result.describe()
    assert result.final.retention >= result.rounds[0].retention + 0.2, result.describe()


@pytest.mark.slow
def test_the_audit_attacks_every_task_type_and_its_report_shows_each_in_its_metric(trained_tiny_types, tmp_path, one_thread):
    from moeguard.audit import run_audit
    from test_audit import quick_config, render_in_chromium

    from moeguard.attack import HeadStartSettings

    headstart = HeadStartSettings(
        selections=("attribution",), carve_lrs=(3e-3,), scratch_lrs=(3e-3,), losses=("answers",),
        try_router_reinit=False, try_canonicalise=False, carve_steps=10, scratch_steps=10, student_batch=8,
        warmup_steps=2, evaluate_every=5, tuning_seeds=(), report_seeds=(0,), curve_test_size=16, selection_examples=8,
        resamples=50,
    )
    report = run_audit(quick_config(trained_tiny_types, tmp_path / "audit", tasks=list(TYPES), keeps=[4, 2],
                                    headstart=True, headstart_attack=headstart), progress=False)
    rows = {row["task"]: row for row in report.headline()}
    # the head start needs the full model's answers: measured on every task that has them, skipped on plain text
    assert report.model.tasks["dyck"].headstart is None and rows["dyck"]["head_start"] is None
    for name in ("topic", "keywords"):
        task = report.model.tasks[name]
        attacked = task.cost is not None or task.realign_runs or task.keep_without not in (None, 8)
        assert bool(task.headstart) == bool(attacked)
    assert any(report.model.tasks[name].headstart for name in ("topic", "keywords"))
    assert {name: row["kind"] for name, row in rows.items()} == TYPES
    assert rows["dyck"]["metric"] == "loss" and rows["dyck"]["full_accuracy"] < rows["dyck"]["reference"]
    assert rows["keywords"]["metric"] == "rouge_l" and rows["topic"]["metric"] == "choice_accuracy"
    for name, task in report.model.tasks.items():
        assert task.skipped is None and {row["keep"] for row in task.sweep} == {8, 4, 2}
        assert all(run.budget == 12 for run in task.realign_runs)
    text = report.describe()
    assert "dyck" in text and "loss in nats per token" in text and "rouge_l" in text
    page = (tmp_path / "audit" / "report.html").read_text()
    assert "unigram" in page and "choice_accuracy" in page
    # last, as it skips where Chromium is not installed: the page renders every task's row and figure
    values, _ = render_in_chromium(tmp_path / "audit" / "report.html", tmp_path)
    assert int(values["summary_rows"]) == 1 + len(TYPES) and values["broken"] == "0" and int(values["width"]) <= 1280


@pytest.mark.slow
@pytest.mark.parametrize("target", ["topic", "dyck"])
def test_the_defense_evaluation_attacks_a_classification_task_and_says_why_it_skips_a_language_modelling_one(
        trained_tiny_types, target, tmp_path, one_thread):
    from moeguard.attack import HeadStartSettings
    from moeguard.defense.evaluation import DefenseEvalSettings, evaluate_defenses
    from moeguard.defense.report import markdown_tables, write_report
    from moeguard.realign import RealignConfig

    headstart = HeadStartSettings(
        selections=("attribution",), carve_lrs=(3e-3,), scratch_lrs=(3e-3,), losses=("answers",),
        try_router_reinit=False, carve_steps=10, scratch_steps=10, student_batch=8, warmup_steps=2, evaluate_every=5,
        tuning_seeds=(), report_seeds=(0,), curve_test_size=16, selection_examples=8, resamples=50,
    )
    settings = DefenseEvalSettings(
        target_tasks=(target,), tasks=tuple(TYPES), keeps=(4, 2), attack_keeps=(2,), criteria=("frequency",),
        headstart=headstart, label_regime=False, attack=RealignConfig(budget=32, rounds=2, steps_per_round=10, batch_size=16),
        pool_size=64, test_size=24, attribution_samples=32,
        authorised_steps=3, authorised_examples=64,
    )
    result = evaluate_defenses({"undefended": trained_tiny_types, "same": trained_tiny_types}, settings, tmp_path,
                               progress=False)
    write_report(result, tmp_path)
    base, same = result.models
    assert base.scoring[target]["kind"] == TYPES[target] and base.scoring["dyck"]["metric"] == "loss"
    assert base.utility == same.utility and result.utility_loss(same) == 0.0
    key = f"{target}/keep2"
    if target == "dyck":  # a text is its own label: there is no teacher answer for either arm
        assert key not in base.headstart and "lm task" in base.skipped[key] and "skipped" in markdown_tables(result)
    else:  # classification is carved and trained from scratch on the full model's picked choices
        assert base.headstart[key].carve.curves and base.headstart[key].scratch.curves and not base.skipped
