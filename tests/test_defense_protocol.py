"""The selective fine-tuning protocol: parameter groups, the protocol file, the verifier."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_moe

from moeguard.cli import main
from moeguard.defense.parameter_groups import group_parameters, parameter_groups
from moeguard.defense.protocol import Protocol, make_protocol
from moeguard.defense.verify import verify_fine_tune
from moeguard.errors import FingerprintMismatchError, InputError
from moeguard.models import MoEModel
from moeguard.models.random_init import random_moe


def kinds(report):
    return sorted({v.kind for v in report.violations})


def test_parameter_groups_give_every_tensor_exactly_one_role(family):
    moe = tiny_moe(family)
    groups = parameter_groups(moe)
    names = [name for members in groups.values() for name in members]
    assert sorted(names) == sorted(moe.model.state_dict())
    assert len(names) == len(set(names))
    for layer in moe.layers:
        assert {t.name for t in layer.tensors("router")} <= set(groups["router"])
        assert {t.name for t in layer.tensors("experts")} <= set(groups["experts"])
    embeddings = {id(moe.model.get_input_embeddings().weight), id(moe.model.get_output_embeddings().weight)}
    state = moe.model.state_dict(keep_vars=True)
    assert {id(state[name]) for name in groups["embeddings"]} == embeddings
    assert groups["attention"] and groups["norms"]
    assert all(state[name].ndim == 1 for name in groups["norms"])
    assert "other" not in groups


def test_shared_experts_and_dense_layers_get_their_own_groups():
    groups = parameter_groups(tiny_moe("deepseek_v3"))
    assert all(".mlp.shared_experts." in name for name in groups["shared_experts"])
    # DeepSeek-V3's first decoder layer is dense.
    assert groups["dense_mlp"] and all(name.startswith("model.layers.0.mlp.") for name in groups["dense_mlp"])


def fine_tune(moe: MoEModel, groups, steps: int = 3) -> None:
    """A few real optimizer steps of next-token loss on random tokens, training ``groups`` only."""
    optimizer = torch.optim.SGD(group_parameters(moe, groups), lr=0.5)
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = moe.model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def released():
    moe = tiny_moe("mixtral")
    return moe, make_protocol(moe, ["router", "attention"])


def test_a_fine_tune_of_the_permitted_groups_is_compliant(released):
    parent, protocol = released
    model = copy.deepcopy(parent)
    fine_tune(model, ["router", "attention"])
    report = verify_fine_tune(model, protocol, parent)
    assert report.compliant, report.summary()
    assert any("self_attn" in name for name in report.changed_permitted)
    assert report.expert_map == [list(range(8)), list(range(8))]


def test_a_changed_frozen_tensor_is_reported_with_its_group_and_size(released):
    parent, protocol = released
    model = copy.deepcopy(parent)
    fine_tune(model, ["router", "norms"])
    report = verify_fine_tune(model, protocol, parent)
    assert kinds(report) == ["frozen_changed"]
    assert {v.group for v in report.violations} == {"norms"}
    assert all("relative change" in v.message for v in report.violations)


def test_a_changed_expert_is_reported_by_layer_and_index(released):
    parent, protocol = released
    model = copy.deepcopy(parent)
    with torch.no_grad():
        model.layers[1].experts.down_proj[5].mul_(1.5)
    report = verify_fine_tune(model, protocol)  # hashes alone suffice
    assert [(v.kind, v.group, v.layer, v.experts) for v in report.violations] == [("frozen_changed", "experts", 1, [5])]


def test_physically_removed_experts_are_named_with_or_without_the_parent():
    parent = tiny_moe("deepseek_v3")
    protocol = make_protocol(parent)
    model = copy.deepcopy(parent)
    model.prune({0: [0, 2, 4, 6], 1: [1, 2, 5, 6]})
    for given_parent in (parent, None):
        report = verify_fine_tune(model, protocol, given_parent)
        assert kinds(report) == ["experts_removed"], report.summary()
        assert [v.experts for v in report.violations] == [[1, 3, 5, 7], [0, 3, 4, 7]]
        assert report.expert_map == [[0, 2, 4, 6], [1, 2, 5, 6]]


def test_removed_experts_are_found_even_after_the_survivors_were_retrained(released):
    parent, protocol = released
    model = copy.deepcopy(parent)
    model.prune({0: [1, 2, 3, 7], 1: [0, 4, 5, 6]})
    fine_tune(model, ["experts"])
    report = verify_fine_tune(model, protocol, parent)
    assert report.expert_map == [[1, 2, 3, 7], [0, 4, 5, 6]]
    assert kinds(report) == ["experts_removed", "frozen_changed"]
    assert {v.group for v in report.violations if v.kind == "frozen_changed"} == {"experts"}


def test_reordered_experts_are_reported_although_the_function_is_unchanged(released):
    parent, protocol = released
    model = copy.deepcopy(parent)
    order = torch.tensor([3, 0, 1, 2, 4, 5, 6, 7])
    with torch.no_grad():
        for ref in model.layers[0].expert_tensors:
            ref.get().copy_(ref.get().index_select(ref.dim, order))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.model(input_ids=ids).logits, parent.model(input_ids=ids).logits)
    report = verify_fine_tune(model, protocol)
    assert kinds(report) == ["experts_reordered"]
    assert report.violations[0].layer == 0 and report.expert_map[0] == order.tolist()


def test_added_experts_and_a_changed_top_k_are_reported(released):
    parent, protocol = released
    grown = random_moe("mixtral", experts=10, top_k=1, seed=3)
    state = parent.model.state_dict()
    with torch.no_grad():
        for name, tensor in grown.model.state_dict().items():
            source = state[name]
            if tensor.shape == source.shape:
                tensor.copy_(source)
            else:  # the expert-indexed tensors: the first 8 experts are the parent's
                tensor.narrow(0, 0, 8).copy_(source)
    report = verify_fine_tune(grown, protocol, parent)
    assert kinds(report) == ["experts_added", "routing_changed"]
    assert [v.experts for v in report.violations if v.kind == "experts_added"] == [[8, 9], [8, 9]]


def test_a_protocol_is_refused_for_another_parent(released):
    _, protocol = released
    other = tiny_moe("mixtral", seed=5)
    with pytest.raises(FingerprintMismatchError, match="protocol was written for"):
        verify_fine_tune(other, protocol, other)


def test_the_protocol_round_trips_and_malformed_files_are_named(released, tmp_path):
    _, protocol = released
    path = protocol.save(tmp_path / "protocol.json")
    assert Protocol.load(path).to_dict() == protocol.to_dict()
    data = json.loads(path.read_text())
    data["permitted"] = ["router", "everything"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"'everything'.*valid groups"):
        Protocol.load(path)
    del data["layers"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="field 'layers' must be a list"):
        Protocol.load(path)
    with pytest.raises(InputError, match="unknown permitted group"):
        make_protocol(tiny_moe("mixtral"), ["routers"])


def test_verify_command_writes_a_protocol_then_passes_a_compliant_model_and_fails_a_pruned_one(released, tmp_path, capsys):
    parent, _ = released
    parent.save(tmp_path / "parent")
    compliant = copy.deepcopy(parent)
    fine_tune(compliant, ["attention"])
    compliant.save(tmp_path / "tuned")
    pruned = copy.deepcopy(parent)
    pruned.save(tmp_path / "pruned", pruned.prune({0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}))
    protocol = str(tmp_path / "protocol.json")
    common = ["verify", "--parent", str(tmp_path / "parent"), "--protocol", protocol]
    assert main([*common, "--write", "--permit", "router,attention"]) == 0
    assert main([*common, "--model", str(tmp_path / "tuned")]) == 0
    assert "COMPLIANT" in capsys.readouterr().out
    assert main([*common, "--model", str(tmp_path / "pruned"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["compliant"] is False
    assert [v["experts"] for v in report["violations"] if v["kind"] == "experts_removed"] == [[4, 5, 6, 7], [0, 1, 2, 3]]
    assert main([*common, "--write"]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def with_experts_permitted(path, *, rehash: bool, drop_group_hash: bool = False) -> None:
    """Edit a saved protocol the way a fine-tuner who changed an expert would: permit the experts."""
    from moeguard.defense.protocol import content_hash

    data = json.loads(path.read_text())
    data["permitted"].append("experts")
    if drop_group_hash:
        del data["group_hashes"]["experts"]
    if rehash:
        data["sha256"] = content_hash({k: v for k, v in data.items() if k != "sha256"})
    path.write_text(json.dumps(data))


def test_a_protocol_edited_to_permit_a_changed_expert_is_refused(released, tmp_path):
    parent, protocol = released
    tuned = copy.deepcopy(parent)
    fine_tune(tuned, ["experts"])
    assert not verify_fine_tune(tuned, protocol, parent).compliant
    path = protocol.save(tmp_path / "protocol.json")
    published = Protocol.load(path).sha256
    # A hand edit no longer matches the protocol's own hash.
    with_experts_permitted(path, rehash=False)
    with pytest.raises(InputError, match="changed after it was written"):
        Protocol.load(path)
    # Re-hashed, it contradicts itself: it still pins the experts it now permits.
    protocol.save(path)
    with_experts_permitted(path, rehash=True)
    with pytest.raises(InputError, match="the two disagree"):
        Protocol.load(path)
    # Made fully consistent, only the published hash can tell: the hash is no signature.
    protocol.save(path)
    with_experts_permitted(path, rehash=True, drop_group_hash=True)
    forged = Protocol.load(path)
    assert verify_fine_tune(tuned, forged, parent).compliant
    with pytest.raises(InputError, match="not the protocol that was published"):
        Protocol.load(path, expected_sha256=published)


def test_everything_but_the_permitted_groups_is_derived_from_the_parent_again(released, tmp_path):
    from moeguard.defense.protocol import content_hash

    parent, protocol = released
    path = protocol.save(tmp_path / "protocol.json")
    data = json.loads(path.read_text())
    data["layers"][1]["expert_hashes"].reverse()  # self-consistent, but not what the parent gives
    data["sha256"] = content_hash({k: v for k, v in data.items() if k != "sha256"})
    path.write_text(json.dumps(data))
    edited = Protocol.load(path)
    with pytest.raises(InputError, match="does not describe the parent model.*layers differ"):
        verify_fine_tune(parent, edited, parent)
    assert verify_fine_tune(parent, edited).compliant is False  # without the parent, the hashes alone decide
