"""``moeguard detect`` end to end on model directories."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_moe

from moeguard.cli import main
from moeguard.forensics.derivatives import random_orders, reindex_experts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_detect_command_writes_the_verdict_and_figure_and_prints_the_kept_sets(tmp_path, capsys):
    parent = tiny_moe("qwen3_moe")
    parent.save(tmp_path / "parent")
    suspect = tiny_moe("qwen3_moe")
    orders = random_orders(suspect, [3, 3], seed=1)
    reindex_experts(suspect, orders)
    suspect.model.to(torch.bfloat16)
    suspect.save(tmp_path / "suspect")  # a stock checkpoint: the detector never reads the manifest

    code = main([
        "-q", "detect", "--parent", str(tmp_path / "parent"), "--suspect", str(tmp_path / "suspect"),
        "--out", str(tmp_path / "verdict.json"), "--figure", str(tmp_path / "verdict.png"),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("DERIVED")
    assert f"kept {sorted(orders[0])}" in printed
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["derived"] is True and verdict["suspect"]["dtype"] == "bfloat16"
    assert [layer["kept"] for layer in verdict["layers"]] == [sorted(order) for order in orders]
    assert [[m["parent_expert"] for m in layer["matches"]] for layer in verdict["layers"]] == orders
    assert (tmp_path / "verdict.png").read_bytes()[:4] == b"\x89PNG"


def test_detect_command_says_not_comparable_and_rejects_bad_options(tmp_path, capsys):
    tiny_moe("qwen3_moe").save(tmp_path / "parent")
    tiny_moe("qwen3_moe", hidden=96).save(tmp_path / "wide")
    assert main(["-q", "detect", "--parent", str(tmp_path / "parent"), "--suspect", str(tmp_path / "wide")]) == 0
    assert capsys.readouterr().out.startswith("NOT COMPARABLE")
    code = main(["-q", "detect", "--parent", str(tmp_path / "parent"), "--suspect", str(tmp_path / "wide"), "--alpha", "0"])
    assert code == 2
    assert "alpha must be a probability" in capsys.readouterr().err
