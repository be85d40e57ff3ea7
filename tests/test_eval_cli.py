"""``moeguard evaluate``: per-task tables and JSON with the same numbers as the Python API."""

from __future__ import annotations

import json
import math

import pytest

from moeguard.cli import main
from moeguard.data import BUILTIN_TASKS, Example, TaskData, load_task, save_jsonl
from moeguard.eval import evaluate
from moeguard.models import load_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluate_prints_a_table_and_json_with_the_api_numbers(trained_tiny, capsys):
    assert main(["evaluate", "--model", str(trained_tiny), "--task", "upper,sort", "--limit", "30", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "value", "95%", "CI", "n", "seconds"]
    assert [line.split()[0] for line in table[1:]] == ["upper", "sort"]

    assert main(["evaluate", "--model", str(trained_tiny), "--task", "all", "--limit", "20", "--json", "--per-example"]) == 0
    report = json.loads(capsys.readouterr().out)
    moe = load_moe(trained_tiny)
    assert list(report["results"]) == list(BUILTIN_TASKS)
    assert {r["kind"] for r in report["results"].values()} == {"generate", "choice", "lm"}
    assert report["results"]["dyck"]["metric"] == "loss" and report["results"]["keywords"]["metric"] == "rouge_l"
    assert report["fingerprint"] == moe.fingerprint()
    expected = evaluate(moe, None, load_task("sort", limit=20))
    assert report["results"]["sort"]["value"] == expected.value
    assert report["results"]["sort"]["predictions"] == expected.predictions


def test_evaluate_reads_jsonl_and_datasets_sources(trained_tiny, tmp_path, capsys):
    path = save_jsonl(TaskData("texts", "lm", [Example(text="up abc=ABC"), Example(text="rot abc=def")]), tmp_path / "texts.jsonl")
    assert main(["evaluate", "--model", str(trained_tiny), "--data", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]["texts"]
    assert result["metric"] == "loss" and result["n"] == 2 and result["perplexity"] == pytest.approx(math.exp(result["value"]))
    assert result["reference"] > 0 and not result["higher_is_better"]

    (tmp_path / "qa.csv").write_text("question,solution\nup abc=,ABC\nup xyz=,XYZ\n")
    assert main(["evaluate", "--model", str(trained_tiny), "--hf-dataset", str(tmp_path / "qa.csv"), "--prompt-field",
                 "question", "--answer-field", "solution", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]["qa"]
    assert (result["metric"], result["n"], result["value"]) == ("exact_match", 2, 1.0)
    assert main(["evaluate", "--model", str(trained_tiny), "--hf-dataset", str(tmp_path / "qa.csv"), "--prompt-field",
                 "question", "--answer-field", "solution", "--metric", "token_f1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["qa"]["metric"] == "token_f1"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--task", "upper,nope"], "unknown built-in task 'nope'"),
        (["--data", "missing.jsonl"], "data file missing.jsonl does not exist"),
        (["--task", "upper", "--metric", "rouge_l"], "--metric and --answer-pattern score the answers of --data or --hf-dataset"),
        (["--hf-dataset", "nobody/no-such-dataset"], "cannot load dataset 'nobody/no-such-dataset'"),
        (["--task", "upper", "--limit", "0"], "--limit must be a positive integer, got 0"),
    ],
)
def test_bad_evaluate_arguments_are_reported_without_a_traceback(trained_tiny, capsys, arguments, message):
    assert main(["evaluate", "--model", str(trained_tiny), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
