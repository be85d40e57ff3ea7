"""The demo model: trained from scratch, carded, deterministic, cached, loadable with stock transformers."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_ACCURACY_FLOOR
from moeguard.data import load_task
from moeguard.errors import InputError, ModelError
from moeguard.eval import evaluate
from moeguard.models import load_moe
from moeguard.zoo import CARD_JSON, TINY_DEMO, DemoConfig, demo_cache_dir, demo_model_path, train_demo
from moeguard.zoo.card import render_card

pytestmark = pytest.mark.usefixtures("one_thread")

# A model small enough to train in well under a second: enough to check plumbing and determinism.
MICRO = DemoConfig(layers=1, hidden=32, expert_hidden=16, heads=2, tasks=("upper", "count"), train_examples=64, steps=4, batch_size=8)


def card_of(path) -> dict:
    return json.loads((path / CARD_JSON).read_text())


def test_the_tiny_trained_model_loads_with_stock_auto_classes_and_its_card_is_right(trained_tiny):
    card = card_of(trained_tiny)
    model = AutoModelForCausalLM.from_pretrained(trained_tiny)
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (8, 2)
    assert tokenizer.decode(tokenizer("up abc=").input_ids, skip_special_tokens=True) == "up abc="
    moe = load_moe(trained_tiny)
    assert card["fingerprint"] == moe.fingerprint()
    for task in card["config"]["tasks"]:
        measured = evaluate(moe, tokenizer, load_task(task, "test"), batch_size=200)
        assert measured.value == card["accuracy"][task]["value"]
        assert measured.value >= TINY_ACCURACY_FLOOR, f"{task}: {measured.value}"
    readme = (trained_tiny / "README.md").read_text()
    upper = card["accuracy"]["upper"]["value"]
    for text in ("seed 0", f"{card['training']['steps']:,} steps", "wall time", "| upper |", f"{upper:.3f}",
                 "Routing specialisation"):
        assert text in readme
    # The README is written once, at training, by the moeguard of that day (a cached model keeps it): the
    # current rendering of the same card names each task's type and metric.
    assert f"| upper | generate | exact_match | {upper:.3f}" in render_card(card)
    assert set(card["routing"]["effective_experts"]) == set(card["config"]["tasks"])


@pytest.mark.slow
def test_a_small_moe_trained_for_a_few_seconds_learns_its_task_end_to_end(tmp_path):
    config = DemoConfig(layers=2, hidden=64, expert_hidden=64, tasks=("upper",), train_examples=2_000, steps=200, batch_size=32, lr=1e-2, warmup=20)
    path = train_demo(tmp_path / "model", config, progress=False)
    card = card_of(path)
    assert card["training"]["final_loss"] < 1.5  # from about 4.6 (uniform over 99 tokens)
    assert card["accuracy"]["upper"]["n"] == 200
    assert card["accuracy"]["upper"]["value"] >= 0.1  # exact strings of 3-8 letters: chance is ~0
    moe = load_moe(path)
    assert evaluate(moe, None, load_task("upper", limit=200)).value == card["accuracy"]["upper"]["value"]


@pytest.mark.slow
def test_same_seed_gives_the_same_data_and_weights_and_another_seed_does_not(tmp_path):
    short_tiny = dataclasses.replace(TINY_DEMO, steps=4, train_examples=64)  # the tiny architecture, a few steps
    first = card_of(train_demo(tmp_path / "a", short_tiny, seed=5, progress=False))
    second = card_of(train_demo(tmp_path / "b", short_tiny, seed=5, progress=False))
    other = card_of(train_demo(tmp_path / "c", short_tiny, seed=6, progress=False))
    assert first["fingerprint"] == second["fingerprint"]
    assert other["fingerprint"] != first["fingerprint"]
    assert load_task("upper", "train", seed=5).examples == load_task("upper", "train", seed=5).examples
    assert MICRO.key(5) == dataclasses.replace(MICRO).key(5) != MICRO.key(6)
    assert dataclasses.replace(MICRO, steps=5).key(5) != MICRO.key(5)


def test_the_cache_trains_once_then_reuses_and_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGUARD_CACHE", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "demo" / MICRO.key(0)
    assert demo_cache_dir(MICRO) == expected
    with pytest.raises(ModelError, match="has not been trained yet .* run `moeguard zoo path`"):
        demo_model_path(MICRO, train_if_missing=False)
    assert demo_model_path(MICRO, progress=False) == expected
    assert (expected / CARD_JSON).is_file() and (expected / "model.safetensors").is_file()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr("moeguard.zoo.demo.train_demo", must_not_train)
    assert demo_model_path(MICRO) == expected
    assert demo_model_path(MICRO, train_if_missing=False) == expected


def test_training_into_an_existing_directory_is_refused_before_any_work(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="taken already exists; choose another output path or pass overwrite=True"):
        train_demo(tmp_path / "taken", MICRO)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(top_k=9), "top_k=9 is more than experts=8"),
        (dict(experts=0), "experts must be a positive integer, got 0"),
        (dict(hidden=100, heads=8), "hidden=100 must split into 8 heads of even width"),
        (dict(tasks=("upper", "nope")), "unknown built-in task 'nope'"),
        (dict(tasks=()), "tasks is empty"),
        (dict(family="llama"), "demo family must be one of mixtral, qwen2_moe"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(task_weights=(("upper", 0.0),)), "the weight of task 'upper' must be positive, got 0.0"),
        (dict(task_weights=(("uper", 2.0),)), "unknown built-in task 'uper'"),
    ],
)
def test_bad_demo_configs_are_refused_with_the_fix(settings, message):
    with pytest.raises(InputError, match=message):
        DemoConfig(**settings)


def test_a_config_round_trips_through_its_dict_and_unknown_settings_are_named():
    assert DemoConfig.from_dict(MICRO.to_dict()) == MICRO
    with pytest.raises(InputError, match=r"unknown settings \['width'\]"):
        DemoConfig.from_dict({"width": 3})


def test_task_weights_put_more_examples_of_a_task_into_the_mixture():
    config = DemoConfig(train_examples=100, task_weights=(("addition", 2.5),))
    assert [config.examples_of(task) for task in ("addition", "upper")] == [250, 100]
    assert DemoConfig.from_dict(config.to_dict()) == config
    assert config.key(0) != DemoConfig(train_examples=100, task_weights=()).key(0)
