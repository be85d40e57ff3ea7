"""A physically pruned model computes exactly what the masked original computes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import padded_batch, tiny_moe
from moeguard.models import MANIFEST_NAME, PruneManifest, load_moe

KEEP_SETS = {
    "default": [[1, 3, 4, 6], [0, 5], [0, 1, 2, 3, 5, 7]],
    # group-limited: 2 groups of 4, every group keeps the same number, >= 2
    "deepseek_v3": [[1, 3, 4, 6], [0, 1, 4, 5], [0, 2, 3, 5, 6, 7]],
}


def keep_sets_for(family: str) -> list[list[int]]:
    return KEEP_SETS.get(family, KEEP_SETS["default"])


def logits(moe, input_ids, attention_mask) -> torch.Tensor:
    with torch.no_grad():
        return moe.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("which", [0, 1, 2], ids=["non-contiguous", "keep==top_k-or-small", "large"])
def test_pruned_logits_equal_masked_logits(family, which):
    moe = tiny_moe(family)
    kept = keep_sets_for(family)[which]
    plan = {layer: kept for layer in range(moe.num_layers)}
    input_ids, attention_mask = padded_batch()

    with moe.mask_experts(plan):
        masked = logits(moe, input_ids, attention_mask)
    moe.prune(plan)
    pruned = logits(moe, input_ids, attention_mask)

    assert moe.num_experts == [len(kept)] * moe.num_layers
    assert (pruned - masked).abs().max().item() <= 1e-5


def test_masking_changes_the_function_and_is_undone_on_exit(family):
    moe = tiny_moe(family)
    input_ids, attention_mask = padded_batch()
    before = logits(moe, input_ids, attention_mask)
    plan = {layer: keep_sets_for(family)[0] for layer in range(moe.num_layers)}
    with moe.mask_experts(plan):
        masked = logits(moe, input_ids, attention_mask)
    after = logits(moe, input_ids, attention_mask)
    assert (masked - before).abs().max() > 1e-4
    assert torch.equal(before, after)


def test_mask_is_undone_when_the_block_raises(family):
    moe = tiny_moe(family)
    router_tensors = [ref.get() for layer in moe.layers for ref in layer.tensors("router")]
    input_ids, attention_mask = padded_batch()
    before = logits(moe, input_ids, attention_mask)
    with pytest.raises(RuntimeError, match="boom"):
        with moe.mask_experts({0: keep_sets_for(family)[0]}):
            logits(moe, input_ids, attention_mask)
            raise RuntimeError("boom")
    assert [ref.get() for layer in moe.layers for ref in layer.tensors("router")] == router_tensors
    assert torch.equal(logits(moe, input_ids, attention_mask), before)


def test_masked_experts_are_never_selected_even_in_non_uniform_plans(family):
    moe = tiny_moe(family)
    sets = keep_sets_for(family)
    plan = {0: sets[0], moe.num_layers - 1: sets[2]}  # different counts per layer: mask mode only
    input_ids, attention_mask = padded_batch(length=16, seed=3)
    with moe.mask_experts(plan), moe.capture_routing() as capture:
        logits(moe, input_ids, attention_mask)
    for layer, kept in plan.items():
        assert set(capture.indices(layer).unique().tolist()) <= set(kept)


def test_training_under_a_mask_reaches_only_kept_router_rows():
    moe = tiny_moe("qwen3_moe")
    kept = [1, 3, 4, 6]
    input_ids, attention_mask = padded_batch()
    with moe.mask_experts({0: kept}):
        out = moe.model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        out.loss.backward()
    grad = moe.layers[0].router.weight.grad
    removed = [i for i in range(8) if i not in kept]
    assert grad[removed].abs().max() == 0
    assert grad[kept].abs().max() > 0


def test_pruned_model_saves_and_loads_with_stock_transformers(family, tmp_path):
    moe = tiny_moe(family)
    kept = keep_sets_for(family)[0]
    plan = {layer: kept for layer in range(moe.num_layers)}
    parent_fingerprint = moe.fingerprint()
    input_ids, attention_mask = padded_batch()
    moe.prune(plan, selection={"criterion": "manual", "keep": len(kept)})
    expected = logits(moe, input_ids, attention_mask)
    out = moe.save(tmp_path / "pruned")

    stock = AutoModelForCausalLM.from_pretrained(out)
    stock.eval()
    with torch.no_grad():
        got = stock(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(got, expected)

    config = json.loads((out / "config.json").read_text())
    assert len(kept) in [config.get(name) for name in ("num_local_experts", "num_experts", "n_routed_experts")]

    manifest = PruneManifest.load(out / MANIFEST_NAME)
    assert manifest.parent_fingerprint == parent_fingerprint
    assert manifest.kept == [kept] * moe.num_layers
    assert manifest.keep_count == len(kept)
    assert manifest.selection == {"criterion": "manual", "keep": len(kept)}
    assert PruneManifest.from_dict(manifest.to_dict()) == manifest

    reloaded = load_moe(out)
    assert reloaded.expert_ids == [kept] * moe.num_layers
    assert reloaded.fingerprint() == moe.fingerprint()


def test_pruning_a_pruned_model_composes_expert_ids_and_keeps_lineage(tmp_path):
    moe = tiny_moe("mixtral")
    moe.prune({0: [0, 2, 4, 5, 7], 1: [1, 2, 3, 6, 7]})
    first = moe.manifest
    moe.prune({0: [1, 3, 4], 1: [0, 2, 4]})
    assert moe.expert_ids == [[2, 5, 7], [1, 3, 7]]
    assert moe.manifest.lineage[0] == first.to_dict()
