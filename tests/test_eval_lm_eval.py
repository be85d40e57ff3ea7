"""The lm-evaluation-harness bridge: a local harness task scores a moeguard model like moeguard does."""

from __future__ import annotations

import builtins

import pytest

from moeguard.cli import main
from moeguard.data import Example, TaskData, save_jsonl
from moeguard.errors import InputError
from moeguard.eval import evaluate
from moeguard.eval.lm_eval_bridge import run_lm_eval
from moeguard.models import load_moe

pytest.importorskip("lm_eval", reason="the optional lm-eval extra is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

CHOICES = TaskData("caps", "choice", [
    Example(prompt="up abc=", choices=("ABC", "ABD", "XYZ"), label=0),
    Example(prompt="rot abc=", choices=("abc", "def"), label=1),
    Example(prompt="up qq=", choices=("QQ", "QA"), label=1),   # labelled wrong on purpose
    Example(prompt="sort 312=", choices=("321", "123"), label=1),
])


def harness_task(tmp_path) -> str:
    data = save_jsonl(CHOICES, tmp_path / "caps.jsonl")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "caps.yaml").write_text(
        "task: moeguard_caps\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(tmp_path / "tasks")


@pytest.mark.slow
def test_a_local_harness_task_gives_the_same_accuracy_as_moeguard_also_on_a_masked_model(trained_tiny, tmp_path):
    include = harness_task(tmp_path)
    moe = load_moe(trained_tiny)
    ours = evaluate(moe, None, CHOICES)
    assert ours.correct == [True, True, False, True]
    from_directory = run_lm_eval(trained_tiny, ["moeguard_caps"], include_path=include)
    from_moe = run_lm_eval(moe, ["moeguard_caps"], include_path=include)
    assert from_directory["moeguard_caps"]["acc,none"] == pytest.approx(ours.value)
    assert from_moe["moeguard_caps"]["acc,none"] == pytest.approx(ours.value)
    # a sweep point: the harness scores the model with all but 2 experts per layer masked, as moeguard does
    for keep in ({0: [0, 1], 1: [0, 1]}, {0: [6, 7], 1: [6, 7]}):
        with moe.mask_experts(keep):
            masked = evaluate(moe, None, CHOICES)
            harness = run_lm_eval(moe, ["moeguard_caps"], include_path=include)
        assert harness["moeguard_caps"]["acc,none"] == pytest.approx(masked.value)


def test_unknown_harness_tasks_and_a_missing_harness_are_explained(trained_tiny, tmp_path, monkeypatch):
    include = harness_task(tmp_path)
    from lm_eval.tasks import TaskManager

    local_only = TaskManager(include_path=include, include_defaults=False)  # the harness's full index takes a minute
    monkeypatch.setattr("moeguard.eval.lm_eval_bridge.task_manager", lambda *args: local_only)
    with pytest.raises(InputError, match=r"lm-eval does not know the task\(s\) \['no_such_task'\]"):
        run_lm_eval(trained_tiny, ["no_such_task"], include_path=include)
    real_import = builtins.__import__

    def without_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_lm_eval)
    with pytest.raises(InputError, match=r"pip install 'moeguard\[lm-eval\]'"):
        run_lm_eval(trained_tiny, ["moeguard_caps"])


@pytest.mark.slow
def test_the_evaluate_command_runs_harness_tasks(trained_tiny, tmp_path, capsys):
    include = harness_task(tmp_path)
    assert main(["evaluate", "--model", str(trained_tiny), "--lm-eval", "moeguard_caps", "--lm-eval-include", include, "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["lm_eval"]["moeguard_caps"]["acc,none"] == pytest.approx(0.75)


def test_a_harness_task_becomes_an_audit_task_with_the_harness_prompts_and_choices(tmp_path, monkeypatch):
    from moeguard.audit import AuditConfig
    from moeguard.audit.run import audit_tasks
    from moeguard.eval.lm_eval_bridge import lm_eval_task

    include = harness_task(tmp_path)
    data = lm_eval_task("moeguard_caps", include_path=include)
    assert (data.name, data.kind, data.examples, data.source) == ("moeguard_caps", "choice", CHOICES.examples, "lm-eval:moeguard_caps")
    config = AuditConfig(lm_eval_tasks=["moeguard_caps"], lm_eval_include=include, test_fraction=0.25)
    config.realign.budget, config.realign.rounds = 3, 1
    config.realign.seed_size = 3
    [task] = audit_tasks(config)
    assert (task.name, len(task.pool), len(task.test)) == ("moeguard_caps", 3, 1)
    from lm_eval.tasks import TaskManager

    local_only = TaskManager(include_path=include, include_defaults=False)  # the harness's full index takes a minute
    monkeypatch.setattr("moeguard.eval.lm_eval_bridge.task_manager", lambda *args: local_only)
    with pytest.raises(InputError, match="lm-eval does not know the task 'nope'"):
        lm_eval_task("nope", include_path=include)
