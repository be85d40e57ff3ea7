"""detect(): derivatives of a parent are found with their kept sets; independent models are not."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import padded_batch, tiny_moe

from moeguard.data import batches, load_task
from moeguard.errors import InputError, PlanError
from moeguard.forensics import detect
from moeguard.forensics.derivatives import random_orders, reindex_experts
from moeguard.models import MoEModel, load_moe
from moeguard.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def carve(family: str, keep: list[int], *, seed: int = 1, **overrides) -> tuple[MoEModel, list[list[int]]]:
    """A copy of the tiny parent keeping ``keep[l]`` random experts per layer, in random order."""
    suspect = tiny_moe(family, **overrides)
    orders = random_orders(suspect, keep, seed=seed)
    reindex_experts(suspect, orders)
    return suspect, orders


def random_token_batches(vocab: int = 128, *, seed: int = 0):
    """Endless batches of random token sequences, every token labelled."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, vocab, (4, 12), generator=generator)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def fine_tune(moe: MoEModel, *, lr: float, steps: int, parameters=None) -> None:
    train(moe, random_token_batches(), steps=steps, lr=lr, parameters=parameters, progress=False)


def assert_derived_with_order(verdict, orders):
    assert verdict.derived, verdict.summary()
    assert verdict.z >= verdict.z_threshold
    assert [lv.order for lv in verdict.layers] == orders
    assert verdict.kept_sets() == {layer: sorted(order) for layer, order in enumerate(orders)}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_a_pruned_and_reordered_copy_is_derived_and_its_experts_are_recovered_in_order(family):
    suspect, orders = carve(family, [4, 4])
    assert_derived_with_order(detect(tiny_moe(family), suspect, progress=False), orders)


def test_any_keep_count_per_layer_is_recovered_including_all_experts_and_top_k():
    suspect, orders = carve("qwen3_moe", [8, 2], seed=4)  # non-uniform: lives in memory only
    assert suspect.num_experts == [8, 2]
    assert_derived_with_order(detect(tiny_moe("qwen3_moe"), suspect, progress=False), orders)


def test_reindexed_suspect_computes_what_the_masked_parent_computes():
    parent = tiny_moe("mixtral")
    suspect, orders = carve("mixtral", [5, 3], seed=2)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad(), parent.mask_experts({0: orders[0], 1: orders[1]}):
        expected = parent.model(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        actual = suspect.model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_reindexing_refuses_what_cannot_route():
    moe = tiny_moe("qwen3_moe")
    with pytest.raises(PlanError, match="fewer than top_k=2"):
        reindex_experts(moe, [[0], [0, 1]])
    with pytest.raises(PlanError, match="distinct expert indices"):
        reindex_experts(moe, [[0, 0, 1], [0, 1]])


@pytest.mark.parametrize("lr", [1e-4, 3e-3])
def test_full_fine_tuning_after_pruning_does_not_hide_the_parent(lr):
    parent = tiny_moe("qwen3_moe")
    suspect, orders = carve("qwen3_moe", [4, 3], seed=5)
    fine_tune(suspect, lr=lr, steps=40)
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    drift = max(1 - m.weight_similarity for lv in verdict.layers for m in lv.matches)
    assert drift > (0.2 if lr == 3e-3 else 1e-4)  # the fine-tune really moved the experts


def test_a_trained_model_pruned_to_top_k_and_re_aligned_on_a_task_is_derived(trained_tiny):
    parent = load_moe(trained_tiny)
    suspect = load_moe(trained_tiny)
    orders = random_orders(suspect, [2, 2], seed=3)
    reindex_experts(suspect, orders)
    data = load_task("reverse", "train", limit=240)
    train(suspect, batches(suspect.tokenizer, data, batch_size=8, shuffle=True, epochs=None), steps=30, lr=3e-3, progress=False)
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    assert min(m.weight_similarity for lv in verdict.layers for m in lv.matches) < 0.99


def test_fine_tuning_only_the_non_expert_parts_leaves_the_experts_identifiable():
    parent = tiny_moe("gpt_oss")
    suspect, orders = carve("gpt_oss", [3, 3], seed=6)
    routed = {id(p) for layer in suspect.layers for p in layer.expert_parameters() + layer.router_parameters()}
    others = [p for p in suspect.model.parameters() if id(p) not in routed]
    fine_tune(suspect, lr=3e-3, steps=10, parameters=others)
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    assert min(m.similarity for lv in verdict.layers for m in lv.matches) > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_copy_is_derived(dtype):
    suspect, orders = carve("deepseek_v3", [4, 4], seed=7)
    suspect.model.to(dtype)
    verdict = detect(tiny_moe("deepseek_v3"), suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    assert verdict.suspect["dtype"] == str(dtype).removeprefix("torch.")


def test_permuting_neurons_inside_each_expert_does_not_hide_it():
    """Re-ordering an expert's intermediate neurons leaves its function, hence its responses, unchanged."""
    parent = tiny_moe("mixtral")
    suspect, orders = carve("mixtral", [4, 4], seed=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in suspect.layers:
            experts = layer.experts
            neurons = experts.down_proj.shape[-1]
            for e in range(layer.num_experts):
                order = torch.randperm(neurons, generator=generator)
                gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
                experts.gate_up_proj[e] = torch.cat([gate[order], up[order]])
                experts.down_proj[e] = experts.down_proj[e][:, order]
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_independently_initialised_models_of_the_same_architecture_are_not_derived(family):
    parent = tiny_moe(family)
    for seed in (11, 12, 13):
        verdict = detect(parent, tiny_moe(family, seed=seed), progress=False)
        assert verdict.status == "not derived", verdict.summary()
        assert verdict.z < verdict.z_threshold
        assert all(lv.kept == [] for lv in verdict.layers)


def test_an_unrelated_moe_with_other_expert_shapes_is_not_derived():
    verdict = detect(tiny_moe("qwen3_moe"), tiny_moe("olmoe", seed=21, intermediate=48, experts=6), progress=False)
    assert verdict.status == "not derived"
    assert all(m.weight_similarity is None for lv in verdict.layers for m in lv.matches)


def test_a_different_hidden_size_is_not_comparable():
    verdict = detect(tiny_moe("qwen3_moe"), tiny_moe("qwen3_moe", hidden=96), progress=False)
    assert verdict.status == "not comparable" and not verdict.derived
    assert verdict.z is None
    assert "hidden size 96 (suspect) vs 64 (parent)" in verdict.reason
    assert all(lv.status == "not comparable" for lv in verdict.layers)


def test_a_suspect_with_fewer_moe_layers_is_aligned_to_the_right_parent_layers():
    parent = tiny_moe("qwen3_moe", layers=3)
    suspect = copy.deepcopy(parent)
    del suspect.model.model.layers[1]
    suspect.model.config.num_hidden_layers = 2
    suspect = MoEModel.from_model(suspect.model)
    orders = random_orders(suspect, [4, 4], seed=9)
    reindex_experts(suspect, orders)
    verdict = detect(parent, suspect, progress=False)
    assert verdict.derived and verdict.layer_alignment == "matched"
    assert [lv.parent_layer for lv in verdict.layers] == [0, 2]
    assert [lv.order for lv in verdict.layers] == orders


def test_a_parent_with_fewer_layers_leaves_the_extra_suspect_layer_unaligned():
    parent = tiny_moe("qwen3_moe", layers=3)
    short = copy.deepcopy(parent)
    del short.model.model.layers[0]
    short.model.config.num_hidden_layers = 2
    verdict = detect(MoEModel.from_model(short.model), parent, progress=False)
    assert verdict.derived
    assert [lv.status for lv in verdict.layers] == ["unaligned", "compared", "compared"]
    assert [lv.parent_layer for lv in verdict.layers] == [None, 0, 1]


def test_detect_refuses_bad_settings_with_clear_messages():
    moe = tiny_moe("qwen3_moe")
    with pytest.raises(InputError, match="alpha must be a probability"):
        detect(moe, moe, alpha=2.0)
    with pytest.raises(InputError, match="group_size must be at least 3"):
        detect(moe, moe, group_size=2)
    with pytest.raises(InputError, match="MoEModel or a model directory"):
        detect(moe, 42)


def test_suspect_experts_beyond_the_parents_count_stay_unmatched():
    pruned, orders = carve("qwen3_moe", [3, 3], seed=10)
    verdict = detect(pruned, tiny_moe("qwen3_moe"), progress=False)  # the larger model as the suspect
    assert verdict.derived
    for lv, order in zip(verdict.layers, orders):
        assert sum(m.candidate is None for m in lv.matches) == 5
        assert {s: m.parent_expert for s, m in enumerate(lv.matches) if m.parent_expert is not None} == {
            expert: position for position, expert in enumerate(order)
        }
