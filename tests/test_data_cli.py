"""``moeguard data``: listing the built-in tasks and exporting them in the JSONL contract."""

from __future__ import annotations

import json

from moeguard.cli import main
from moeguard.data import BUILTIN_TASKS, load_jsonl, load_task


def test_data_list_names_every_task_with_an_example(capsys):
    assert main(["data", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["task"] for row in listed["tasks"]] == list(BUILTIN_TASKS)
    assert listed["split_sizes"] == {"train": 20_000, "pool": 2_000, "test": 200}
    assert main(["data", "list"]) == 0
    assert "add 135+733=0868" in capsys.readouterr().out


def test_data_export_writes_the_split_in_the_contract(tmp_path, capsys):
    out = tmp_path / "pool.jsonl"
    assert main(["data", "export", "--task", "sort", "--split", "pool", "--limit", "25", "--seed", "2", "--out", str(out)]) == 0
    assert "wrote 25 generate examples of sort (pool)" in capsys.readouterr().out
    assert load_jsonl(out).examples == load_task("sort", "pool", limit=25, seed=2).examples
    assert json.loads(out.read_text().splitlines()[0]).keys() == {"prompt", "answer"}


def test_data_export_of_an_unknown_task_lists_the_valid_ones(tmp_path, capsys):
    assert main(["data", "export", "--task", "sorting", "--out", str(tmp_path / "x.jsonl")]) == 2
    error = capsys.readouterr().err
    assert "unknown built-in task 'sorting'; valid tasks: addition, reverse, sort, caesar, upper, count" in error
    assert "Traceback" not in error and not (tmp_path / "x.jsonl").exists()
