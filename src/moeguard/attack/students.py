"""The two students of the head start: the carved model, and a fresh one of the same architecture.

- :func:`carve`: a physical copy of the model with only the kept experts (routers and
  expert tensors sliced, config updated), the model the attacker re-aligns. The
  original (the teacher) is left untouched.
- :func:`scratch_student`: a model built from the carved model's config alone (same
  family, layers, kept expert count, widths, tokenizer), initialised afresh from a
  seed: none of the parent's weights.
- :func:`reinit_routers`: fresh random router weights, for an attacker who does not
  trust the released routers.
"""

from __future__ import annotations

import copy

import torch

from moeguard.models import KeepSets, MoEModel
from moeguard.pruning.plans import LayerLimits, uniform_keep
from moeguard.realign.state import derive_seed


def carve(moe: MoEModel, keep: KeepSets) -> MoEModel:
    """A pruned copy of ``moe`` keeping ``keep`` (the same count in every layer); ``moe`` is not changed."""
    carved = copy.deepcopy(moe)
    carved.prune(keep)
    return carved


def uniform_keep_sets(moe: MoEModel, keep: int) -> dict[int, list[int]]:
    """Some feasible keep sets of ``keep`` experts in every layer (the carved architecture does not depend on which)."""
    limits = [LayerLimits.of(layer) for layer in moe.layers]
    return dict(enumerate(uniform_keep(torch.zeros(len(limits), max(moe.num_experts)), limits, keep)))


def carved_architecture(moe: MoEModel, keep: int) -> MoEModel:
    """The model carved to ``keep`` experts per layer, its kept weights shared with ``moe`` (no copy).

    Only for reading the config and parameter counts: training it would change ``moe``.
    """
    shell = moe.weight_sharing_copy()
    shell.prune(uniform_keep_sets(moe, keep))
    return shell


def scratch_student(architecture: MoEModel, seed: int) -> MoEModel:
    """A freshly initialised model of ``architecture``'s config (its tokenizer, dtype and device), from ``seed``.

    The initialisation draws from a stream derived from ``seed``, never ``torch.manual_seed(seed)`` itself, so a
    student cannot start from the very initialisation a parent trained from the same small seed started from.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(architecture.config)
    parameter = next(architecture.model.parameters())
    torch.manual_seed(derive_seed(seed, "scratch student"))
    model = AutoModelForCausalLM.from_config(config, dtype=parameter.dtype)
    model.to(parameter.device)
    model.eval()
    return MoEModel.from_model(model, architecture.tokenizer, source=f"scratch:{architecture.model_type}:seed{seed}")


@torch.no_grad()
def reinit_routers(moe: MoEModel, seed: int) -> None:
    """Give every router fresh weights in place: ``N(0, initializer_range^2)`` matrices, zero vectors.

    Written into the parameters' storage, so that a simulated attack inside a training step (which puts the
    released values back afterwards) leaves that step's autograd graph valid.
    """
    std = getattr(moe.config.get_text_config(), "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    for layer in moe.layers:
        for param in layer.router_parameters():
            fresh = torch.randn(param.shape, generator=generator) * std if param.ndim > 1 else torch.zeros(param.shape)
            param.data.copy_(fresh.to(device=param.device, dtype=param.dtype))
