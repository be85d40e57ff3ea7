"""Checkpoints with the layer shapes of released MoEs: stored as the releases store them, loaded by stock
transformers, and every stage runs on a small version of each shape (same experts, top-k and groups)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeguard.attribution import attribute
from moeguard.data import build_char_tokenizer, load_task
from moeguard.forensics import detect
from moeguard.models import MANIFEST_NAME, load_moe
from moeguard.models.random_init import REAL_SHAPES, real_shape_config, stored_layout, write_random_checkpoint
from moeguard.models.stored import read_header
from moeguard.pruning import run_sweep
from moeguard.pruning.prune import prune_model
from moeguard.pruning.streaming import load_meta_moe, map_expert_tensors
from moeguard.realign.scopes import scope_parameters
from moeguard.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

# What the released checkpoints store for one MoE layer (their model.safetensors.index.json and headers):
# the layer's expert tensor pattern and shapes, its router, and the experts, top-k and groups of its config.
RELEASED = {
    "qwen3-30b-a3b": dict(
        expert=r"model\.layers\.0\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight",
        shapes={"gate": (768, 2048), "up": (768, 2048), "down": (2048, 768)},
        router=("model.layers.0.mlp.gate.weight", (128, 2048)), experts=128, top_k=8, groups=None),
    "mixtral-8x7b": dict(
        expert=r"model\.layers\.0\.block_sparse_moe\.experts\.(\d+)\.(w1|w3|w2)\.weight",
        shapes={"w1": (14336, 4096), "w3": (14336, 4096), "w2": (4096, 14336)},
        router=("model.layers.0.block_sparse_moe.gate.weight", (8, 4096)), experts=8, top_k=2, groups=None),
    "olmoe-1b-7b": dict(
        expert=r"model\.layers\.0\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight",
        shapes={"gate": (1024, 2048), "up": (1024, 2048), "down": (2048, 1024)},
        router=("model.layers.0.mlp.gate.weight", (64, 2048)), experts=64, top_k=8, groups=None),
    "deepseek-v3": dict(
        expert=r"model\.layers\.0\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight",
        shapes={"gate": (2048, 7168), "up": (2048, 7168), "down": (7168, 2048)},
        router=("model.layers.0.mlp.gate.weight", (256, 7168)), experts=256, top_k=8, groups=(8, 4)),
}


@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_a_real_shape_stores_one_layer_as_its_release_does(name):
    released = RELEASED[name]
    layout = stored_layout(real_shape_config(name, moe_layers=1))  # on the meta device: no memory
    pattern = re.compile(released["expert"])
    found: dict[str, set[int]] = {}
    for stored_name, tensor in layout.items():
        match = pattern.fullmatch(stored_name)
        if match:
            found.setdefault(match.group(2), set()).add(int(match.group(1)))
            assert tuple(tensor.shape) == released["shapes"][match.group(2)], stored_name
            assert tensor.dtype == torch.bfloat16
    assert found == {part: set(range(released["experts"])) for part in released["shapes"]}
    router_name, router_shape = released["router"]
    assert tuple(layout[router_name].shape) == router_shape


@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_a_real_shape_routes_as_its_release_does(name):
    released = RELEASED[name]
    meta = load_meta_moe_from_config(real_shape_config(name, moe_layers=1))
    (layer,) = meta.layers
    assert (layer.num_experts, layer.top_k) == (released["experts"], released["top_k"])
    groups = layer.group_routing
    assert (None if groups is None else (groups.num_groups, groups.groups_per_token)) == released["groups"]
    assert bool(layer.shared_expert_paths) == (name == "deepseek-v3")


def load_meta_moe_from_config(config):
    from moeguard.models import MoEModel

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return MoEModel.from_model(model)


@pytest.mark.slow
def test_a_written_real_shape_checkpoint_loads_with_stock_transformers(tmp_path):
    config = real_shape_config("olmoe-1b-7b", moe_layers=1)
    written = write_random_checkpoint(config, tmp_path / "olmoe", max_shard_size="500MB", tokenizer=build_char_tokenizer(),
                                      progress=False)
    assert len(written.shard_bytes) == 3 and written.largest_shard <= 500e6  # split as a release is
    assert written.total_bytes == sum(p.stat().st_size for p in (tmp_path / "olmoe").glob("*.safetensors"))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "olmoe", output_loading_info=True)
    assert not any(info.values())
    assert model.dtype == torch.bfloat16
    assert tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape) == (64, 2048, 2048)
    index = json.loads((tmp_path / "olmoe" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(read_header(p).data_bytes for p in (tmp_path / "olmoe").glob("*.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------- every stage on the small versions


def keep_for(moe) -> int:
    """Half the experts, a multiple of the group count (group-limited routers keep groups balanced)."""
    layer = moe.layers[0]
    return max(layer.top_k, layer.num_experts // 2)


@pytest.fixture(scope="module", params=list(REAL_SHAPES))
def small(request, tmp_path_factory):
    """The small version of a shape written like a release (sharded, per-expert, bf16), with its attribution."""
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    config = real_shape_config(name, moe_layers=2, dense_layers=REAL_SHAPES[name].dense_layers and 1, small=True)
    write_random_checkpoint(config, directory / "model", max_shard_size="64KB", tokenizer=build_char_tokenizer(),
                            progress=False)
    moe = load_moe(directory / "model")
    data = load_task("upper", "train", limit=6)
    run = attribute(moe, data, criteria=["frequency", "reap"], batch_size=3, out=directory / "attribution.json",
                    progress=False)
    return name, directory, moe, run


def test_small_shape_inspects_with_its_release_routing(small):
    name, directory, moe, _ = small
    released = RELEASED[name]
    assert len(list((directory / "model").glob("*.safetensors"))) > 2
    assert next(moe.model.parameters()).dtype == torch.bfloat16  # loaded in the checkpoint's own dtype
    assert moe.num_experts == [released["experts"]] * 2 and moe.top_k == [released["top_k"]] * 2
    assert f"{released['experts']} experts, top-{released['top_k']}" in moe.describe()


def test_small_shape_attributes_every_non_pad_token(small):
    _, _, moe, run = small
    attribution = run.attribution
    assert attribution.num_experts == moe.num_experts
    assert all(int(attribution.total("routed")[layer].sum()) == attribution.token_counts[layer] * moe.top_k[layer]
               for layer in range(moe.num_layers))
    assert attribution.checkpoint_fingerprint  # a streaming prune can check its parent
    assert torch.isfinite(attribution.total("weighted_norm")).all()


def test_small_shape_prunes_in_memory_and_streaming_to_the_same_tensors(small, tmp_path):
    _, directory, moe, _ = small
    keep = keep_for(moe)
    streamed = prune_model(directory / "model", directory / "attribution.json", tmp_path / "streamed", keep=keep,
                           criterion="reap", streaming=True, progress=False)
    in_memory = prune_model(directory / "model", directory / "attribution.json", tmp_path / "in_memory", keep=keep,
                            criterion="reap")
    assert streamed.manifest.kept == in_memory.manifest.kept
    pruned = load_moe(tmp_path / "streamed")
    assert pruned.num_experts == [keep] * 2 and (tmp_path / "streamed" / MANIFEST_NAME).is_file()
    reference = load_moe(tmp_path / "in_memory")
    for (name, a), (_, b) in zip(sorted(pruned.model.state_dict().items()), sorted(reference.model.state_dict().items())):
        assert torch.equal(a, b), name


def test_small_shape_sweeps_in_mask_mode(small):
    _, _, moe, run = small
    result = run_sweep(moe, "upper", attribution=run.attribution, criteria=["reap"], keeps=[keep_for(moe)],
                       other_tasks=["reverse"], limit=2, batch_size=2, progress=False)
    assert {p.criterion for p in result.points} == {"reap", "random", "least_used:frequency"}
    assert all(0.0 <= p.accuracy["upper"] <= 1.0 for p in result.points)


@pytest.mark.parametrize("scope", ["router", "experts", "attention", "all"])
def test_small_shape_takes_a_training_step_in_each_scope(small, scope):
    _, _, moe, _ = small
    trainable = scope_parameters(moe, scope)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    tokenizer = moe.tokenizer
    encoded = tokenizer(["HELLO world", "abc"], padding=True, return_tensors="pt")
    batch = {**encoded, "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}
    try:
        result = train(moe, [batch], steps=1, lr=1e-2, parameters=trainable.values(), progress=False)
        assert result.steps == 1
        assert any(not torch.equal(before[name], p) for name, p in trainable.items())
    finally:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(before[name])


def test_small_shape_detects_its_streamed_prune(small, tmp_path):
    _, directory, moe, _ = small
    prune_model(directory / "model", directory / "attribution.json", tmp_path / "pruned", keep=keep_for(moe),
                criterion="frequency", streaming=True, progress=False)
    verdict = detect(moe, tmp_path / "pruned", probes=16, progress=False)
    assert verdict.status == "derived"
