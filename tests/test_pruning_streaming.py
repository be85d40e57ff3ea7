"""Streaming prune: shard by shard from safetensors, identical to the in-memory prune, resumable, strict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import padded_batch, tiny_moe
from moeguard.data import build_char_tokenizer
from moeguard.errors import FingerprintMismatchError, InputError, ModelError, PlanError, UnsupportedModelError
from moeguard.models import MANIFEST_NAME, PruneManifest, load_moe
from moeguard.models.fingerprint import checkpoint_fingerprint
from moeguard.pruning import streaming
from moeguard.pruning.streaming import INDEX_NAME, streaming_prune

KEEP = [1, 3, 4, 6]  # group-balanced for DeepSeek-V3's 2 groups of 4


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        part = load_file(str(path))
        assert not set(part) & set(tensors), "a tensor is stored twice"
        tensors.update(part)
    return tensors


def sharded_checkpoint(family: str, directory: Path, max_shard_size: str = "60KB"):
    moe = tiny_moe(family)
    moe.model.save_pretrained(directory, max_shard_size=max_shard_size)
    return moe


def plan_for(moe) -> dict[int, list[int]]:
    return {layer: KEEP for layer in range(moe.num_layers)}


def test_streaming_prune_equals_in_memory_prune_tensor_by_tensor(family, tmp_path):
    source = tmp_path / "parent"
    moe = sharded_checkpoint(family, source)
    assert len(list(source.glob("*.safetensors"))) > 3  # really sharded

    result = streaming_prune(source, plan_for(moe), tmp_path / "streamed", progress=False)
    in_memory = load_moe(source, with_tokenizer=False)
    in_memory.prune(plan_for(moe))
    in_memory.save(tmp_path / "in_memory", max_shard_size="60KB")

    streamed, expected = stored_tensors(tmp_path / "streamed"), stored_tensors(tmp_path / "in_memory")
    assert sorted(streamed) == sorted(expected)
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype and streamed[name].shape == tensor.shape, name
        assert torch.equal(streamed[name], tensor), name
    assert result.after.total == in_memory.parameter_counts().total < result.before.total
    index = json.loads((tmp_path / "streamed" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(streamed)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())


def test_streamed_model_loads_with_stock_transformers_and_computes_the_masked_function(tmp_path):
    source = tmp_path / "parent"
    moe = sharded_checkpoint("mixtral", source)  # stored as block_sparse_moe.experts.{i}.w1/w2/w3
    streaming_prune(source, plan_for(moe), tmp_path / "streamed", progress=False)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad(), moe.mask_experts(plan_for(moe)):
        masked = moe.model(input_ids=input_ids, attention_mask=attention_mask).logits
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        logits = pruned(input_ids=input_ids, attention_mask=attention_mask).logits
    assert pruned.config.num_local_experts == len(KEEP)
    assert (logits - masked).abs().max().item() <= 1e-5


def test_manifest_records_the_checkpoint_fingerprint_and_the_kept_experts(tmp_path):
    source = tmp_path / "parent"
    moe = sharded_checkpoint("qwen3_moe", source)
    result = streaming_prune(source, plan_for(moe), tmp_path / "out", selection={"criterion": "frequency"}, progress=False)
    manifest = PruneManifest.load(tmp_path / "out" / MANIFEST_NAME)
    assert manifest.parent_fingerprint_kind == "checkpoint"
    assert manifest.parent_fingerprint == checkpoint_fingerprint(source) == result.manifest.parent_fingerprint
    assert manifest.kept == [KEEP, KEEP] and manifest.parent_num_experts == [8, 8]
    assert manifest.selection == {"criterion": "frequency"}
    assert load_moe(tmp_path / "out", with_tokenizer=False).expert_ids == [KEEP, KEEP]


def test_checkpoint_fingerprint_does_not_depend_on_the_shard_layout(tmp_path):
    moe = tiny_moe("olmoe")
    moe.model.save_pretrained(tmp_path / "one")
    moe.model.save_pretrained(tmp_path / "many", max_shard_size="50KB")
    assert checkpoint_fingerprint(tmp_path / "one") == checkpoint_fingerprint(tmp_path / "many")
    with torch.no_grad():
        moe.layers[0].experts.down_proj[3, 0, 0] += 1.0
    moe.model.save_pretrained(tmp_path / "changed")
    assert checkpoint_fingerprint(tmp_path / "changed") != checkpoint_fingerprint(tmp_path / "one")


def test_single_file_checkpoint_gets_what_the_in_memory_save_writes(tmp_path):
    source = tmp_path / "parent"
    moe = tiny_moe("gpt_oss")
    moe.tokenizer = build_char_tokenizer()
    moe.save(source)
    (source / "README.md").write_text("model card of the parent: 8 experts, 100% accurate")
    (source / "pytorch_model.bin").write_bytes(b"old weights")
    streaming_prune(source, plan_for(moe), tmp_path / "out", progress=False)
    moe.prune(plan_for(moe))
    moe.save(tmp_path / "in_memory")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {p.name for p in (tmp_path / "in_memory").iterdir()}
    assert "README.md" not in files and "pytorch_model.bin" not in files and INDEX_NAME not in files
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == len(KEEP)
    assert load_moe(tmp_path / "out").tokenizer("abc")["input_ids"] == moe.tokenizer("abc")["input_ids"]


def test_an_interrupted_prune_resumes_from_the_finished_shards(tmp_path, monkeypatch):
    source = tmp_path / "parent"
    moe = sharded_checkpoint("qwen2_moe", source)
    real = streaming._prune_shard
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "_prune_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        streaming_prune(source, plan_for(moe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.partial" / "progress.json").is_file()

    monkeypatch.setattr(streaming, "_prune_shard", real)
    resumed = streaming_prune(source, plan_for(moe), tmp_path / "out", progress=False)
    assert resumed.resumed_shards == 3
    assert not (tmp_path / ".out.partial").exists()
    fresh = streaming_prune(source, plan_for(moe), tmp_path / "fresh", progress=False)
    assert resumed.manifest.parent_fingerprint == fresh.manifest.parent_fingerprint
    a, b = stored_tensors(tmp_path / "out"), stored_tensors(tmp_path / "fresh")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_different_parent_than_the_attributed_one_is_refused_and_nothing_is_left(tmp_path):
    source = tmp_path / "parent"
    moe = sharded_checkpoint("olmoe", source)
    with pytest.raises(FingerprintMismatchError, match="stored tensors differ"):
        streaming_prune(source, plan_for(moe), tmp_path / "out", expected_fingerprint="0" * 64, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_non_uniform_and_invalid_keep_sets_are_refused_before_any_write(tmp_path):
    source = tmp_path / "parent"
    moe = sharded_checkpoint("deepseek_v3", source)
    with pytest.raises(PlanError, match="same number of experts kept in every MoE layer"):
        streaming_prune(source, {0: KEEP, 1: [0, 1, 2, 4, 5, 6]}, tmp_path / "out", progress=False)
    with pytest.raises(PlanError, match="group-limited"):
        streaming_prune(source, {0: [0, 1, 2, 4], 1: [0, 1, 2, 4]}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    del moe


def _add_tensor(source: Path, name: str, tensor: torch.Tensor) -> None:
    index_path = source / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(source / shard))
    tensors[name] = tensor
    save_file(tensors, str(source / shard), metadata={"format": "pt"})
    index["weight_map"][name] = shard
    index_path.write_text(json.dumps(index))


def _drop_tensor(source: Path, name: str) -> None:
    index_path = source / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop(name)
    tensors = load_file(str(source / shard))
    del tensors[name]
    save_file(tensors, str(source / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_a_stored_tensor_inside_an_expert_module_that_maps_to_nothing_is_refused(tmp_path):
    source = tmp_path / "parent"
    moe = sharded_checkpoint("qwen3_moe", source)
    _add_tensor(source, "model.layers.0.mlp.experts.2.gate_proj.weight_scale_inv", torch.ones(1))
    with pytest.raises(UnsupportedModelError, match=r"weight_scale_inv.*map to no expert tensor"):
        streaming_prune(source, plan_for(moe), tmp_path / "out", progress=False)


def test_a_checkpoint_missing_an_expert_is_refused(tmp_path):
    source = tmp_path / "parent"
    moe = sharded_checkpoint("qwen3_moe", source)
    _drop_tensor(source, "model.layers.1.mlp.experts.7.up_proj.weight")
    with pytest.raises(UnsupportedModelError, match=r"numbered \[0, 1, 2, 3, 4, 5, 6\].*expected exactly 0\.\.7"):
        streaming_prune(source, plan_for(moe), tmp_path / "out", progress=False)


def test_sources_that_cannot_be_streamed_are_refused_clearly(tmp_path):
    with pytest.raises(InputError, match="not a local directory"):
        streaming_prune("some-org/some-model", {0: KEEP}, tmp_path / "out")
    source = tmp_path / "bin_only"
    moe = tiny_moe("olmoe")
    moe.model.config.save_pretrained(source)
    torch.save(moe.model.state_dict(), source / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"no safetensors weights .* pytorch_model\.bin"):
        streaming_prune(source, {0: KEEP, 1: KEEP}, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists"):
        streaming_prune(source, {0: KEEP, 1: KEEP}, tmp_path / "taken")
