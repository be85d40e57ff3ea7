"""The two students of the head start: a carved copy and a fresh model of the carved architecture."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_moe
from moeguard.attack.students import carve, carved_architecture, reinit_routers, scratch_student, uniform_keep_sets
from moeguard.models import load_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def shapes(moe):
    return {name: tuple(p.shape) for name, p in moe.model.named_parameters()}


def test_a_carve_is_a_pruned_copy_and_leaves_the_model_untouched(family):
    moe = tiny_moe(family)
    before = moe.fingerprint()
    keep = uniform_keep_sets(moe, moe.top_k[0])
    carved = carve(moe, keep)
    assert moe.fingerprint() == before
    assert carved.num_experts == [moe.top_k[0]] * moe.num_layers
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), moe.mask_experts(keep):
        masked = moe.model(input_ids=ids).logits
    torch.testing.assert_close(carved.model(input_ids=ids).logits, masked)


def test_a_scratch_student_has_the_carved_architecture_and_a_fresh_seeded_initialisation(family):
    moe = tiny_moe(family)
    architecture = carved_architecture(moe, moe.top_k[0])
    student = scratch_student(architecture, seed=5)
    assert type(student.model) is type(architecture.model)
    assert shapes(student) == shapes(architecture)
    assert student.config.to_dict() == architecture.config.to_dict()
    assert student.num_experts == architecture.num_experts and student.top_k == architecture.top_k
    again, other = scratch_student(architecture, seed=5), scratch_student(architecture, seed=6)
    assert again.fingerprint() == student.fingerprint() != other.fingerprint()


def test_a_scratch_student_holds_none_of_the_trained_parents_weights(trained_tiny):
    parent = load_moe(trained_tiny)
    architecture = carved_architecture(parent, 2)
    student = scratch_student(architecture, seed=0)
    assert student.tokenizer is parent.tokenizer
    carved = dict(architecture.model.named_parameters())
    for name, param in student.model.named_parameters():
        assert not torch.equal(param, carved[name]), f"{name} was copied from the parent"
        if param.ndim >= 2:  # not even correlated with the trained tensor
            correlation = torch.corrcoef(torch.stack([param.detach().flatten(), carved[name].detach().flatten()]))[0, 1]
            assert abs(float(correlation)) < 0.2, name


def test_router_reinitialisation_changes_the_routers_and_nothing_else():
    moe = tiny_moe("qwen3_moe")
    before = {name: p.clone() for name, p in moe.model.named_parameters()}
    routers = {id(p) for layer in moe.layers for p in layer.router_parameters()}
    reinit_routers(moe, seed=3)
    for name, param in moe.model.named_parameters():
        assert torch.equal(param, before[name]) != (id(param) in routers), name
