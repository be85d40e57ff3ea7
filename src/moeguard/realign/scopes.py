"""What re-alignment trains, chosen by module role, never by parameter name.

- ``router``: each MoE layer's router tensors (:meth:`MoELayer.router_parameters`);
- ``experts``: the fused routed-expert tensors of each MoE layer
  (:meth:`MoELayer.expert_parameters`). In a pruned model these are the kept experts;
  in mask mode the removed experts' slices get a zero gradient (they are never
  routed) and, as re-alignment uses no weight decay, AdamW leaves them bit-identical,
  which :func:`frozen_digest` verifies;
- ``attention``: every parameter of the attention modules, found by behaviour: one
  probe forward runs with a registered transformers attention implementation that
  records the module calling it (transformers 5 models hand the calling module to
  ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``). Linear-attention or
  state-space mixers do not call it and are not "attention" here;
- ``all``: every parameter;
- ``lora``: LoRA adapters (peft) on the ``nn.Linear`` modules inside the attention
  modules and on the 3-D fused expert weights (peft's ``target_parameters``,
  which gives each expert its own rank-r pair). peft's parameter wrapper cannot
  take LoRA dropout, DoRA or a LoRA bias, and moeguard does not adapt 2-D expert
  biases (peft would treat ``[E, out]`` as one matrix) nor routers; what LoRA does
  not wrap stays frozen. Checked with peft 0.21 on Mixtral, Qwen2-MoE, Qwen3-MoE,
  OLMoE, DeepSeek-V3 and GPT-OSS: the adapters merge exactly into a stock model.

Everything outside the scope is frozen; :func:`frozen_digest` taken before and
after training proves it unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeguard.errors import InputError, UnsupportedModelError
from moeguard.eval.evaluate import causal_lm
from moeguard.models import MoEModel
from moeguard.models.fingerprint import update_with_tensor

PROBE_IMPLEMENTATION = "moeguard_attention_probe"


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object the model's modules read (the top one first)."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found.setdefault(id(config), config)
    return list(found.values())


@torch.no_grad()
def attention_modules(model: nn.Module) -> list[str]:
    """Paths of the modules that call the transformers attention kernel, in forward order.

    Found by one forward of 4 tokens with a probe implementation registered in
    ``AttentionInterface``: it records its caller and returns zeros of the right
    shape. Every config's ``_attn_implementation`` is restored afterwards.
    """
    from transformers import AttentionInterface

    callers: list[nn.Module] = []

    def probe(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        callers.append(module)
        batch, heads, length = query.shape[0], query.shape[1], query.shape[2]
        return query.new_zeros(batch, length, heads, value.shape[-1]), None

    AttentionInterface.register(PROBE_IMPLEMENTATION, probe)
    configs = _configs(model)
    saved = [config._attn_implementation for config in configs]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        for config in configs:
            config._attn_implementation = PROBE_IMPLEMENTATION
        model.eval()
        tokens = torch.zeros(1, 4, dtype=torch.long, device=device)
        model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False)
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation = implementation
        model.train(was_training)
    paths = {id(module): path for path, module in model.named_modules()}
    ordered: list[str] = []
    for module in callers:
        path = paths.get(id(module))
        if path is not None and path not in ordered:
            ordered.append(path)
    return ordered


def _named(model: nn.Module, params: Sequence[nn.Parameter]) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for ``params``, named as in ``model.named_parameters()``, in model order."""
    wanted = {id(p) for p in params}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def _router(moe: MoEModel, lm: nn.Module) -> list[nn.Parameter]:
    return [p for layer in moe.layers for p in layer.router_parameters()]


def _experts(moe: MoEModel, lm: nn.Module) -> list[nn.Parameter]:
    return [p for layer in moe.layers for p in layer.expert_parameters()]


def _attention(moe: MoEModel, lm: nn.Module) -> list[nn.Parameter]:
    return [p for path in attention_modules(lm) for p in lm.get_submodule(path).parameters()]


@dataclass(frozen=True)
class Scope:
    """What one trainable scope trains: ``parameters(moe, causal_lm)`` picks existing parameters by module
    role; a scope without it (LoRA) trains new adapter parameters instead (:func:`add_lora`)."""

    name: str
    help: str
    parameters: Callable[[MoEModel, nn.Module], list[nn.Parameter]] | None


# Adding a trainable scope is one entry here.
TRAIN_SCOPES: dict[str, Scope] = {s.name: s for s in (
    Scope("router", "each MoE layer's router", _router),
    Scope("experts", "the routed experts (the kept ones)", _experts),
    Scope("attention", "the attention modules", _attention),
    Scope("all", "every parameter", lambda moe, lm: list(lm.parameters())),
    Scope("lora", "LoRA adapters on attention and the fused experts (peft)", None),
)}


def check_scope(scope: str) -> Scope:
    """The trainable scope named ``scope`` (refused when unknown)."""
    if scope not in TRAIN_SCOPES:
        raise InputError(f"unknown trainable scope {scope!r}; choose one of {', '.join(TRAIN_SCOPES)}.")
    return TRAIN_SCOPES[scope]


def scope_parameters(moe: MoEModel, scope: str) -> dict[str, nn.Parameter]:
    """The parameters ``scope`` trains (``router``, ``experts``, ``attention`` or ``all``), by name.

    Raises :class:`UnsupportedModelError` when the model has nothing in that role.
    ``lora`` adds new parameters: see :func:`add_lora`.
    """
    entry = check_scope(scope)
    lm = causal_lm(moe)
    if entry.parameters is None:
        raise InputError(f"the {scope} scope trains new adapter parameters; call add_lora(moe) to create them.")
    params = entry.parameters(moe, lm)
    named = _named(lm, params)
    if not named:
        raise UnsupportedModelError(_missing_role_message(moe, scope), arguments=("scope",))
    return named


def _missing_role_message(moe: MoEModel, scope: str) -> str:
    if scope == "attention":
        return (
            f"{moe.model_type}: no module of this model calls the transformers attention interface, so moeguard "
            "cannot find its attention layers; choose another `scope`: router, experts, all or lora."
        )
    return f"{moe.model_type}: the model has no trainable {scope} parameters; choose another `scope`."


@dataclass
class LoraTargets:
    """Where LoRA goes: ``modules`` (nn.Linear paths inside attention) and ``parameters`` (3-D expert weights)."""

    modules: list[str]
    parameters: list[str]


def lora_targets(moe: MoEModel) -> LoraTargets:
    """The attention ``nn.Linear`` modules and the 3-D fused expert weights of the model, by full path."""
    lm = causal_lm(moe)
    modules = [
        path
        for attention in attention_modules(lm)
        for path, module in lm.get_submodule(attention).named_modules(prefix=attention)
        if type(module) is nn.Linear
    ]
    names = _named(lm, [p for layer in moe.layers for p in layer.expert_parameters() if p.ndim == 3])
    return LoraTargets(modules, list(names))


@dataclass
class LoraAdapters:
    """LoRA adapters injected into a model: the peft wrapper, the adapter parameters by name,
    and the ``requires_grad`` flags the base parameters had before peft froze them."""

    peft_model: Any
    parameters: dict[str, nn.Parameter]
    requires_grad: dict[str, bool]

    def merge(self, moe: MoEModel) -> None:
        """Fold the adapters into the base weights and remove them: a stock transformers model again."""
        moe.model = self.peft_model.merge_and_unload()
        self._restore_flags(moe)

    def remove(self, moe: MoEModel) -> None:
        """Remove the adapters without touching the base weights (the model is as before :func:`add_lora`)."""
        moe.model = self.peft_model.unload()
        self._restore_flags(moe)

    def _restore_flags(self, moe: MoEModel) -> None:
        for name, param in moe.model.named_parameters():
            param.requires_grad_(self.requires_grad.get(name, param.requires_grad))


def add_lora(moe: MoEModel, *, rank: int = 8, alpha: float = 16.0) -> LoraAdapters:
    """Inject LoRA adapters (see :func:`lora_targets`) into ``moe.model`` in place.

    The adapter parameters are named as in ``moe.model.named_parameters()``; peft
    freezes the base weights until :meth:`LoraAdapters.merge` or
    :meth:`LoraAdapters.remove`. Adapters start as an exact no-op (B = 0); A is
    drawn from the global torch RNG.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("scope='lora' needs the peft package: pip install 'moeguard[lora]' (peft >= 0.17).",
                         arguments=("scope",)) from None
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank must be a positive integer, got {rank!r}.")
    targets = lora_targets(moe)
    if not targets.modules and not targets.parameters:
        raise UnsupportedModelError(
            f"{moe.model_type}: LoRA has nothing to wrap: no nn.Linear inside an attention module and no 3-D fused "
            "expert weight; choose another `scope`: router, experts or all.", arguments=("scope",),
        )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets.modules, target_parameters=targets.parameters
    )
    lm = causal_lm(moe)
    flags = {name: p.requires_grad for name, p in lm.named_parameters()}
    try:
        peft_model = get_peft_model(lm, config)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
        raise UnsupportedModelError(
            f"{moe.model_type}: peft cannot add LoRA to this model's attention projections or fused experts "
            f"({str(error).splitlines()[0]}); choose another `scope`: router, experts, attention or all.",
            arguments=("scope",),
        ) from None
    adapters = {name: p for name, p in lm.named_parameters() if p.requires_grad}
    return LoraAdapters(peft_model, adapters, flags)


def removed_expert_slices(moe: MoEModel, keep: Sequence[Sequence[int] | None]) -> list[tuple[str, torch.Tensor]]:
    """``(name, slice)`` of every expert-indexed tensor at the experts a mask removes (``keep[l]`` None: none)."""
    slices = []
    for layer, kept in zip(moe.layers, keep):
        if kept is None:
            continue
        removed = [e for e in range(layer.num_experts) if e not in set(kept)]
        for ref in layer.expert_tensors:
            tensor = ref.get()
            for expert in removed:
                slices.append((f"{ref.name}[expert {expert}]", tensor.detach().select(ref.dim, expert)))
    return slices


def frozen_digest(
    moe: MoEModel, trainable: dict[str, nn.Parameter], keep: Sequence[Sequence[int] | None] | None = None
) -> str:
    """SHA-256 over everything training must not change.

    Every state-dict tensor that is not a trainable parameter, plus (in mask mode,
    ``keep`` given) each removed expert's slice of every expert-indexed tensor.
    """
    digest = hashlib.sha256()
    trainable_ids = {id(p) for p in trainable.values()}
    for name, tensor in sorted(causal_lm(moe).state_dict(keep_vars=True).items()):
        if id(tensor) not in trainable_ids:
            update_with_tensor(digest, name, tensor)
    for name, tensor in removed_expert_slices(moe, keep or []):
        update_with_tensor(digest, name, tensor)
    return digest.hexdigest()
