"""Attribution files, their refusals, heatmaps and the ``moeguard attribute`` command."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import padded_batch, tiny_moe
from moeguard.attribution import Attribution, available_criteria, check_fingerprint, collect_attribution, scores
from moeguard.attribution.figures import save_heatmaps
from moeguard.attribution.record import tensors_path
from moeguard.cli import main
from moeguard.data import build_char_tokenizer
from moeguard.errors import FingerprintMismatchError, InputError
from moeguard.models import load_moe

# Tiny models gain nothing from a second thread, and on a busy machine two threads stall each other.
pytestmark = pytest.mark.usefixtures("one_thread")


def small_attribution(family="mixtral", **kwargs) -> tuple[Attribution, object]:
    moe = tiny_moe(family)
    input_ids, attention_mask = padded_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    return collect_attribution(moe, [batch, batch], progress=False, task="toy", **kwargs), moe


def test_save_and_load_give_back_every_statistic(tmp_path):
    attribution, _ = small_attribution(criteria=["frequency", "reap", "ean", "ablation"])
    path = attribution.save(tmp_path / "toy.json")
    assert tensors_path(path).is_file()
    loaded = Attribution.load(path)
    assert set(loaded.sums) == set(attribution.sums)
    for name, value in attribution.sums.items():
        assert torch.equal(loaded.sums[name], value), name
    assert torch.equal(loaded.coactivation, attribution.coactivation)
    for field in ("model_fingerprint", "model_source", "model_type", "task", "tokens", "num_experts", "top_k", "expert_ids", "batches"):
        assert getattr(loaded, field) == getattr(attribution, field), field
    for criterion in available_criteria(attribution):
        assert torch.equal(scores(loaded, criterion), scores(attribution, criterion))
    # The JSON is readable on its own: per-layer totals and the counts.
    data = json.loads(path.read_text())
    assert data["samples"] == 6 and data["token_counts"] == attribution.token_counts
    assert data["layers"][1]["routed"] == attribution.total("routed")[1].tolist()
    assert data["model"]["fingerprint"] == attribution.model_fingerprint


def test_an_attribution_is_refused_for_a_model_with_other_weights():
    attribution, moe = small_attribution()
    check_fingerprint(attribution, moe)  # the same model: accepted
    with torch.no_grad():
        moe.layers[0].router.weight[0, 0] += 1.0
    expected = rf"computed on model {attribution.model_fingerprint[:12]} .* but this model is {moe.fingerprint()[:12]}"
    with pytest.raises(FingerprintMismatchError, match=expected):
        check_fingerprint(attribution, moe)


def test_tensors_from_another_run_are_refused(tmp_path):
    first, _ = small_attribution()
    second, _ = small_attribution(family="olmoe")
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    tensors_path(tmp_path / "b.json").replace(tensors_path(tmp_path / "a.json"))
    with pytest.raises(InputError, match="does not belong to .*a.json"):
        Attribution.load(tmp_path / "a.json")


def test_files_that_are_not_attributions_are_refused(tmp_path):
    (tmp_path / "other.json").write_text('{"parent_fingerprint": "x"}')
    with pytest.raises(InputError, match="not a moeguard attribution"):
        Attribution.load(tmp_path / "other.json")
    with pytest.raises(InputError, match="does not exist"):
        Attribution.load(tmp_path / "missing.json")
    attribution, _ = small_attribution()
    attribution.save(tmp_path / "a.json")
    tensors_path(tmp_path / "a.json").unlink()
    with pytest.raises(InputError, match="which does not exist; copy both files together"):
        Attribution.load(tmp_path / "a.json")


def test_heatmaps_are_written_per_criterion_as_png(tmp_path):
    attribution, _ = small_attribution(criteria=["frequency", "reap", "ablation"])
    paths = save_heatmaps(attribution, tmp_path / "figures")
    assert [p.name for p in paths] == [f"toy_{c}.png" for c in ("frequency", "gate_mass", "reap", "ean", "ablation")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


# ---------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Mixtral with the task tokenizer, saved as a model directory."""
    moe = tiny_moe("mixtral")
    moe.tokenizer = build_char_tokenizer()
    return moe.save(tmp_path_factory.mktemp("models") / "tiny")


def test_attribute_command_writes_a_reloadable_attribution_and_figures(model_dir, tmp_path, capsys):
    out = tmp_path / "addition.json"
    code = main(["attribute", "--model", str(model_dir), "--task", "addition", "--samples", "12", "--tokens", "answer",
                 "--batch-size", "4", "--out", str(out), "--figures", str(tmp_path / "figures")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "addition: 12 samples" in printed and "effective experts" in printed
    attribution = Attribution.load(out)
    assert attribution.task == "addition" and attribution.tokens == "answer" and attribution.samples == 12
    assert attribution.model_fingerprint == load_moe(model_dir).fingerprint()
    assert set(available_criteria(attribution)) == {"frequency", "gate_mass", "reap", "ean", "random"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        f"addition_{c}.png" for c in sorted(("frequency", "gate_mass", "reap", "ean"))
    ]
    summary = json.loads(out.read_text())["summary"]
    assert len(summary["effective_experts"]) == 2 and set(summary["stability"]) == {"frequency", "gate_mass", "reap", "ean"}
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_attribute_command_reports_overlap_with_other_tasks(model_dir, tmp_path, capsys):
    first = tmp_path / "reverse.json"
    assert main(["attribute", "--model", str(model_dir), "--task", "reverse", "--samples", "6", "--out", str(first)]) == 0
    capsys.readouterr()
    second = tmp_path / "upper.json"
    assert main(["attribute", "--model", str(model_dir), "--task", "upper", "--samples", "6", "--out", str(second),
                 "--compare", str(first), "--json"]) == 0
    overlap = json.loads(capsys.readouterr().out)["overlap"]["reverse"]
    assert len(overlap) == 2 and all(0 <= v <= 1 for v in overlap)


def test_attribute_command_reads_jsonl_data_and_measures_ablation(model_dir, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}=", "answer": str(i)}) for i in range(5)) + "\n")
    out = tmp_path / "mine.json"
    assert main(["attribute", "--model", str(model_dir), "--data", str(data), "--criteria", "frequency", "--ablation",
                 "--out", str(out)]) == 0
    attribution = Attribution.load(out)
    assert attribution.task == "mine" and attribution.samples == 5
    assert "ablation" in available_criteria(attribution) and "reap" not in available_criteria(attribution)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "addition", "--criteria", "frequency,rep"], "unknown criteria ['rep']; choose from frequency"),
        (["--task", "nosuchtask"], "nosuchtask"),
        (["--data", "LM", "--tokens", "answer"], "plain text (lm); use --tokens all"),
        (["--data", "EMPTY"], "no examples"),
        (["--task", "addition", "--samples", "0"], "--samples must be a positive integer"),
    ],
)
def test_attribute_command_errors_are_clear(model_dir, tmp_path, capsys, arguments, message):
    (tmp_path / "lm.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    arguments = [{"LM": str(tmp_path / "lm.jsonl"), "EMPTY": str(tmp_path / "empty.jsonl")}.get(a, a) for a in arguments]
    code = main(["attribute", "--model", str(model_dir), *arguments, "--out", str(tmp_path / "x.json")])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_attribute_command_refuses_to_overwrite_and_to_compare_other_models(model_dir, tmp_path, capsys):
    out = tmp_path / "a.json"
    args = ["attribute", "--model", str(model_dir), "--task", "sort", "--samples", "4", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists; choose another output path or pass --overwrite" in capsys.readouterr().err
    foreign, _ = small_attribution(family="olmoe")
    foreign.save(tmp_path / "foreign.json")
    assert main([*args, "--overwrite", "--compare", str(tmp_path / "foreign.json")]) == 2
    assert "the attribution" in capsys.readouterr().err
