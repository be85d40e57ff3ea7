"""Bad input gets a clear, specific error; fingerprints identify weights."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import tiny_moe
from moeguard.errors import ModelError, PlanError, UnsupportedModelError
from moeguard.models import MoEModel, load_moe


def test_a_dense_model_is_refused_as_not_moe():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="no sparse Mixture-of-Experts block.*dense"):
        MoEModel.from_model(dense)


def test_an_unsupported_family_is_named():
    from transformers import AutoConfig

    config = AutoConfig.for_model("deepseek_v4")
    model = torch.nn.Module()
    model.config = config
    with pytest.raises(UnsupportedModelError, match="deepseek_v4.*hash"):
        MoEModel.from_model(model)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({0: [3]}, r"layer 0: keeping 1 experts, but every token is routed to top_k=2"),
        ({0: [0, 8]}, r"layer 0: expert indices \[8\] are out of range; this layer has 8 experts"),
        ({0: [1, 1, 2]}, r"layer 0: expert indices \[1\] are listed more than once"),
        ({5: [0, 1]}, r"names MoE layer 5, but the model has 2 MoE layers"),
        ({0: [0, 1.5]}, r"expert index 1.5 is not an integer"),
    ],
)
def test_invalid_keep_sets_are_refused(plan, message):
    moe = tiny_moe("mixtral")
    with pytest.raises(PlanError, match=message):
        with moe.mask_experts(plan):
            pass
    with pytest.raises(PlanError, match=message):
        moe.prune(plan)


def test_group_infeasible_keep_sets_are_refused():
    moe = tiny_moe("deepseek_v3")
    with pytest.raises(PlanError, match=r"same number of experts kept in every group.*\[3, 1\]"):
        moe.prune({0: [0, 1, 2, 4], 1: [0, 1, 2, 4]})
    top2 = tiny_moe("deepseek_v3", top_k=2)
    with pytest.raises(PlanError, match="scores each of its 2 groups by the group's 2 best experts"):
        with top2.mask_experts({0: [0, 4]}):
            pass
    one_group_per_token = tiny_moe("deepseek_v3", top_k=4, groups_per_token=1)
    with pytest.raises(PlanError, match="picks 1 groups and then 4 experts"):
        one_group_per_token.prune({0: [0, 1, 4, 5], 1: [0, 1, 4, 5]})


def test_non_uniform_physical_prune_is_refused_with_the_reason():
    moe = tiny_moe("qwen2_moe")
    with pytest.raises(PlanError, match="same number of experts kept in every MoE layer.*mask mode"):
        moe.prune({0: [0, 1, 2, 3], 1: [0, 1, 2]})
    with pytest.raises(PlanError, match="same number of experts kept in every MoE layer"):
        moe.prune({0: [0, 1, 2, 3]})  # layer 1 keeps all 8


def test_masks_cannot_nest_or_be_pruned_inside():
    moe = tiny_moe("mixtral")
    with moe.mask_experts({0: [0, 1, 2]}):
        with pytest.raises(Exception, match="cannot be nested"):
            with moe.mask_experts({1: [0, 1, 2]}):
                pass
        with pytest.raises(Exception, match="cannot prune inside a mask_experts block"):
            moe.prune({0: [0, 1], 1: [0, 1]})


def test_missing_path_and_non_model_directory_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_moe(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model directory: it has no config.json"):
        load_moe(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, not a model directory"):
        load_moe(tmp_path / "file.bin")


def test_a_failed_save_leaves_no_output_directory(tmp_path, monkeypatch):
    moe = tiny_moe("mixtral")
    moe.prune({0: [0, 1, 2], 1: [3, 4, 5]})

    def half_written(self, directory, **kwargs):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(type(moe.model), "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        moe.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_saving_over_an_existing_directory_needs_overwrite(tmp_path):
    moe = tiny_moe("olmoe")
    moe.save(tmp_path / "m")
    with pytest.raises(Exception, match="already exists"):
        moe.save(tmp_path / "m")
    moe.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    moe = tiny_moe("gpt_oss")
    first = moe.fingerprint()
    assert copy.deepcopy(moe).fingerprint() == first
    moe.save(tmp_path / "m")
    assert load_moe(tmp_path / "m").fingerprint() == first
    with torch.no_grad():
        moe.layers[1].experts.down_proj[3, 0, 0] += 1e-3
    assert moe.fingerprint() != first
    with torch.no_grad():
        moe.layers[1].experts.down_proj[3, 0, 0] -= 1e-3
    assert moe.fingerprint() == first


def test_parameter_counts_split_total_and_active():
    moe = tiny_moe("mixtral")
    counts = moe.parameter_counts()
    per_expert = counts.per_expert[0]
    assert counts.routed_experts == sum(per_expert * 8 for _ in moe.layers)
    assert counts.total - counts.active_per_token == sum((8 - 2) * per_expert for _ in moe.layers)
    moe.prune({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    assert moe.parameter_counts().total == counts.total - sum(4 * (per_expert + moe.config.hidden_size) for _ in moe.layers)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_a_weight_sharing_copy_costs_only_the_experts_carved_out_of_it(family):
    from moeguard.forensics.derivatives import reindex_experts

    moe = tiny_moe(family)
    before = moe.fingerprint()
    storage = {name: p.data_ptr() for name, p in moe.model.named_parameters()}
    carved = moe.weight_sharing_copy()
    assert all(p.data_ptr() == storage[name] for name, p in carved.model.named_parameters())
    reindex_experts(carved, [[0, 1, 4, 5]] * moe.num_layers)  # two per group for the grouped router
    assert moe.fingerprint() == before and carved.num_experts == [4] * moe.num_layers
    new = [p for name, p in carved.model.named_parameters() if p.data_ptr() != storage[name]]
    expert_indexed = {id(t.get()) for layer in carved.layers for t in layer.expert_tensors}
    assert new and all(id(p) in expert_indexed for p in new)  # everything not sliced is still the original tensor
