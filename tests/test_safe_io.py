"""Nothing moeguard writes can touch an input; nothing it reads runs code or loads half a model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_moe
from moeguard.cli import main
from moeguard.data import build_char_tokenizer
from moeguard.errors import InputError, ModelError
from moeguard.io import check_output, refuse_overlap
from moeguard.models import PruneManifest, load_moe


@pytest.fixture
def model_dir(tmp_path):
    moe = tiny_moe("qwen3_moe", vocab=len(build_char_tokenizer()))
    moe.tokenizer = build_char_tokenizer()
    return moe.save(tmp_path / "model")


# ---------------------------------------------------------------- outputs never touch inputs
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_whatever_overwrite_says(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for out, relation in ((model, "is the input"), (tmp_path / "models", "contains the input"),
                          (model / "sub", "lies inside the input")):
        for overwrite in (False, True):
            with pytest.raises(InputError, match=relation) as refused:
                check_output(out, inputs=[model], overwrite=overwrite, directory=True)
            assert "overwrite" not in str(refused.value)  # no advice to force it
    check_output(tmp_path / "models" / "other", inputs=[model], directory=True)  # a sibling is fine


def test_a_symlink_to_an_input_is_the_input(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(data)
    with pytest.raises(InputError, match="is the input"):
        refuse_overlap([tmp_path / "link.jsonl"], [data])


def test_overwrite_replaces_only_a_model_directory_and_never_the_wrong_kind(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no model"):
        check_output(notes, overwrite=True, directory=True)
    with pytest.raises(InputError, match="is a directory; give a file path"):
        check_output(notes, overwrite=True)
    with pytest.raises(InputError, match="is a file, not a directory"):
        check_output(notes / "todo.txt", overwrite=True, directory=True)
    with pytest.raises(InputError, match="nothing can be written inside it"):
        check_output(notes / "todo.txt" / "out.json")


def test_prune_and_save_refuse_to_replace_the_model_they_read(model_dir, tmp_path):
    from moeguard.attribution import attribute
    from moeguard.data import load_task
    from moeguard.pruning.prune import prune_model

    moe = load_moe(model_dir)
    attribution = attribute(moe, load_task("upper", "train", limit=4), criteria=["frequency"], progress=False,
                            out=tmp_path / "a.json").attribution
    before = (model_dir / "model.safetensors").read_bytes()
    for out in (model_dir, model_dir.parent):
        with pytest.raises(InputError, match="is the input|contains the input"):
            prune_model(moe, attribution, out, keep=4, overwrite=True)
        with pytest.raises(InputError, match="is the input|contains the input"):
            prune_model(str(model_dir), tmp_path / "a.json", out, keep=4, overwrite=True, streaming=True)
    with pytest.raises(InputError, match="is the input"):
        moe.save(model_dir, overwrite=True)
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_attribute_checks_its_tensor_file_before_any_work(model_dir, tmp_path, monkeypatch):
    from moeguard.attribution import attribute
    from moeguard.data import load_task

    (tmp_path / "a.safetensors").write_text("someone else's")
    monkeypatch.setattr("moeguard.attribution.run.collect_attribution", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(InputError, match="a.safetensors already exists"):
        attribute(load_moe(model_dir), load_task("upper", "train", limit=4), out=tmp_path / "a.json", progress=False)
    assert (tmp_path / "a.safetensors").read_text() == "someone else's"


def test_data_export_and_detect_follow_the_overwrite_rule(tmp_path, capsys):
    out = tmp_path / "upper.jsonl"
    assert main(["data", "export", "--task", "upper", "--limit", "3", "--out", str(out)]) == 0
    first = out.read_text()
    assert main(["data", "export", "--task", "upper", "--limit", "5", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == first
    assert main(["data", "export", "--task", "upper", "--limit", "5", "--out", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 5


# ---------------------------------------------------------------- reading: no pickles, no half models
def test_pickle_weights_are_refused_unless_explicitly_allowed(model_dir, capsys):
    weights = load_file(model_dir / "model.safetensors")
    torch.save(weights, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="pickle.*allow_pickle_weights=True"):
        load_moe(model_dir)
    assert main(["inspect", "--model", str(model_dir)]) == 2
    assert "--allow-pickle-weights" in capsys.readouterr().err
    allowed = load_moe(model_dir, allow_pickle_weights=True)
    assert allowed.fingerprint() == load_moe(model_dir, allow_pickle_weights=True).fingerprint()
    assert main(["inspect", "--model", str(model_dir), "--allow-pickle-weights"]) == 0


def test_missing_unexpected_and_mismatched_tensors_are_errors_naming_them(model_dir):
    weights = load_file(model_dir / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "layers.0.mlp.experts" not in k}
    save_file({**kept, "model.stray.weight": torch.zeros(2)}, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"2 missing \(model\.layers\.0\.mlp\.experts\.down_proj, .*1 unexpected \(model\.stray"):
        load_moe(model_dir)


def test_a_damaged_weights_file_is_a_clear_error(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="damaged"):
        load_moe(model_dir)


# ---------------------------------------------------------------- manifests are validated on read
def pruned_manifest(model_dir, tmp_path) -> tuple:
    moe = load_moe(model_dir)
    moe.prune({0: [0, 2, 4, 6], 1: [1, 3, 5, 7]})
    out = moe.save(tmp_path / "pruned")
    return out, json.loads((out / "moeguard_manifest.json").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["kept"][0].__setitem__(3, 0), r"kept\[0\] lists experts \[0\] more than once"),
        (lambda m: m["kept"][1].__setitem__(3, 8), r"kept\[1\] lists experts \[8\], but the parent layer has 8"),
        (lambda m: m["kept"][1].__setitem__(3, "7"), r"kept\[1\] must be a non-empty list of expert indices"),
        (lambda m: m.update(parent_num_experts=[8]), r"kept must be a list of 1 lists"),
        (lambda m: m["layer_paths"].__setitem__(1, "model.layers/../x"), "layer_paths must list one module path"),
        (lambda m: m.update(parent_model="/x\nmodel"), "parent_model must be a model path or hub id"),
        (lambda m: m.update(parent_fingerprint_kind="file"), "parent_fingerprint_kind must be one of model, checkpoint"),
        (lambda m: m.update(format=9), "manifest format 9"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_field(model_dir, tmp_path, change, message):
    _, data = pruned_manifest(model_dir, tmp_path)
    change(data)
    with pytest.raises(InputError, match=message):
        PruneManifest.from_dict(data, source="m.json")


def test_a_manifest_that_does_not_describe_its_model_is_refused_on_load(model_dir, tmp_path):
    out, data = pruned_manifest(model_dir, tmp_path)
    data["kept"] = [k + [max(set(range(8)) - set(k))] for k in data["kept"]]  # five kept, but the model holds four
    (out / "moeguard_manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="keeps 5 experts by the manifest, but the model's layer has 4"):
        load_moe(out)


# ---------------------------------------------------------------- every written model stands alone
@pytest.mark.slow
def test_every_model_directory_moeguard_writes_loads_with_stock_auto_classes(model_dir, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attribution, files = tmp_path / "a.json", ["config.json", "generation_config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json"]
    run = [["attribute", "--model", str(model_dir), "--task", "upper", "--samples", "8", "--out", str(attribution)]]
    written = {
        "prune": ["prune", "--model", str(model_dir), "--attribution", str(attribution), "--keep", "4"],
        "prune --streaming": ["prune", "--model", str(model_dir), "--attribution", str(attribution), "--keep", "4",
                              "--streaming"],
        "harden": ["harden", "--model", str(model_dir), "--tasks", "upper", "--steps", "2", "--train-examples", "16",
                   "--eval-examples", "4", "--batch-size", "4"],
        "zoo train": ["zoo", "train", "--steps", "2", "--layers", "1", "--hidden", "32", "--tasks", "upper"],
    }
    for argv in run:
        assert main(["-q", *argv, "--device", "cpu"]) == 0
    outputs = {}
    for name, argv in written.items():
        outputs[name] = tmp_path / name.replace(" ", "_").replace("--", "")
        device = [] if argv[0] == "zoo" else ["--device", "cpu"]
        assert main(["-q", *argv, *device, "--out", str(outputs[name])]) == 0, name
    outputs["realign"] = tmp_path / "realign"
    assert main(["-q", "realign", "--model", str(outputs["prune"]), "--task", "upper", "--budget", "4", "--rounds", "2",
                 "--steps-per-round", "2", "--pool-size", "8", "--test-size", "4", "--other-tasks", "none",
                 "--device", "cpu", "--out", str(outputs["realign"])]) == 0
    outputs["realign"] = outputs["realign"] / "model"
    for name, directory in outputs.items():
        present = sorted(os.listdir(directory))
        assert set(files) <= set(present), (name, present)
        if name.startswith(("prune", "realign")):
            assert "moeguard_manifest.json" in present, name
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ids = tokenizer("up ab=", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape[-1] == len(tokenizer), name
