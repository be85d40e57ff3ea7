"""Parameter groups by module role, found from the model's structure.

Every persistent state-dict tensor belongs to exactly one group:

- ``router``: the router module of each MoE block, and the block's own expert-indexed
  tensors (e.g. score-correction biases);
- ``experts``: the fused routed-expert tensors (hashed per expert by the protocol);
- ``shared_experts``: a block's always-on shared experts and their gate;
- ``attention``: the modules that call the transformers attention kernel (found by
  one probe forward, :func:`moeguard.realign.scopes.attention_modules`), with
  everything inside them: projections, q/k norms, sinks, adapters;
- ``embeddings``: the input embeddings and the output head;
- ``norms``: other modules whose parameters are all one-dimensional;
- ``dense_mlp``: what remains inside the decoder layers (dense feed-forward blocks);
- ``other``: anything else.

Roles come from the MoE discovery, from what modules do and from shapes, never
from parameter names, so they hold for every family moeguard supports.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from moeguard.errors import InputError
from moeguard.models import MoEModel
from moeguard.realign.scopes import attention_modules

GROUPS = ("router", "experts", "shared_experts", "attention", "embeddings", "norms", "dense_mlp", "other")


def check_group_names(names: Iterable[str], *, what: str = "parameter group") -> list[str]:
    """``names`` as a list, or an InputError naming the unknown ones and the valid ones."""
    names = list(names)
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise InputError(f"unknown {what}(s) {unknown}; valid groups: {', '.join(GROUPS)}.")
    return names


def _decoder_layer_paths(model: nn.Module, moe: MoEModel) -> list[str]:
    """Paths of the entries of the module list that holds the MoE blocks' decoder layers."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(
            layer.path.startswith(f"{path}.") for layer in moe.layers
        ):
            return [f"{path}.{name}" for name, _ in module.named_children()]
    return []


def _is_norm(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and not list(module.children()) and all(p.ndim == 1 for p in params)


def _owner_path(name: str, module_paths: set[str]) -> str:
    """The module that holds state-dict entry ``name`` (its longest module-path prefix)."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    while path and path not in module_paths:
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return path


def parameter_groups(moe: MoEModel) -> dict[str, list[str]]:
    """``{group: [state-dict names]}`` for every group of :data:`GROUPS` the model has.

    Names are in state-dict order (tied tensors appear under each of their names).
    """
    model = moe.model
    claims: dict[str, str] = {}
    for layer in moe.layers:
        claims[layer.router_path] = "router"
        claims[layer.experts_path] = "experts"
        for path in layer.shared_expert_paths:
            claims[path] = "shared_experts"
    for path in attention_modules(model):
        claims.setdefault(path, "attention")
    module_names = {id(module): path for path, module in model.named_modules()}
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
        if embedding is not None and id(embedding) in module_names:
            claims.setdefault(module_names[id(embedding)], "embeddings")
    block_tensors = {t.name for layer in moe.layers for t in layer.tensors("block")}
    decoder_layers = _decoder_layer_paths(model, moe)
    modules = dict(model.named_modules())
    module_paths = set(modules)
    groups: dict[str, list[str]] = {}
    for name in model.state_dict(keep_vars=True):
        owner = _owner_path(name, module_paths)
        group = next((claims[p] for p in _ancestors(owner) if p in claims), None)
        if group is None:
            if name in block_tensors:
                group = "router"
            elif _is_norm(modules[owner]):
                group = "norms"
            elif any(owner == d or owner.startswith(d + ".") for d in decoder_layers):
                group = "dense_mlp"
            else:
                group = "other"
        groups.setdefault(group, []).append(name)
    return {group: groups[group] for group in GROUPS if group in groups}


def _ancestors(path: str) -> list[str]:
    """``path`` and its ancestors, innermost first ("a.b.c" -> ["a.b.c", "a.b", "a"])."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def group_parameters(moe: MoEModel, groups: Iterable[str]) -> list[nn.Parameter]:
    """The trainable parameters (no buffers) of the named groups, each once."""
    wanted = set(check_group_names(groups))
    names = {name for group, members in parameter_groups(moe).items() if group in wanted for name in members}
    return [param for name, param in moe.model.named_parameters() if name in names]
