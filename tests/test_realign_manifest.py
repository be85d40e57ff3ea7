"""A re-aligned model's manifest records what re-alignment did, and the record survives save, load and re-use."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_moe
from moeguard.cli import main
from moeguard.data import build_char_tokenizer
from moeguard.errors import InputError
from moeguard.models import MANIFEST_NAME, PruneManifest, RealignRecord, load_moe
from moeguard.realign import RealignConfig, builtin_data, realign

KEEP = {0: [1, 4, 6], 1: [0, 2, 7]}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    parent = tiny_moe("qwen3_moe")
    parent.tokenizer = build_char_tokenizer()
    parent.save(root / "parent")
    pruned = load_moe(root / "parent")
    pruned.prune(KEEP, selection={"criterion": "hand-picked", "keep": 3})
    pruned.save(root / "pruned")
    return root / "pruned"


def as_json(manifest: PruneManifest) -> str:
    """Compared as JSON: a random model scores 0, so retention is NaN, which is not equal to itself."""
    return json.dumps(manifest.to_dict(), sort_keys=True)


def data():
    return builtin_data("reverse", pool_size=16, test_size=4, other_size=0, other_tasks=[])


@pytest.mark.slow
def test_realign_records_scope_labels_steps_acquisition_and_both_fingerprints(pruned_dir, tmp_path):
    pruned = load_moe(pruned_dir)
    config = RealignConfig(budget=6, rounds=2, seed_size=3, acquisition="margin", scope="router", steps_per_round=2,
                           batch_size=4, lr=1e-2, seed=3, eval_batch_size=16)
    result = realign(pruned, data(), config, out=tmp_path / "run", progress=False)

    written = PruneManifest.load(tmp_path / "run" / "model" / MANIFEST_NAME)
    # What the prune recorded is kept as it was: re-alignment changes weights, not which experts exist.
    original = PruneManifest.load(pruned_dir / MANIFEST_NAME)
    assert (written.parent_fingerprint, written.kept, written.selection) == (
        original.parent_fingerprint, original.kept, original.selection)
    assert original.realign == [] and len(written.realign) == 1
    record = written.realign[0]
    assert isinstance(record, RealignRecord)
    assert (record.task, record.scope, record.acquisition, record.labels, record.budget, record.rounds) == (
        "reverse", "router", "margin", 6, 6, 2)
    assert record.steps == 4 == result.final.steps and record.tokens == result.final.tokens > 0
    assert (record.lr, record.seed, record.lora_rank) == (1e-2, 3, None)
    assert record.accuracy == result.final.accuracy and record.pruned_accuracy == result.pruned_accuracy
    assert record.data_signature == data().signature()
    # The record names the model it started from and the weights it wrote.
    assert record.parent_fingerprint == load_moe(pruned_dir).fingerprint() == result.model_fingerprint
    realigned = load_moe(tmp_path / "run" / "model")
    assert record.fingerprint == realigned.fingerprint() != record.parent_fingerprint
    # The in-memory model carries the same manifest as the one written.
    assert as_json(pruned.manifest) == as_json(written) == as_json(realigned.manifest)

    # Round trip through the dict and the JSON file.
    assert as_json(PruneManifest.from_dict(json.loads(json.dumps(written.to_dict())))) == as_json(written)

    # Re-aligning the re-aligned model (here from the command line) appends a second record linked to the first.
    code = main(["-q", "realign", "--model", str(tmp_path / "run" / "model"), "--task", "reverse", "--pool-size", "16",
                 "--test-size", "4", "--other-tasks", "none", "--budget", "4", "--rounds", "2", "--seed-size", "2",
                 "--acquisition", "random", "--train", "lora", "--lora-rank", "2", "--steps-per-round", "1",
                 "--out", str(tmp_path / "again")])
    assert code == 0
    twice = load_moe(tmp_path / "again" / "model").manifest
    assert [r.scope for r in twice.realign] == ["router", "lora"]
    assert json.dumps(twice.realign[0].to_dict()) == json.dumps(record.to_dict())
    second = twice.realign[1]
    assert second.parent_fingerprint == record.fingerprint and second.lora_rank == 2 and second.labels == 4
    assert second.fingerprint == load_moe(tmp_path / "again" / "model").fingerprint()
    assert twice.parent_fingerprint == original.parent_fingerprint  # retention is still against the unpruned parent


def test_mask_mode_writes_no_model_and_records_nothing():
    moe = tiny_moe("qwen3_moe")
    moe.tokenizer = build_char_tokenizer()
    config = RealignConfig(budget=4, rounds=2, seed_size=2, acquisition="random", scope="experts", steps_per_round=1,
                           batch_size=4)
    realign(moe, data(), config, keep=KEEP, progress=False)
    assert moe.manifest is None


def manifest_dict(**realign_fields):
    record = dict(parent_fingerprint="a" * 64, fingerprint="b" * 64, task="reverse", scope="all", acquisition="entropy",
                  labels=8, budget=8, rounds=2, steps=10, tokens=500, lr=1e-3, seed=0, unpruned_accuracy=1.0,
                  pruned_accuracy=0.0, accuracy=0.9, retention=0.9)
    record.update(realign_fields)
    return {"parent_fingerprint": "c" * 64, "parent_model": None, "parent_num_experts": [8], "kept": [[0, 1]],
            "layer_paths": ["model.layers.0.mlp"], "realign": [record]}


def test_a_manifest_without_realign_field_loads_with_an_empty_list():
    data = manifest_dict()
    del data["realign"]
    assert PruneManifest.from_dict(data).realign == []
    loaded = PruneManifest.from_dict(manifest_dict(lr=1))  # an integer where a float is expected is fine
    assert loaded.realign[0].lr == 1.0 and loaded.realign[0].parent_fingerprint_kind == "model"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(realign={"scope": "all"}), r"m\.json: field 'realign' must be a list .* got dict"),
        (lambda d: d["realign"].append("entropy"), r"m\.json: realign\[1\]: expected an object .* got str"),
        (lambda d: d["realign"][0].pop("steps"), r"m\.json: realign\[0\]: missing field 'steps'"),
        (lambda d: d["realign"][0].update(labels="8"), r"m\.json: realign\[0\]\.labels: expected int, got '8'"),
        (lambda d: d["realign"][0].update(labels=True), r"realign\[0\]\.labels: expected int, got True"),
        (lambda d: d["realign"][0].update(scope=None), r"realign\[0\]\.scope: expected str, got None"),
        (lambda d: d["realign"][0].update(lora_rank=2.5), r"realign\[0\]\.lora_rank: expected int \| None, got 2\.5"),
    ],
)
def test_a_malformed_realign_record_is_refused_naming_the_file_and_field(change, message):
    data = manifest_dict()
    change(data)
    with pytest.raises(InputError, match=message):
        PruneManifest.from_dict(data, source="m.json")
