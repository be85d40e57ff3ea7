"""`prune_model` / `moeguard prune`: plan from an attribution, physical prune, manifest, summary, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import padded_batch, tiny_moe
from moeguard.attribution import collect_attribution, scores
from moeguard.cli import main
from moeguard.errors import FingerprintMismatchError, PlanError
from moeguard.models import MANIFEST_NAME, PruneManifest, load_moe
from moeguard.pruning.plans import make_plan
from moeguard.pruning.prune import prune_model


def batches(count: int = 3):
    result = []
    for seed in range(count):
        input_ids, attention_mask = padded_batch(seed=seed, length=16)
        result.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return result


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny Qwen3-MoE saved to a directory, and an attribution of it loaded from there."""
    directory = tmp_path_factory.mktemp("prune") / "parent"
    tiny_moe("qwen3_moe").model.save_pretrained(directory, max_shard_size="60KB")
    moe = load_moe(directory, with_tokenizer=False)
    attribution = collect_attribution(moe, batches(), criteria=["frequency", "reap"], task="demo-task", progress=False)
    path = directory.parent / "attribution.json"
    attribution.save(path)
    return directory, path


def logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_pruned_model_computes_the_masked_function_of_the_same_plan(parent, tmp_path):
    directory, attribution_path = parent
    summary = prune_model(directory, attribution_path, tmp_path / "out", keep=3, criterion="reap", with_tokenizer=False)

    original = load_moe(directory, with_tokenizer=False)
    expected_plan = make_plan(scores(summary_attribution(attribution_path), "reap"), original.layers, keep=3)
    assert summary.plan.kept == expected_plan.kept
    input_ids, attention_mask = padded_batch(seed=7, length=12)
    with original.mask_experts(expected_plan.keep_sets()):
        masked = logits(original.model, input_ids, attention_mask)
    pruned = load_moe(tmp_path / "out", with_tokenizer=False)
    assert pruned.num_experts == [3, 3]
    assert (logits(pruned.model, input_ids, attention_mask) - masked).abs().max().item() <= 1e-5


def summary_attribution(path):
    from moeguard.attribution import Attribution

    return Attribution.load(path)


def test_manifest_and_summary_say_what_was_kept_and_saved(parent, tmp_path):
    directory, attribution_path = parent
    summary = prune_model(directory, attribution_path, tmp_path / "out", keep=4, protect=[(1, 0)], with_tokenizer=False)
    manifest = PruneManifest.load(tmp_path / "out" / MANIFEST_NAME)
    assert manifest.parent_fingerprint == load_moe(directory, with_tokenizer=False).fingerprint()
    assert manifest.parent_fingerprint_kind == "model"
    assert manifest.kept == summary.plan.kept and 0 in manifest.kept[1]
    assert manifest.selection["criterion"] == "frequency" and manifest.selection["keep"] == 4
    assert manifest.selection["attribution"] == str(attribution_path) and manifest.selection["task"] == "demo-task"
    assert summary.before.total > summary.after.total
    assert summary.compression_ratio == pytest.approx(summary.before.total / summary.after.total)
    # top-2 of 8 -> top-2 of 4: a token passes through the same experts' worth of parameters;
    # only the 4 dropped router rows of 64 weights per layer are gone
    assert summary.before.active_per_token - summary.after.active_per_token == 4 * 64 * 2
    text = summary.describe()
    assert "MoE layer  0: 4/8 experts kept" in text and "x smaller" in text and "active per token" in text


def test_an_attribution_of_another_model_is_refused(parent, tmp_path):
    _, attribution_path = parent
    other = tiny_moe("qwen3_moe", seed=1)
    with pytest.raises(FingerprintMismatchError, match="weights differ"):
        prune_model(other, attribution_path, tmp_path / "out", keep=4)
    assert not (tmp_path / "out").exists()


def test_a_non_uniform_plan_cannot_be_pruned_physically(parent, tmp_path):
    directory, attribution_path = parent
    with pytest.raises(PlanError, match="same number of experts kept in every MoE layer.*mask mode"):
        prune_model(directory, attribution_path, tmp_path / "out", budget=9, with_tokenizer=False)


def test_streaming_cli_prune_writes_what_the_in_memory_cli_prune_writes(parent, tmp_path, capsys):
    directory, attribution_path = parent
    common = ["prune", "--model", str(directory), "--attribution", str(attribution_path), "--keep", "4",
              "--criterion", "reap", "--protect", "0:7"]
    assert main(["-q", *common, "--out", str(tmp_path / "memory")]) == 0
    printed = capsys.readouterr().out
    assert "4/8 experts kept" in printed and "parameters:" in printed
    assert main(["-q", *common, "--out", str(tmp_path / "stream"), "--streaming", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["streaming"] and report["parent_fingerprint_kind"] == "checkpoint"

    def stored(d):
        return {k: v for p in sorted(d.glob("*.safetensors")) for k, v in load_file(str(p)).items()}

    a, b = stored(tmp_path / "memory"), stored(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    memory_manifest = PruneManifest.load(tmp_path / "memory" / MANIFEST_NAME)
    stream_manifest = PruneManifest.load(tmp_path / "stream" / MANIFEST_NAME)
    assert memory_manifest.kept == stream_manifest.kept and 7 in stream_manifest.kept[0]


def test_streaming_needs_an_attribution_that_knows_the_checkpoint(parent, tmp_path, capsys):
    directory, _ = parent
    in_memory = tiny_moe("qwen3_moe")  # same weights, but not loaded from a directory
    attribution = collect_attribution(in_memory, batches(1), criteria=["frequency"], progress=False)
    assert attribution.checkpoint_fingerprint is None
    path = tmp_path / "no_checkpoint.json"
    attribution.save(path)
    code = main(["prune", "--model", str(directory), "--attribution", str(path), "--keep", "4",
                 "--out", str(tmp_path / "out"), "--streaming"])
    assert code == 2
    assert "needs the checkpoint fingerprint" in capsys.readouterr().err


def test_bad_protect_text_is_refused_with_the_expected_form(parent, tmp_path, capsys):
    directory, attribution_path = parent
    code = main(["prune", "--model", str(directory), "--attribution", str(attribution_path), "--keep", "4",
                 "--protect", "0-3", "--out", str(tmp_path / "out")])
    assert code == 2 and "LAYER:EXPERT pairs" in capsys.readouterr().err
