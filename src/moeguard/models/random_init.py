"""Randomly initialised MoE models built from real transformers configs.

Used by the tests and benchmarks (nothing can be downloaded here) and handy for
trying moeguard on a family's exact module structure without its weights. The
shapes of released checkpoints (:data:`REAL_SHAPES`) can be written at full width,
as large as their checkpoints, with :func:`write_random_checkpoint`, to measure
every stage at the sizes users run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


# ---------------------------------------------------------------------------- released checkpoints' shapes


@dataclass(frozen=True)
class RealShape:
    """The layer shapes and routing of a released MoE checkpoint, from its hub ``config.json``.

    ``config`` holds every value that sizes a decoder layer or routes its tokens
    (widths, heads, experts, top-k, groups, shared experts) and the vocabulary;
    ``small`` the overrides of the small version, which keeps the family, the
    expert count, top-k, groups and shared experts and shrinks every width.
    ``layers`` / ``dense_layers`` are the released model's decoder layers and
    leading dense ones; ``max_shard_size`` the size of its checkpoint's shards.
    """

    name: str
    hub_id: str
    family: str
    layers: int
    dense_layers: int
    max_shard_size: str
    config: dict[str, Any]
    small: dict[str, Any]


REAL_SHAPES: dict[str, RealShape] = {shape.name: shape for shape in (
    RealShape(
        "qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "qwen3_moe", layers=48, dense_layers=0, max_shard_size="4GB",
        config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
                    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        small=dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512),
    ),
    RealShape(
        "mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "mixtral", layers=32, dense_layers=0, max_shard_size="5GB",
        config=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                    max_position_embeddings=32768, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        small=dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   vocab_size=128, max_position_embeddings=512),
    ),
    RealShape(
        "olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", "olmoe", layers=16, dense_layers=0, max_shard_size="5GB",
        config=dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                    num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, vocab_size=50304,
                    max_position_embeddings=4096, rms_norm_eps=1e-5),
        small=dict(hidden_size=64, intermediate_size=16, num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                   max_position_embeddings=512),
    ),
    RealShape(
        "deepseek-v3", "deepseek-ai/DeepSeek-V3", "deepseek_v3", layers=61, dense_layers=3, max_shard_size="5GB",
        config=dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128,
                    num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                    topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=512, q_lora_rank=1536,
                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280,
                    max_position_embeddings=163840, rms_norm_eps=1e-6),
        small=dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=8, num_attention_heads=4,
                   num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=16, vocab_size=128, max_position_embeddings=512),
    ),
)}


def real_shape_config(name: str, *, moe_layers: int, dense_layers: int = 0, small: bool = False, **overrides: Any) -> Any:
    """The config of :data:`REAL_SHAPES` ``name`` with ``moe_layers`` MoE decoder layers after ``dense_layers``
    dense ones (families whose layers are all MoE take no dense ones), or its small version.

    Token ids follow moeguard's character tokenizer (pad 0, bos 1, eos 2) so that every
    command runs on the written checkpoint; ``overrides`` replace any other value.
    """
    from transformers import AutoConfig

    if name not in REAL_SHAPES:
        raise InputError(f"unknown shape {name!r}; known: {', '.join(REAL_SHAPES)}.")
    shape = REAL_SHAPES[name]
    if dense_layers and shape.dense_layers == 0:
        raise InputError(f"{name} has no dense decoder layers; pass dense_layers=0.")
    settings = dict(shape.config, **(shape.small if small else {}))
    settings.update(num_hidden_layers=dense_layers + moe_layers, tie_word_embeddings=False, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)
    if shape.dense_layers:
        settings["first_k_dense_replace"] = dense_layers
    settings.update(overrides)
    return AutoConfig.for_model(shape.family, **settings)


@dataclass
class WrittenCheckpoint:
    """A checkpoint written by :func:`write_random_checkpoint`: where, how big, in how many files."""

    path: Path
    total_bytes: int
    shard_bytes: list[int]
    parameters: int

    @property
    def largest_shard(self) -> int:
        return max(self.shard_bytes)


def stored_layout(config: Any, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint of ``config`` stores, by stored name, as meta tensors: the model built on
    the meta device and its state dict converted by transformers' own save rules (per-expert tensors for
    the families whose released checkpoints hold them), in name order."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return revert_weight_conversion(model, model.state_dict())


def random_stored_tensor(name: str, shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator,
                         std: float = 0.02) -> torch.Tensor:
    """A stored tensor's random value: norm weights 1, biases 0, everything else ``N(0, std^2)``."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if "norm" in module:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def write_random_checkpoint(
    config: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "5GB",
    tokenizer: Any = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> WrittenCheckpoint:
    """Write a random checkpoint of ``config`` as a released one is laid out, one tensor in memory at a time.

    The stored names and shapes are those ``save_pretrained`` writes (:func:`stored_layout`);
    the tensors go into ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_size`` in name order, as released checkpoints are split (transformers 5's
    ``save_pretrained`` instead keeps every expert of a fused tensor in one file, a
    22.5 GB shard for one DeepSeek-V3 layer), with the index, config, generation config
    and ``tokenizer``. The result loads with ``AutoModelForCausalLM.from_pretrained``;
    writing it needs the memory of one tensor, whatever the model's size.
    """
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from moeguard.io import atomic_dir, check_output, write_json
    from moeguard.models.stored import SAFETENSORS_NAMES, SafetensorsWriter, StoredTensor

    out_dir = check_output(out_dir, inputs=[], overwrite=overwrite, directory=True)
    config = copy.deepcopy(config)
    config.dtype = str(dtype).removeprefix("torch.")
    layout = stored_layout(config, dtype)
    split = split_state_dict_into_shards_factory(layout, get_storage_size=lambda t: t.numel() * t.element_size(),
                                                 filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    shard_bytes = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        bar = tqdm(total=sum(t.numel() * t.element_size() for t in layout.values()), unit="B", unit_scale=True,
                   desc=f"writing {out_dir.name}", disable=None if progress else True)
        for filename, names in split.filename_to_tensors.items():
            stored = [StoredTensor(n, SAFETENSORS_NAMES[layout[n].dtype], tuple(layout[n].shape),
                                   layout[n].numel() * layout[n].element_size()) for n in names]
            with SafetensorsWriter(tmp / filename, stored, {"format": "pt"}) as writer:
                for tensor in stored:
                    writer.write_tensor(random_stored_tensor(tensor.name, tensor.shape, layout[tensor.name].dtype,
                                                             generator, std))
                    bar.update(tensor.nbytes)
            shard_bytes.append((tmp / filename).stat().st_size)
        bar.close()
        if split.is_sharded:
            metadata = {"total_parameters": sum(t.numel() for t in layout.values()), **split.metadata}
            write_json(tmp / "model.safetensors.index.json", {"metadata": metadata, "weight_map": split.tensor_to_filename})
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return WrittenCheckpoint(out_dir, sum(shard_bytes), shard_bytes, sum(t.numel() for t in layout.values()))
