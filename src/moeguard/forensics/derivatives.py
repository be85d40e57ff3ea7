"""Making suspects: what an adversary does to a parent, for tests and benchmarks.

A suspect starts as a **carve** (:func:`carve`): a copy of the parent that keeps some
experts per layer, in any order, optionally with each removed expert averaged into a
kept one (merging). Then **evasions** hide where it came from. :data:`EVASIONS` is the
one table of them; each entry says whether it leaves the model's function unchanged
(``exact``: the same logits up to float rounding, which :func:`output_difference`
measures) or changes it a little (quantisation, a dropped layer, a narrower residual
stream, a re-initialised router, casting).

Every transformation keeps ``MoEModel.expert_ids`` (the parent expert behind each expert
now in the model) up to date, so whoever made the suspect knows the kept sets and
their order that the detector must recover.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moeguard.errors import InputError, PlanError
from moeguard.forensics.alignment import matched_token_ids
from moeguard.forensics.residual import base_model, decoder_layers, feed_forward_norm, final_norm, norm_gain
from moeguard.forensics.signatures import expert_matrices
from moeguard.models import MoEModel
from moeguard.models.keep_sets import check_group_feasible
from moeguard.models.surgery import prune_in_place

ATTENTION_NORM_NAMES = ("input_layernorm",)
# Linear layers that write into the residual stream (every family moeguard supports names them so).
WRITE_NAMES = ("o_proj", "down_proj")


# ---------------------------------------------------------------------------- carving


def reindex_experts(moe: MoEModel, orders: Sequence[Sequence[int]]) -> None:
    """In place: MoE layer ``l`` keeps the parent experts ``orders[l]``, in that order.

    Every expert-indexed tensor (router rows and biases, fused expert weights) is
    gathered with the same order, so a permutation alone changes nothing about what
    the model computes. Counts may differ between layers; such a model lives in
    memory only (a stock config holds one expert count), and its config keeps the
    parent's count.
    """
    if len(orders) != moe.num_layers:
        raise PlanError(f"reindex_experts needs one order per MoE layer ({moe.num_layers}), got {len(orders)}.")
    orders = [list(map(int, order)) for order in orders]
    for layer, order in zip(moe.layers, orders):
        if len(set(order)) != len(order) or not all(0 <= i < layer.num_experts for i in order):
            raise PlanError(
                f"layer {layer.index}: {order} is not a list of distinct expert indices in 0..{layer.num_experts - 1}."
            )
        if len(order) < layer.top_k:
            raise PlanError(f"layer {layer.index}: keeping {len(order)} experts, fewer than top_k={layer.top_k}.")
        check_group_feasible(layer, order)
    if len({len(order) for order in orders}) == 1:
        prune_in_place(moe.model, moe.layers, orders)
    else:
        for layer, order in zip(moe.layers, orders):
            # A config-less stand-in: the tensors and module counters change, the shared config cannot.
            prune_in_place(nn.Module(), [layer], [order])
    moe.expert_ids = [[ids[i] for i in order] for ids, order in zip(moe.expert_ids, orders)]


def random_orders(moe: MoEModel, keep: Sequence[int], *, seed: int = 0) -> list[list[int]]:
    """For each MoE layer, ``keep[l]`` distinct experts drawn at random, in random order.

    Group-limited routers (DeepSeek-V3) get the same number from every group, and
    experts stay in their group's block (whole groups are shuffled), so the suspect
    routes exactly like the masked parent.
    """
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for layer, count in zip(moe.layers, keep):
        routing = layer.group_routing
        if routing is None:
            chosen = torch.randperm(layer.num_experts, generator=generator)[:count]
        else:
            if count % routing.num_groups:
                raise PlanError(
                    f"layer {layer.index}: keep {count} is not a multiple of its {routing.num_groups} expert groups."
                )
            size = layer.num_experts // routing.num_groups
            per_group = count // routing.num_groups
            # Groups are contiguous blocks: whole groups may move, experts may not leave theirs.
            groups = torch.randperm(routing.num_groups, generator=generator).tolist()
            chosen = torch.cat([g * size + torch.randperm(size, generator=generator)[:per_group] for g in groups])
        orders.append(chosen.tolist())
    return orders


@dataclass
class Carve:
    """A carved copy of a parent: ``model`` keeps ``orders[l]`` (parent experts, in its order) in layer ``l``;
    ``merged[l]`` maps a kept parent expert to the removed parent experts averaged into it."""

    model: MoEModel
    orders: list[list[int]]
    merged: list[dict[int, list[int]]] = field(default_factory=list)


@torch.no_grad()
def carve(parent: MoEModel, orders: Sequence[Sequence[int]], *, merge_weight: float = 0.0, seed: int = 0) -> Carve:
    """A copy of ``parent`` keeping ``orders[l]`` in MoE layer ``l``.

    With ``merge_weight`` ``w > 0`` the removed experts (in a random order) are dealt
    out to the kept ones in turn, and each kept expert's weights become
    ``(1 - w) W_kept + w mean(W_removed)`` over the removed experts it was dealt (every
    expert tensor, biases included; the router row stays the kept expert's).
    """
    if not 0 <= merge_weight < 1:
        raise InputError(f"merge_weight must be in [0, 1), got {merge_weight}.")
    model = copy.deepcopy(parent)
    merged: list[dict[int, list[int]]] = []
    generator = torch.Generator().manual_seed(seed)
    for layer, order in zip(model.layers, orders):
        partners: dict[int, list[int]] = {}
        if merge_weight > 0:
            removed = [e for e in range(layer.num_experts) if e not in order]
            for turn, index in enumerate(torch.randperm(len(removed), generator=generator).tolist()):
                partners.setdefault(order[turn % len(order)], []).append(removed[index])
            for ref in layer.tensors("experts"):
                tensor = ref.get()
                for kept, others in partners.items():
                    mean = tensor.index_select(ref.dim, torch.tensor(others, device=tensor.device)).mean(ref.dim)
                    target = tensor.select(ref.dim, kept)
                    target.copy_((1 - merge_weight) * target + merge_weight * mean)
        merged.append(partners)
    reindex_experts(model, orders)
    return Carve(model, [list(o) for o in orders], merged)


# ---------------------------------------------------------------------------- the residual stream


@dataclass(frozen=True)
class ResidualSite:
    """A parameter with an axis indexing the residual stream: read (through ``norm``) or written (``norm`` None)."""

    name: str
    axis: int
    norm: nn.Module | None


def residual_sites(moe: MoEModel) -> tuple[list[ResidualSite], list[nn.Module]]:
    """Every parameter that reads or writes the residual stream, and every norm in front of a read.

    Reads: linear layers of a decoder layer whose input is the stream's width (query,
    key, value, shared-expert and dense gate/up projections, gates), the routers, the
    fused gate/up expert weights, the output head. Writes: embeddings, the attention
    output and down projections, fused down expert weights, and their biases.
    """
    hidden = moe.model.config.hidden_size
    params = dict(moe.model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    sites: list[ResidualSite] = []
    norms: list[nn.Module] = [final_norm(moe)]
    routers = {id(layer.router) for layer in moe.layers}
    experts = {id(layer.experts) for layer in moe.layers}
    for index, decoder in enumerate(decoder_layers(moe)):
        attention_norm = next((getattr(decoder, n) for n in ATTENTION_NORM_NAMES if hasattr(decoder, n)), None)
        ffn_norm = feed_forward_norm(moe, index)
        norms += [attention_norm, ffn_norm]
        for path, module in decoder.named_modules():
            if id(module) in routers or id(module) in experts or not isinstance(module, nn.Linear):
                continue
            short = path.rsplit(".", 1)[-1]
            if short in WRITE_NAMES and module.out_features == hidden:
                sites.append(ResidualSite(name_of[id(module.weight)], 0, None))
                if module.bias is not None:
                    sites.append(ResidualSite(name_of[id(module.bias)], 0, None))
            elif short not in WRITE_NAMES and module.in_features == hidden:
                norm = attention_norm if "attn" in path.split(".")[0] else ffn_norm
                sites.append(ResidualSite(name_of[id(module.weight)], 1, norm))
    for layer in moe.layers:
        norm = feed_forward_norm(moe, layer.decoder_layer)
        for ref in layer.tensors("router"):
            if ref.get().ndim == 2:
                sites.append(ResidualSite(name_of[id(ref.get())], 1, norm))
        for matrix in expert_matrices(layer):
            sites.append(ResidualSite(name_of[id(matrix.ref.get())], matrix.hidden_axis, None if matrix.writes else norm))
        for ref in layer.tensors("experts"):
            if ref.attr.startswith("down") and ref.get().ndim == 2:
                sites.append(ResidualSite(name_of[id(ref.get())], 1, None))
    sites.append(ResidualSite(name_of[id(moe.model.get_input_embeddings().weight)], 1, None))
    head = moe.model.get_output_embeddings()
    if head is not None and id(head.weight) in name_of and head.weight is not moe.model.get_input_embeddings().weight:
        sites.append(ResidualSite(name_of[id(head.weight)], 1, final_norm(moe)))
    return sites, norms


def untied(moe: MoEModel) -> MoEModel:
    """``moe`` itself, or a copy whose output head has its own weight if it shared the embedding's."""
    head, embedding = moe.model.get_output_embeddings(), moe.model.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return moe
    result = copy.deepcopy(moe)
    result.model.config.tie_word_embeddings = False
    result.model.get_output_embeddings().weight = nn.Parameter(result.model.get_input_embeddings().weight.detach().clone())
    return result


def _move_hidden(tensor: torch.Tensor, axis: int, basis: torch.Tensor) -> torch.Tensor:
    """``tensor`` with every vector ``v`` along ``axis`` replaced by ``basis @ v``."""
    moved = tensor.movedim(axis, -1)
    return (moved @ basis.T.to(moved.dtype)).movedim(-1, axis)


def _rebuild(moe: MoEModel, config, state: dict[str, torch.Tensor]) -> MoEModel:
    """A new model of ``config`` holding ``state`` (same class, dtype, tokenizer and expert ids)."""
    from transformers import AutoModelForCausalLM

    dtype = next(moe.model.parameters()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"rebuilding the transformed model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.eval()
    result = MoEModel.from_model(model, moe.tokenizer, source=moe.source)
    result.expert_ids = [list(ids) for ids in moe.expert_ids]
    return result


@torch.no_grad()
def map_residual(moe: MoEModel, basis: torch.Tensor, *, scale: float = 1.0, fold: bool = True) -> MoEModel:
    """The model whose residual stream is ``x' = scale * basis @ x`` (``basis [H', H]``).

    With ``fold`` every norm's gain is folded into what reads it (and the norm's weight
    set to the constant that keeps ``norm(x')`` at the right scale, ``sqrt(H / H')``);
    then reads ``R -> R diag(g) Q^T``, writes ``W -> scale Q W``. With orthonormal
    columns (``H' >= H``) this computes the same function as ``moe``; orthonormal rows
    (``H' < H``) drop directions and only approximate it. Without ``fold``, ``basis``
    must be a signed permutation and the gains are permuted instead.
    """
    moe = untied(moe)
    new_hidden, hidden = basis.shape
    sites, norms = residual_sites(moe)
    gains = {id(norm): norm_gain(norm, hidden).double() for norm in norms if norm is not None}
    for norm in norms:
        if norm is not None and not torch.allclose(gains[id(norm)].float(), norm.weight.detach().float().cpu(), atol=1e-5):
            raise InputError(f"{type(norm).__name__} is not parametrised as weight * normalised(x); cannot fold it.")
    q = basis.double()
    state = {name: tensor.detach().clone() for name, tensor in moe.model.state_dict().items()}
    for site in sites:
        tensor = state[site.name].double()
        if site.norm is None:
            tensor = tensor * scale
        elif fold:
            shape = [1] * tensor.ndim
            shape[site.axis] = hidden
            tensor = tensor * gains[id(site.norm)].reshape(shape)
        state[site.name] = _move_hidden(tensor, site.axis, q).to(state[site.name].dtype)
    norm_names = {id(p): n for n, p in moe.model.named_parameters()}
    for norm in norms:
        if norm is None:
            continue
        name = norm_names[id(norm.weight)]
        weight = torch.full((new_hidden,), math.sqrt(hidden / new_hidden), dtype=torch.float64) if fold else q.abs() @ gains[id(norm)]
        state[name] = weight.to(state[name].dtype)
    if new_hidden == hidden:  # same shapes: write into a copy (also keeps non-uniform expert counts)
        result = copy.deepcopy(moe)
        params = dict(result.model.named_parameters())
        for name, value in state.items():
            if name in params:
                params[name].copy_(value)
    elif len(set(moe.num_experts)) > 1:
        raise InputError("changing the residual width rebuilds the model from its config, which holds one expert count; "
                         "this carve keeps different counts per layer.")
    else:
        config = copy.deepcopy(moe.model.config)
        head_dim = getattr(decoder_layers(moe)[0].self_attn, "head_dim", None)
        config.hidden_size = new_hidden
        if head_dim is not None:
            config.head_dim = head_dim  # families that derive it from hidden_size / heads would change it
        result = _rebuild(moe, config, state)
    # rms(x')^2 = scale^2 |x|^2 / H': each norm's epsilon follows, so that even tiny states normalise exactly alike.
    for old, new in zip(norms, residual_sites(result)[1]):
        if old is not None:
            set_epsilon(new, norm_epsilon(old) * scale * scale * hidden / new_hidden)
    return result


EPSILON_NAMES = ("variance_epsilon", "eps", "epsilon")


def norm_epsilon(norm: nn.Module) -> float:
    return next(getattr(norm, n) for n in EPSILON_NAMES if isinstance(getattr(norm, n, None), float))


def set_epsilon(norm: nn.Module, value: float) -> None:
    """Set a norm module's epsilon (in memory: a saved config holds one epsilon for every norm)."""
    setattr(norm, next(n for n in EPSILON_NAMES if isinstance(getattr(norm, n, None), float)), value)


def random_basis(rows: int, cols: int, *, seed: int) -> torch.Tensor:
    """A random ``[rows, cols]`` matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    return q if rows >= cols else q.T


@torch.no_grad()
def residual_principal_basis(moe: MoEModel, keep: int, *, seed: int = 0) -> torch.Tensor:
    """``[keep, H]``: the ``keep`` directions carrying the most energy of the residual states (every layer) on random tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, moe.model.get_input_embeddings().weight.shape[0], (8, 32), generator=generator)
    states = moe.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    stacked = torch.cat([s.reshape(-1, s.shape[-1]) for s in states]).double()
    _, _, vt = torch.linalg.svd(stacked, full_matrices=False)
    return vt[:keep]


# ---------------------------------------------------------------------------- the evasions


def permute_residual(moe: MoEModel, seed: int) -> MoEModel:
    hidden = moe.model.config.hidden_size
    perm = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))
    return map_residual(moe, torch.eye(hidden, dtype=torch.float64)[perm], fold=False)


def rotate_residual(moe: MoEModel, seed: int) -> MoEModel:
    hidden = moe.model.config.hidden_size
    scale = float(torch.empty(1).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(seed + 1)))
    return map_residual(moe, random_basis(hidden, hidden, seed=seed), scale=scale)


def _width_is_free(moe: MoEModel) -> str | None:
    if len(set(moe.num_experts)) > 1:
        return "it keeps different expert counts per layer, which a rebuilt config cannot hold"
    hidden = moe.model.config.hidden_size
    for path, param in decoder_layers(moe)[0].named_parameters():
        if "attn" in path.split(".")[0] and param.ndim == 1 and param.shape[0] == hidden and path.endswith("norm.weight"):
            return f"its attention normalises queries over the residual width ({path}), tying their width to it (OLMoE)"
    return None


def pad_residual(moe: MoEModel, seed: int, extra: int = 4) -> MoEModel:
    hidden = moe.model.config.hidden_size
    return map_residual(moe, random_basis(hidden + extra, hidden, seed=seed))


def shrink_residual(moe: MoEModel, seed: int, fewer: int = 4) -> MoEModel:
    hidden = moe.model.config.hidden_size
    return map_residual(moe, residual_principal_basis(moe, hidden - fewer, seed=seed))


@torch.no_grad()
def scale_norms(moe: MoEModel, seed: int) -> MoEModel:
    """Every norm's gain times ``s`` (per coordinate, log-uniform in [1/4, 4]), what reads it divided by ``s``."""
    result = copy.deepcopy(untied(moe))
    hidden = result.model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    sites, norms = residual_sites(result)
    params = dict(result.model.named_parameters())
    factors = {}
    for norm in norms:
        if norm is not None:
            factors[id(norm)] = torch.exp(torch.empty(hidden).uniform_(-math.log(4), math.log(4), generator=generator))
            norm.weight.mul_(factors[id(norm)].to(norm.weight))
    for site in sites:
        if site.norm is not None:
            shape = [1] * params[site.name].ndim
            shape[site.axis] = hidden
            params[site.name].div_(factors[id(site.norm)].reshape(shape).to(params[site.name]))
    return result


def _neuron_index(layer, writes: bool, order: torch.Tensor) -> torch.Tensor:
    """Index along a fused expert weight's neuron axis that moves neuron ``order[n]`` to position ``n``.

    Gate and up share the axis: as two halves (most families) or interleaved
    (``is_concatenated`` False: GPT-OSS).
    """
    if writes:
        return order
    neurons = len(order)
    if not getattr(layer.experts, "is_concatenated", True):
        return torch.stack([2 * order, 2 * order + 1], dim=1).reshape(-1)
    return torch.cat([order, neurons + order])


@torch.no_grad()
def permute_neurons(moe: MoEModel, seed: int) -> MoEModel:
    result = copy.deepcopy(moe)
    generator = torch.Generator().manual_seed(seed)
    for layer in result.layers:
        matrices = expert_matrices(layer)
        neurons = next(m.ref.get().shape[3 - m.hidden_axis] for m in matrices if m.writes)
        for expert in range(layer.num_experts):
            order = torch.randperm(neurons, generator=generator)
            for matrix in matrices:
                tensor = matrix.ref.get()
                axis = 3 - matrix.hidden_axis - 1  # the neuron axis of tensor[expert]
                index = _neuron_index(layer, matrix.writes, order)
                tensor[expert] = tensor[expert].index_select(axis, index.to(tensor.device))
            for ref in layer.tensors("experts"):
                if ref.get().ndim == 2 and not ref.attr.startswith("down"):  # gate/up biases
                    bias = ref.get()
                    bias[expert] = bias[expert][_neuron_index(layer, False, order).to(bias.device)]
    return result


def _swiglu_only(moe: MoEModel) -> str | None:
    if any(type(layer.experts)._apply_gate.__name__ != "_default_apply_gate" for layer in moe.layers):
        return "its experts have their own activation (GPT-OSS clamps and offsets the up projection), so rescaling changes the function"
    return None


@torch.no_grad()
def scale_neurons(moe: MoEModel, seed: int) -> MoEModel:
    """Each neuron's up-projection row times ``a`` and its down-projection column divided by ``a``
    (``a`` log-uniform in [1/4, 4], per expert and neuron); exact for ``act(gate) * up`` experts."""
    result = copy.deepcopy(moe)
    generator = torch.Generator().manual_seed(seed)
    for layer in result.layers:
        matrices = expert_matrices(layer)
        write = next(m for m in matrices if m.writes)
        neurons = write.ref.get().shape[3 - write.hidden_axis]
        factors = torch.exp(torch.empty(layer.num_experts, neurons).uniform_(-math.log(4), math.log(4), generator=generator))
        for matrix in matrices:
            tensor = matrix.ref.get()
            neuron_axis = 3 - matrix.hidden_axis
            if matrix.writes:
                shape = [layer.num_experts, 1, 1]
                shape[neuron_axis] = neurons
                tensor.div_(factors.reshape(shape).to(tensor))
            else:
                up = tensor.narrow(neuron_axis, neurons, neurons)  # second half: up (first: gate)
                shape = [layer.num_experts, 1, 1]
                shape[neuron_axis] = neurons
                up.mul_(factors.reshape(shape).to(tensor))
    return result


def reorder_experts(moe: MoEModel, seed: int) -> MoEModel:
    result = copy.deepcopy(moe)
    reindex_experts(result, random_orders(result, result.num_experts, seed=seed))
    return result


def _needs_tokenizer(moe: MoEModel) -> str | None:
    return None if moe.tokenizer is not None else "it has no tokenizer"


def _rebuilt_tokenizer(tokenizer, new_ids: dict[int, int]):
    """A copy of a fast tokenizer with token ids renumbered by ``new_ids`` (old -> new; others kept)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"].get("vocab")
    if not isinstance(vocab, dict):
        raise InputError(f"renumbering needs a tokenizer with a vocabulary table, not a {spec['model'].get('type')} model.")
    spec["model"]["vocab"] = {token: new_ids.get(i, i) for token, i in vocab.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        padding_side=tokenizer.padding_side,
        clean_up_tokenization_spaces=False,
    )


@torch.no_grad()
def reorder_vocabulary(moe: MoEModel, seed: int) -> MoEModel:
    """Every non-special token gets another id: tokenizer, embedding rows and head rows renumbered alike."""
    result = copy.deepcopy(untied(moe))
    tokenizer = result.tokenizer
    special = set(tokenizer.all_special_ids)
    movable = [i for i in sorted(tokenizer.get_vocab().values()) if i not in special]
    shuffled = [movable[i] for i in torch.randperm(len(movable), generator=torch.Generator().manual_seed(seed))]
    new_ids = dict(zip(movable, shuffled))
    source = torch.arange(result.model.get_input_embeddings().weight.shape[0])
    for old, new in new_ids.items():
        source[new] = old
    for module in (result.model.get_input_embeddings(), result.model.get_output_embeddings()):
        module.weight.copy_(module.weight[source])
    result.tokenizer = _rebuilt_tokenizer(tokenizer, new_ids)
    return result


@torch.no_grad()
def extend_vocabulary(moe: MoEModel, seed: int, extra: int = 8) -> MoEModel:
    """``extra`` new tokens added at the end (random embedding and head rows)."""
    result = copy.deepcopy(moe)
    result.tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra)])
    old = result.model.get_input_embeddings().weight.shape[0]
    result.model.resize_token_embeddings(len(result.tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    for module in (result.model.get_input_embeddings(), result.model.get_output_embeddings()):
        rows = module.weight[old:]
        rows.copy_(torch.randn(rows.shape, generator=generator).to(rows) * module.weight[:old].std())
    return result


def _needs_tied_head(moe: MoEModel) -> str | None:
    head = moe.model.get_output_embeddings()
    return None if head is not None and head.weight is moe.model.get_input_embeddings().weight else "its head is not tied"


def untie_head(moe: MoEModel, seed: int) -> MoEModel:
    return untied(moe)


def cast_to(dtype: torch.dtype) -> Callable[[MoEModel, int], MoEModel]:
    def cast(moe: MoEModel, seed: int) -> MoEModel:
        result = copy.deepcopy(moe)
        result.model.to(dtype)
        return result

    return cast


def quantise(bits: int) -> Callable[[MoEModel, int], MoEModel]:
    """Round-to-nearest symmetric quantisation of every weight matrix, one scale per row (last axis)."""

    @torch.no_grad()
    def apply(moe: MoEModel, seed: int) -> MoEModel:
        result = copy.deepcopy(moe)
        levels = 2 ** (bits - 1) - 1
        for param in result.model.parameters():
            if param.ndim >= 2 and param.is_floating_point():
                step = param.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
                param.copy_(torch.round(param / step).clamp(-levels, levels) * step)
        return result

    return apply


@torch.no_grad()
def reinitialise_router(moe: MoEModel, seed: int) -> MoEModel:
    """Every router weight drawn afresh (normal, the model's initializer range), biases zeroed."""
    result = copy.deepcopy(moe)
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(result.model.config, "initializer_range", 0.02))
    for layer in result.layers:
        for ref in layer.tensors("router"):
            tensor = ref.get()
            if tensor.ndim == 2:
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor) * std)
            elif tensor.is_floating_point():
                tensor.zero_()
    return result


def _needs_layers(moe: MoEModel) -> str | None:
    return None if len(decoder_layers(moe)) >= 3 else "it has fewer than 3 decoder layers"


@torch.no_grad()
def drop_layer(moe: MoEModel, seed: int) -> MoEModel:
    """One decoder layer removed (the middle one; the first and last stay), in memory."""
    result = copy.deepcopy(moe)
    layers = decoder_layers(result)
    dropped = len(layers) // 2
    moe_dropped = [layer.index for layer in result.layers if layer.decoder_layer == dropped]
    del layers[dropped]
    config = result.model.config
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:dropped] + config.layer_types[dropped + 1:]
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    expert_ids = [ids for index, ids in enumerate(result.expert_ids) if index not in moe_dropped]
    rebuilt = MoEModel.from_model(result.model, result.tokenizer, source=result.source)
    rebuilt.expert_ids = expert_ids
    return rebuilt


@dataclass(frozen=True)
class Evasion:
    """A transformation of a carved model meant to hide its origin.

    ``apply(model, seed)`` returns the transformed model (the input is left alone);
    ``exact`` says the function is unchanged up to float rounding; ``kind`` groups the
    entries (residual stream, expert internals, vocabulary, precision, structure);
    ``unsupported(model)`` gives the reason it cannot be applied to a model, or None.
    """

    name: str
    kind: str
    exact: bool
    apply: Callable[[MoEModel, int], MoEModel]
    description: str
    unsupported: Callable[[MoEModel], str | None] = lambda moe: None


EVASIONS: dict[str, Evasion] = {
    e.name: e
    for e in (
        Evasion("permute residual", "residual", True, permute_residual,
                "residual-stream coordinates permuted (norm gains permuted with them)"),
        Evasion("rotate residual", "residual", True, rotate_residual,
                "norm gains folded into what reads them, residual stream rotated by a random orthogonal matrix and scaled"),
        Evasion("scale norms", "residual", True, scale_norms,
                "every norm gain scaled per coordinate (1/4..4), what reads the norm divided by the same factors"),
        Evasion("pad residual", "residual", True, pad_residual,
                "residual stream widened by 4 coordinates (zero-padded), norms folded, then rotated", _width_is_free),
        Evasion("shrink residual", "residual", False, shrink_residual,
                "residual stream narrowed by 4: the least-used principal directions of the residual states dropped",
                _width_is_free),
        Evasion("permute neurons", "expert", True, permute_neurons, "every expert's intermediate neurons permuted"),
        Evasion("scale neurons", "expert", True, scale_neurons,
                "every neuron's up projection times a (1/4..4), its down projection divided by a", _swiglu_only),
        Evasion("reorder experts", "expert", True, reorder_experts, "experts re-ordered in every layer (router rows with them)"),
        Evasion("reorder vocabulary", "vocabulary", True, reorder_vocabulary,
                "non-special tokens renumbered: tokenizer, embedding and head rows", _needs_tokenizer),
        Evasion("extend vocabulary", "vocabulary", True, extend_vocabulary,
                "8 tokens added to the tokenizer, embedding and head", _needs_tokenizer),
        Evasion("untie head", "vocabulary", True, untie_head, "a tied output head given its own copy of the weights",
                _needs_tied_head),
        Evasion("bfloat16", "precision", False, cast_to(torch.bfloat16), "cast to bfloat16"),
        Evasion("float16", "precision", False, cast_to(torch.float16), "cast to float16"),
        Evasion("quantise int8", "precision", False, quantise(8), "round-to-nearest 8-bit weights, one scale per row"),
        Evasion("quantise int4", "precision", False, quantise(4), "round-to-nearest 4-bit weights, one scale per row"),
        Evasion("re-initialise router", "structure", False, reinitialise_router, "router weights drawn afresh"),
        Evasion("drop layer", "structure", False, drop_layer, "the middle decoder layer removed", _needs_layers),
    )
}

# Every exact evasion that applies to any model of a supported family, in one composition.
COMPOSED = ("permute neurons", "reorder experts", "scale norms", "permute residual", "rotate residual", "pad residual")


def evade(moe: MoEModel, names: Sequence[str], *, seed: int = 0) -> MoEModel:
    """``moe`` transformed by the evasions ``names`` in order (seeds ``seed, seed + 1, ...``)."""
    for offset, name in enumerate(names):
        if name not in EVASIONS:
            raise InputError(f"unknown evasion {name!r}; known: {', '.join(EVASIONS)}.")
        evasion = EVASIONS[name]
        reason = evasion.unsupported(moe)
        if reason:
            raise InputError(f"evasion {name!r} does not apply to this model: {reason}.")
        moe = evasion.apply(moe, seed + offset)
    return moe


@torch.no_grad()
def output_difference(reference: MoEModel, candidate: MoEModel, *, batch: int = 4, length: int = 16, seed: int = 0) -> float:
    """``max |logit difference| / max |reference logit|`` on random sequences of tokens both models have.

    Both models run in float64 copies, so float32 rounding of the forward pass (and a
    router's near-tie it could flip) does not count as a change of function. Tokens
    are matched by their strings when both models have tokenizers (a renumbered or
    extended vocabulary is compared token for token), by id otherwise.
    """
    reference_ids, candidate_ids, _ = matched_token_ids(reference, candidate)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(reference_ids), (batch, length), generator=generator)
    outputs = []
    for moe, ids in ((reference, reference_ids), (candidate, candidate_ids)):
        model = copy.deepcopy(moe.model).to(torch.float64)
        model.set_experts_implementation("eager")  # the fused kernels take no float64
        logits = model(input_ids=ids[pick].to(moe.device), use_cache=False).logits.cpu()
        outputs.append(logits[..., ids])
    return float((outputs[0] - outputs[1]).abs().max() / outputs[0].abs().max())
