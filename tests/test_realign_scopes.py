"""Trainable scopes: chosen by module role; what is outside stays bit-identical, what is inside changes."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import tiny_moe
from moeguard.data import batches, build_char_tokenizer, load_task
from moeguard.errors import InputError, UnsupportedModelError
from moeguard.models.random_init import FAMILIES
from moeguard.realign.scopes import (
    add_lora,
    attention_modules,
    frozen_digest,
    lora_targets,
    scope_parameters,
)
from moeguard.training import train

TOKENIZER = build_char_tokenizer()
KEEP = {0: [0, 2, 5], 1: [1, 3, 4]}
pytestmark = pytest.mark.usefixtures("one_thread")


def model(family: str = "qwen3_moe"):
    moe = tiny_moe(family)
    moe.tokenizer = TOKENIZER
    return moe


def few_steps(moe, params, *, steps: int = 2) -> None:
    stream = batches(TOKENIZER, load_task("reverse", "train", limit=8), batch_size=4, shuffle=True, epochs=None)
    train(moe, stream, steps=steps, lr=1e-2, parameters=list(params), progress=False)


def snapshot(moe) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in moe.model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_modules_are_the_callers_of_the_attention_kernel_in_every_family(family):
    moe = model(family)
    paths = attention_modules(moe.model)
    decoder_layers = moe.model.config.num_hidden_layers
    assert paths == [f"model.layers.{i}.self_attn" for i in range(decoder_layers)]
    assert moe.model.config._attn_implementation != "moeguard_attention_probe"  # restored


def test_scopes_select_parameters_by_role():
    moe = model()
    router = scope_parameters(moe, "router")
    assert set(router) == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    experts = scope_parameters(moe, "experts")
    assert all(p.ndim == 3 for p in experts.values()) and len(experts) == 4
    attention = scope_parameters(moe, "attention")
    assert attention and all(".self_attn." in name for name in attention)
    everything = scope_parameters(moe, "all")
    assert set(router) | set(experts) | set(attention) < set(everything)
    assert set(everything) == {name for name, _ in moe.model.named_parameters()}


@pytest.mark.parametrize("scope", ["router", "experts", "attention", "all"])
def test_training_a_scope_in_mask_mode_changes_it_and_nothing_else(scope):
    moe = model()
    trainable = scope_parameters(moe, scope)
    keep_sets = [KEEP[0], KEEP[1]]
    digest = frozen_digest(moe, trainable, keep_sets)
    before = snapshot(moe)
    with moe.mask_experts(KEEP):
        few_steps(moe, trainable.values())
    after = snapshot(moe)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(trainable)
    # The removed experts' slices of the router and expert tensors are untouched too.
    for layer, kept in zip(moe.layers, keep_sets):
        removed = [e for e in range(layer.num_experts) if e not in kept]
        for ref in layer.expert_tensors:
            index = torch.tensor(removed)
            assert torch.equal(before[ref.name].index_select(ref.dim, index), after[ref.name].index_select(ref.dim, index))
    assert frozen_digest(moe, trainable, keep_sets) == digest


def test_frozen_digest_notices_a_change_outside_the_scope_and_in_a_removed_expert():
    moe = model()
    trainable = scope_parameters(moe, "experts")
    digest = frozen_digest(moe, trainable, [KEEP[0], None])
    with torch.no_grad():
        moe.layers[0].experts.down_proj[1] += 1.0  # expert 1 is removed in layer 0
    assert frozen_digest(moe, trainable, [KEEP[0], None]) != digest
    assert frozen_digest(moe, trainable) == frozen_digest(moe, trainable)  # kept experts may change
    with torch.no_grad():
        moe.layers[1].router.weight[0, 0] += 1.0
    assert frozen_digest(moe, trainable) != frozen_digest(model(), scope_parameters(model(), "experts"))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_lora_adapts_attention_projections_and_fused_experts_and_merges_into_a_stock_model(family):
    moe = model(family)
    original = snapshot(moe)
    targets = lora_targets(moe)
    assert targets.modules and all(".self_attn." in path for path in targets.modules)
    assert targets.parameters and all(name.endswith(("gate_up_proj", "down_proj")) for name in targets.parameters)
    torch.manual_seed(0)
    flags = {name: p.requires_grad for name, p in moe.model.named_parameters()}
    lora = add_lora(moe, rank=2)
    adapters = lora.parameters
    assert adapters and all("lora_" in name for name in adapters)
    digest = frozen_digest(moe, adapters)
    before = {name: p.detach().clone() for name, p in adapters.items()}
    few_steps(moe, adapters.values(), steps=3)
    assert all(not torch.equal(before[n], p) for n, p in adapters.items() if "lora_B" in n)
    assert frozen_digest(moe, adapters) == digest  # base weights untouched while adapters train
    ids = torch.tensor([TOKENIZER("rev abc=")["input_ids"]])
    with torch.no_grad():
        adapted = moe.model(input_ids=ids).logits
    lora.merge(moe)
    merged = snapshot(moe)
    assert set(merged) == set(original)  # a stock model again: no adapter tensors left
    changed = {name for name in original if not torch.equal(original[name], merged[name])}
    assert changed and all(".self_attn." in name or name in targets.parameters for name in changed)
    with torch.no_grad():
        torch.testing.assert_close(moe.model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert {name: p.requires_grad for name, p in moe.model.named_parameters()} == flags  # peft froze them


def test_a_scope_the_model_does_not_have_is_refused_clearly():
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeguard.models import MoEModel

    # Qwen3-Next with only linear-attention (Gated DeltaNet) layers has no softmax attention module.
    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["linear_attention"] * 2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8,
    )
    moe = MoEModel.from_model(AutoModelForCausalLM.from_config(config))
    with pytest.raises(UnsupportedModelError, match="cannot find its attention layers.*choose another `scope`: router, experts"):
        scope_parameters(moe, "attention")
    with pytest.raises(InputError, match="unknown trainable scope 'gates'.*router, experts, attention, all, lora"):
        scope_parameters(moe, "gates")


def test_lora_without_peft_or_with_a_module_peft_refuses_gives_a_clear_error(monkeypatch):
    moe = model()
    import peft

    def refuse(*args, **kwargs):
        raise ValueError("Target module Qwen3MoeExperts() is not supported.")

    monkeypatch.setattr(peft, "get_peft_model", refuse)
    with pytest.raises(UnsupportedModelError, match="peft cannot add LoRA.*is not supported.*choose another `scope`: router"):
        add_lora(moe)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(InputError, match="needs the peft package: pip install 'moeguard\\[lora\\]'"):
        add_lora(moe)
    with pytest.raises(InputError, match="LoRA rank must be a positive integer"):
        monkeypatch.delitem(sys.modules, "peft")
        add_lora(moe, rank=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_on_fused_experts_is_exact_to_merge_in_every_family(family):
    moe = model(family)
    ids = torch.tensor([TOKENIZER("rev abc=")["input_ids"]])
    lora = add_lora(moe, rank=2)
    assert any(".experts." in name for name in lora.parameters)  # the fused 3-D expert weights are adapted
    with torch.no_grad():
        for name, param in lora.parameters.items():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        adapted = moe.model(input_ids=ids).logits
        lora.merge(moe)
        torch.testing.assert_close(moe.model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
