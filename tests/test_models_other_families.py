"""Families beyond the six named ones work with no family-specific code.

Each is built from its real transformers config, shrunk; the check is the core one:
physical pruning computes exactly what masking computes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeguard.models import MoEModel
from moeguard.models.random_init import sharpen_routing

SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, head_dim=16, shared_expert_intermediate_size=32,
    num_local_experts=8, num_experts=8, n_routed_experts=8, max_position_embeddings=128,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
    topk_group=1, first_k_dense_replace=0, num_experts_per_tok=2, moe_k=2, decoder_sparse_step=1, pad_token_id=0,
)

OTHER_FAMILIES = [
    "afmoe",  # nested router linear; block-level expert bias handed to the router
    "cohere2_moe",
    "deepseek_v2",
    "ernie4_5_moe",  # correction bias of shape [1, E] inside the router
    "exaone_moe",
    "flex_olmo",
    "glm4_moe",
    "granitemoe",
    "hunyuan_v1_moe",
    "hy_v3",  # correction bias held by the block, passed to the router as an argument
    "minimax",
    "phimoe",
    "solar_open",
]


def small_model(model_type: str):
    config_class = type(AutoConfig.for_model(model_type))
    accepted = set(getattr(config_class, "__dataclass_fields__", {}))
    config = AutoConfig.for_model(model_type, **{k: v for k, v in SMALL.items() if k in accepted})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_other_family_prunes_exactly_like_its_mask(model_type):
    moe = MoEModel.from_model(small_model(model_type))
    sharpen_routing(moe)
    input_ids = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    plan = {layer: [1, 3, 4, 6] for layer in range(moe.num_layers)}
    with torch.no_grad():
        full = moe.model(input_ids=input_ids, attention_mask=attention_mask).logits
        with moe.mask_experts(plan):
            masked = moe.model(input_ids=input_ids, attention_mask=attention_mask).logits
        moe.prune(plan)
        pruned = moe.model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (masked - full).abs().max() > 1e-4
    assert (pruned - masked).abs().max().item() <= 1e-5
