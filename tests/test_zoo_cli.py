"""``moeguard zoo``: training a demo model into a directory and finding the cached one."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from moeguard.cli import main
from moeguard.zoo import CARD_JSON, DemoConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_zoo_train_writes_a_model_with_the_requested_shape_and_prints_its_accuracy(tmp_path, capsys):
    out = tmp_path / "demo"
    arguments = ["zoo", "train", "--out", str(out), "--seed", "3", "--experts", "4", "--top-k", "1", "--layers", "1",
                 "--hidden", "32", "--steps", "3", "--tasks", "upper,count"]
    assert main(["-q", *arguments]) == 0
    printed = capsys.readouterr().out
    assert "upper" in printed and "count" in printed and f"model written to {out}" in printed
    card = json.loads((out / CARD_JSON).read_text())
    assert card["seed"] == 3
    assert {k: card["config"][k] for k in ("experts", "top_k", "layers", "hidden", "steps", "tasks")} == {
        "experts": 4, "top_k": 1, "layers": 1, "hidden": 32, "steps": 3, "tasks": ["upper", "count"]
    }
    config = AutoConfig.from_pretrained(out)
    assert (config.num_experts, config.num_experts_per_tok, config.num_hidden_layers) == (4, 1, 1)
    assert main(["-q", *arguments]) == 2
    assert "already exists" in capsys.readouterr().err


def test_zoo_path_prints_the_cached_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEGUARD_CACHE", str(tmp_path))
    cached = tmp_path / "demo" / DemoConfig().key(0)
    cached.mkdir(parents=True)
    (cached / CARD_JSON).write_text("{}")  # present, so nothing is trained
    assert main(["zoo", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(cached)


def test_zoo_train_refuses_an_impossible_shape(tmp_path, capsys):
    assert main(["zoo", "train", "--out", str(tmp_path / "m"), "--experts", "2", "--top-k", "3"]) == 2
    assert "top_k=3 is more than experts=2" in capsys.readouterr().err
