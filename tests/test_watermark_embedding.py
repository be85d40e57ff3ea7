"""Embedding: a watermarked tiny model verifies, its original does not, and it stays a stock model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_moe

from moeguard.data import batches, build_char_tokenizer, load_task, mixture
from moeguard.defense.harden import HardenSettings, harden_to_directory, task_of_examples
from moeguard.defense.objective import DefenseObjective, defense_config, method_config
from moeguard.errors import InputError
from moeguard.models import load_moe
from moeguard.watermark import (
    Watermark,
    WatermarkConfig,
    WatermarkEmbedding,
    builtin_record,
    local_suspect,
    verify_watermark,
)

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "owner-key-0001"
TOKENIZER = build_char_tokenizer()


def test_watermark_is_one_defense_entry_that_composes_with_the_others():
    assert method_config("watermark").active_terms == ["watermark"]
    combined = method_config("entangle+watermark")
    assert combined.active_terms == ["dispersion", "contribution", "subset_failure", "watermark"]
    assert defense_config("attacker+watermark", strength=0.5).watermark == 0.5
    keyed = method_config("keys+watermark")  # a method's own settings (not only its term weights) carry over
    assert keyed.keys == method_config("keys").keys > 0 and keyed.repair == method_config("keys").repair
    assert keyed.watermark == 1.0 and method_config("ntl+watermark").keep_counts == method_config("ntl").keep_counts
    with pytest.raises(InputError, match="unknown defense method"):
        method_config("entangle+nothing")
    assert "watermark_settings" in method_config("watermark").to_dict()


@pytest.mark.slow
def test_the_watermark_term_reaches_experts_and_routers_alongside_entangling():
    moe = tiny_moe("qwen3_moe", vocab=len(TOKENIZER))
    moe.tokenizer = TOKENIZER
    tasks = [load_task(name, "train", limit=32) for name in ("upper", "reverse")]
    watermark = Watermark(builtin_record(("upper", "reverse"), triggers_per_task=8), KEY)
    config = defense_config("entangle+watermark", keep_counts=(4,))
    embedding = WatermarkEmbedding(moe, watermark, tasks, config.watermark_settings)
    objective = DefenseObjective(moe, config, task_of_examples(tasks), len(tasks), watermark=embedding)
    batch = next(batches(TOKENIZER, mixture(tasks), batch_size=16, shuffle=True))
    with objective.attached():
        outputs = moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        extra = objective(moe, batch, outputs)
    extra.backward()
    values = objective.log.means()
    assert {"watermark", "watermark_full", "watermark_masked", "subset_failure"} <= set(values)
    assert torch.isfinite(extra) and values["watermark"] > 0
    layer = moe.layers[0]
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.expert_parameters())
    with pytest.raises(InputError, match="needs a key"):
        DefenseObjective(moe, config, task_of_examples(tasks), len(tasks))


def test_carves_are_drawn_from_each_tasks_top_experts():
    moe = tiny_moe("qwen3_moe", vocab=len(TOKENIZER))
    moe.tokenizer = TOKENIZER
    tasks = [load_task(name, "train", limit=32) for name in ("upper", "reverse")]
    watermark = Watermark(builtin_record(("upper", "reverse"), triggers_per_task=4), KEY)
    embedding = WatermarkEmbedding(moe, watermark, tasks, WatermarkConfig(keep_counts=(2, 3, 8), near_top=0.0))
    assert embedding.keep_counts == [2, 3]  # keeping all 8 is no carve
    embedding.refresh_plans()
    for (task, criterion, count), kept in embedding.plans.items():
        assert len(kept) == moe.num_layers and all(len(experts) == count for experts in kept.values())
    assert {task for task, _, _ in embedding.plans} == {"upper", "reverse"}
    drawn = embedding.keep_sets("upper")
    assert drawn in [kept for (task, _, _), kept in embedding.plans.items() if task == "upper"]


@pytest.mark.slow
def test_a_watermarked_tiny_model_verifies_through_stock_transformers_and_its_original_does_not(trained_tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = ("upper", "reverse")
    record = builtin_record(names, triggers_per_task=8)
    watermark = Watermark(record, KEY)
    original = load_moe(trained_tiny)
    assert not verify_watermark(original, watermark).detected
    train = [load_task(name, "train", limit=2000) for name in names]
    test = [load_task(name, "test", limit=100) for name in names]
    config = defense_config("watermark", watermark_settings=WatermarkConfig(masked_passes=1, refresh_every=50))
    settings = HardenSettings(steps=250, lr=2e-3, batch_size=16)
    out = tmp_path / "marked"
    report = harden_to_directory(load_moe(trained_tiny), train, test, config, settings, out=out, permitted=["router"],
                                 method="watermark", watermark=watermark, progress=False)
    assert report["watermark"]["verdict"]["detected"]
    assert KEY not in (out / "harden_report.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    verdict = verify_watermark(local_suspect(model, tokenizer), watermark)
    assert verdict.detected and verdict.p_value <= 1e-6
    assert verify_watermark(str(out), watermark).matched == verdict.matched
    for other in ("owner-key-0002", "owner-key-0003"):
        assert not verify_watermark(str(out), Watermark(record, other)).detected
    # The utility cost stays bounded (generous: one run on any machine).
    for before, after in zip(report["accuracy_before"], report["accuracy_after"]):
        assert after >= before - 0.25


def test_the_commands_refuse_a_watermark_without_a_key(trained_tiny, tmp_path, monkeypatch, capsys):
    from moeguard.cli import main

    monkeypatch.delenv("MOEGUARD_WATERMARK_KEY", raising=False)
    assert main(["harden", "--model", str(trained_tiny), "--method", "entangle+watermark", "--tasks", "upper",
                 "--out", str(tmp_path / "h")]) == 2
    assert "needs a key" in capsys.readouterr().err
    assert main(["zoo", "train", "--out", str(tmp_path / "z"), "--defense", "watermark", "--steps", "1"]) == 2
    assert "needs a key" in capsys.readouterr().err
    assert main(["harden", "--model", str(trained_tiny), "--method", "watermark+nothing", "--out", str(tmp_path / "h")]) == 2
    assert "unknown defense method" in capsys.readouterr().err
    assert not (tmp_path / "h").exists() and not (tmp_path / "z").exists()


@pytest.mark.slow
def test_a_demo_model_trains_watermarked_from_scratch(tmp_path):
    from moeguard.defense.harden import demo_defense_loss
    from moeguard.zoo import DemoConfig, train_demo

    config = DemoConfig(layers=1, hidden=32, expert_hidden=32, tasks=("upper", "reverse"), task_weights=(),
                        train_examples=64, steps=4, batch_size=8, warmup=1)
    loss = demo_defense_loss(config, "entangle+watermark", key=KEY, strength=0.5)
    assert loss.watermark.record.task_names == ["upper", "reverse"] and loss.config.watermark == 0.5
    out = train_demo(tmp_path / "demo", config, extra_loss=loss, progress=False)
    assert (out / "config.json").is_file()
    assert set(loss.objective.log.means()) >= {"watermark", "watermark_masked", "dispersion"}
    with pytest.raises(InputError, match="needs a key"):
        demo_defense_loss(config, "watermark")
