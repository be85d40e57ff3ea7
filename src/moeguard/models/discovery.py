"""Structural discovery of sparse MoE blocks in any transformers model.

A module is a sparse MoE block when one child holds fused expert tensors (direct
3-D parameters sharing a leading axis of size E) and another child holds a router
weight of shape ``[E, hidden_size]``. Families that differ from this shape in ways
the structure cannot reveal are listed in :data:`UNSUPPORTED_FAMILIES` or
:data:`GROUP_SCORING_OVERRIDES`, and nowhere else.
"""

from __future__ import annotations

from torch import nn

from moeguard.errors import UnsupportedModelError
from moeguard.models.layers import (
    TOP_K_NAMES,
    ExpertTensor,
    GroupRouting,
    MoELayer,
    decoder_layer_of,
    expert_axis,
)

# model_type -> why moeguard cannot prune it exactly.
UNSUPPORTED_FAMILIES: dict[str, str] = {
    "deepseek_v4": (
        "its hash-routed layers pick experts from a token-id table (tid2eid) rather than a router "
        "score, so removing an expert would need that table rewritten"
    ),
}

# model_type -> how many of a group's best experts score the group, where it is not 2
# (2 is what DeepSeek-V3 and the families derived from it use).
GROUP_SCORING_OVERRIDES: dict[str, int] = {}

_GROUP_COUNT_NAMES = ("n_group", "num_group", "num_groups", "n_groups", "num_expert_group")
_GROUPS_PER_TOKEN_NAMES = ("topk_group", "topk_groups", "num_topk_groups")


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "hidden_size", None)


def _fused_experts_child(block: nn.Module) -> tuple[str, nn.Module, int] | None:
    """``(name, module, E)`` of the child holding fused 3-D expert tensors, if any."""
    for name, child in block.named_children():
        if isinstance(child, nn.modules.conv._ConvNd):
            continue
        leading = {p.shape[0] for p in child.parameters(recurse=False) if p.ndim == 3}
        if len(leading) == 1 and (num_experts := leading.pop()) >= 2:
            return name, child, num_experts
    return None


def _router_child(block: nn.Module, skip: str, num_experts: int, hidden: int | None) -> tuple[str, nn.Module] | None:
    for name, child in block.named_children():
        if name == skip:
            continue
        for param in child.parameters():
            if param.ndim == 2 and param.shape[0] == num_experts and (hidden is None or param.shape[1] == hidden):
                return name, child
    return None


def _first_int_attribute(modules: list[nn.Module], names: tuple[str, ...]) -> int | None:
    for module in modules:
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _expert_tensors(
    path: str, block: nn.Module, router_name: str, experts_name: str, num_experts: int
) -> list[ExpertTensor]:
    tensors: list[ExpertTensor] = []

    def collect(module: nn.Module, prefix: str, role: str, leading_only: bool, recurse: bool) -> None:
        modules = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
        for sub_prefix, sub in modules:
            entries = [(n, t, False) for n, t in sub._parameters.items() if t is not None]
            entries += [(n, t, True) for n, t in sub._buffers.items() if t is not None]
            for attr, tensor, is_buffer in entries:
                if tensor.ndim == 0:
                    continue
                axis = 0 if tensor.shape[0] == num_experts else None
                if axis is None and not leading_only:
                    axis = expert_axis(tensor.shape, num_experts)
                if axis is not None:
                    name = f"{sub_prefix}.{attr}" if sub_prefix else attr
                    tensors.append(ExpertTensor(name, sub, attr, axis, role, is_buffer))

    collect(block.get_submodule(router_name), f"{path}.{router_name}", "router", leading_only=False, recurse=True)
    collect(block.get_submodule(experts_name), f"{path}.{experts_name}", "experts", leading_only=True, recurse=True)
    collect(block, path, "block", leading_only=False, recurse=False)
    return tensors


def discover_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Find every sparse MoE block of ``model``, in forward order.

    Raises :class:`UnsupportedModelError` for a dense model, for experts stored as
    separate modules, and for the families in :data:`UNSUPPORTED_FAMILIES`.
    """
    model_type = model_type_of(model)
    if model_type in UNSUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{model_type} models are not supported: {UNSUPPORTED_FAMILIES[model_type]}."
        )
    config = getattr(model, "config", None)
    hidden = _hidden_size(model)
    layers: list[MoELayer] = []
    unrouted: list[str] = []
    for path, block in model.named_modules():
        found = _fused_experts_child(block)
        if found is None:
            continue
        experts_name, experts, num_experts = found
        router_found = _router_child(block, experts_name, num_experts, hidden)
        if router_found is None:
            unrouted.append(f"{path}.{experts_name}")
            continue
        router_name, router = router_found
        top_k = _first_int_attribute([router, block], TOP_K_NAMES)
        if top_k is None and config is not None:
            top_k = _first_int_attribute([config.get_text_config()], TOP_K_NAMES)
        if top_k is None:
            raise UnsupportedModelError(
                f"{model_type}: cannot find how many experts each token uses (top-k) for block {path}; "
                f"looked for {', '.join(TOP_K_NAMES)} on the router, the block and the config."
            )
        num_groups = _first_int_attribute([router, block], _GROUP_COUNT_NAMES)
        group_routing = None
        if num_groups is not None and num_groups > 1:
            group_routing = GroupRouting(
                num_groups=num_groups,
                groups_per_token=_first_int_attribute([router, block], _GROUPS_PER_TOKEN_NAMES) or num_groups,
                experts_scored_per_group=GROUP_SCORING_OVERRIDES.get(model_type, 2),
            )
        layers.append(
            MoELayer(
                index=len(layers),
                decoder_layer=decoder_layer_of(path),
                path=path,
                block=block,
                router_path=f"{path}.{router_name}",
                router=router,
                experts_path=f"{path}.{experts_name}",
                experts=experts,
                num_experts=num_experts,
                top_k=top_k,
                shared_expert_paths=[f"{path}.{n}" for n, _ in block.named_children() if "shared" in n],
                group_routing=group_routing,
                expert_tensors=_expert_tensors(path, block, router_name, experts_name, num_experts),
            )
        )
    if not layers:
        if unrouted:
            raise UnsupportedModelError(
                f"{model_type}: {unrouted[0]} holds expert-indexed 3-D tensors, but no sibling module has a router "
                f"weight of shape [experts, {hidden}]; moeguard cannot see how this model routes."
            )
        if any(isinstance(getattr(m, "experts", None), nn.ModuleList) for m in model.modules()):
            raise UnsupportedModelError(
                f"{model_type}: its experts are separate modules (nn.ModuleList) rather than fused 3-D tensors; "
                "moeguard supports the fused layout of transformers >= 5 (load the model with a current "
                "transformers release, without trust_remote_code)."
            )
        raise UnsupportedModelError(
            f"{model_type} ({type(model).__name__}) has no sparse Mixture-of-Experts block: it looks like a dense "
            "model. moeguard needs an MoE model (for example Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS)."
        )
    return layers
