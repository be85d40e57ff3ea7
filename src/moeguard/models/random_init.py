"""Randomly initialised MoE models built from real transformers configs.

Used by the tests and benchmarks (nothing can be downloaded here) and handy for
trying moeguard on a family's exact module structure without its weights.
"""

from __future__ import annotations

from typing import Any

import torch

from moeguard.errors import InputError
from moeguard.models.moe_model import MoEModel

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


def random_moe_config(
    family: str,
    *,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    hidden: int = 64,
    intermediate: int = 32,
    vocab: int = 128,
    heads: int = 4,
    groups: int = 2,
    groups_per_token: int = 1,
    **overrides: Any,
) -> Any:
    """A small config of ``family`` with ``layers`` MoE layers of ``experts`` experts, top-``top_k``.

    DeepSeek-V3 gets one extra dense first layer, a shared expert and group-limited
    routing (``groups`` groups, ``groups_per_token`` chosen per token); Qwen2-MoE gets
    its shared expert and shared-expert gate; GPT-OSS its router and expert biases.
    """
    from transformers import AutoConfig

    head_dim = hidden // heads
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "mixtral":
        specific = dict(intermediate_size=intermediate, num_local_experts=experts, head_dim=head_dim)
    elif family == "qwen2_moe":
        specific = dict(
            intermediate_size=intermediate * 2,
            moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=intermediate * 2,
            num_experts=experts,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=False,
        )
    elif family == "qwen3_moe":
        specific = dict(
            intermediate_size=intermediate * 2,
            moe_intermediate_size=intermediate,
            num_experts=experts,
            head_dim=head_dim,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    elif family == "olmoe":
        specific = dict(intermediate_size=intermediate, num_experts=experts)
    elif family == "deepseek_v3":
        specific = dict(
            num_hidden_layers=layers + 1,
            num_key_value_heads=heads,  # multi-head latent attention has no grouped key/value heads
            first_k_dense_replace=1,
            intermediate_size=intermediate * 2,
            moe_intermediate_size=intermediate,
            n_routed_experts=experts,
            n_shared_experts=1,
            n_group=groups,
            topk_group=groups_per_token,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=head_dim,
            routed_scaling_factor=2.5,
        )
    elif family == "gpt_oss":
        specific = dict(
            intermediate_size=intermediate,
            num_local_experts=experts,
            head_dim=head_dim,
            sliding_window=16,
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
    else:
        raise InputError(f"unknown family {family!r}; random models exist for {', '.join(FAMILIES)}.")
    settings = {**common, **specific, **overrides}
    return AutoConfig.for_model(family, **settings)


@torch.no_grad()
def sharpen_routing(moe: MoEModel, *, seed: int = 0, scale: float = 1.0) -> None:
    """Give routers large random weights and biases so routing differs clearly between tokens.

    Random initialisation leaves routers near zero (almost uniform routing) and
    correction biases at zero; this exercises every expert-indexed tensor.
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in moe.layers:
        for ref in layer.tensors("router") + layer.tensors("block"):
            tensor = ref.get()
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * (scale if tensor.ndim > 1 else 0.5 * scale)
                tensor.copy_(noise.to(tensor.dtype))


def random_moe(family: str, *, seed: int = 0, sharpen: bool = True, dtype: torch.dtype = torch.float32, **config_kwargs: Any) -> MoEModel:
    """A randomly initialised model of ``family`` (see :func:`random_moe_config`), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = random_moe_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    moe = MoEModel.from_model(model, source=f"random:{family}:seed{seed}")
    if sharpen:
        sharpen_routing(moe, seed=seed)
    return moe
