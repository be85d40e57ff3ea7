"""``moeguard detect`` end to end on model directories."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_moe

from moeguard.cli import main
from moeguard.forensics.derivatives import carve, evade, random_orders

pytestmark = pytest.mark.usefixtures("one_thread")


def test_detect_command_writes_the_verdict_and_figure_and_prints_the_kept_sets(tmp_path, capsys):
    parent = tiny_moe("qwen3_moe")
    parent.save(tmp_path / "parent")
    orders = random_orders(parent, [3, 3], seed=1)
    suspect = evade(carve(parent, orders).model, ["permute residual", "permute neurons"], seed=2)
    suspect.model.to(torch.bfloat16)
    suspect.save(tmp_path / "suspect")  # a stock checkpoint: the detector never reads the manifest

    code = main([
        "-q", "detect", "--parent", str(tmp_path / "parent"), "--suspect", str(tmp_path / "suspect"),
        "--out", str(tmp_path / "verdict.json"), "--figure", str(tmp_path / "verdict.png"),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("DERIVED")
    assert "relation: carved subset" in printed and "signed permutation by orthogonal Procrustes" in printed
    assert f"kept {sorted(orders[0])}" in printed
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["derived"] is True and verdict["suspect"]["dtype"] == "bfloat16"
    assert [layer["kept"] for layer in verdict["layers"]] == [sorted(order) for order in orders]
    assert [[m["parent_expert"] for m in layer["matches"]] for layer in verdict["layers"]] == orders
    assert (tmp_path / "verdict.png").read_bytes()[:4] == b"\x89PNG"


def test_detect_command_ranks_several_parents(tmp_path, capsys):
    parent = tiny_moe("qwen3_moe")
    parent.save(tmp_path / "parent")
    tiny_moe("qwen3_moe", seed=7).save(tmp_path / "other")
    carve(parent, random_orders(parent, [4, 4], seed=3)).model.save(tmp_path / "suspect")
    code = main(["-q", "detect", "--parent", str(tmp_path / "other"), "--parent", str(tmp_path / "parent"),
                 "--suspect", str(tmp_path / "suspect"), "--out", str(tmp_path / "ranking.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[1].startswith(f"  1. {tmp_path / 'parent'}: derived")
    ranking = json.loads((tmp_path / "ranking.json").read_text())
    assert ranking["best"] == str(tmp_path / "parent")
    assert [v["relation"] for v in ranking["verdicts"]] == ["independent", "carved subset"]


def test_detect_command_calibrates_on_reference_models_and_saves_the_calibration(tmp_path, capsys):
    parent = tiny_moe("qwen3_moe")
    parent.save(tmp_path / "parent")
    for seed in (21, 22, 23):
        tiny_moe("qwen3_moe", seed=seed).save(tmp_path / "references" / f"seed{seed}")
    tiny_moe("qwen3_moe", seed=24).save(tmp_path / "suspect")
    code = main(["-q", "detect", "--parent", str(tmp_path / "parent"), "--suspect", str(tmp_path / "suspect"),
                 "--reference", str(tmp_path / "references"), "--save-calibration", str(tmp_path / "calibration.json")])
    assert code == 0
    assert capsys.readouterr().out.startswith("NOT DERIVED")
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert len(saved["statistics"]) == 3 and saved["references"][0].endswith("seed21")
    code = main(["-q", "detect", "--parent", str(tmp_path / "parent"), "--suspect", str(tmp_path / "suspect"),
                 "--calibration", str(tmp_path / "calibration.json"), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["count"] == 3


def test_detect_command_rejects_bad_options_with_clear_messages(tmp_path, capsys):
    tiny_moe("qwen3_moe").save(tmp_path / "parent")
    args = ["-q", "detect", "--parent", str(tmp_path / "parent"), "--suspect", str(tmp_path / "parent")]
    assert main([*args, "--alpha", "0"]) == 2
    assert "alpha must be a probability" in capsys.readouterr().err
    assert main([*args, "--save-calibration", str(tmp_path / "c.json")]) == 2
    assert "--save-calibration needs --reference" in capsys.readouterr().err
    assert main([*args, "--reference", str(tmp_path)]) == 2  # holds one model directory
    assert "at least 3 reference models, got 1" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*args, "--reference", str(tmp_path / "empty")]) == 2
    assert "neither a model directory" in capsys.readouterr().err
