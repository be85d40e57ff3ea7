"""The simulated attacker of non-fine-tunable training, first order.

One simulated attack on a task's batch ``B``: mask the model to the task's top
experts ``S``, take ``n`` fine-tuning steps on ``B`` with the attacker's trainable
parameters ``phi`` (router, experts or all), then measure the adapted masked loss:

    phi_0 = phi,   phi_{j+1} = phi_j - eta * sign(grad_phi L_S(phi_j; B))
    penalty = relu(gamma - L_S(phi_n; B))

Sign steps are what Adam's first updates are (``m / sqrt(v) = sign(g)`` after bias
correction), the optimiser an attacker would use. The defense minimises the penalty
with the first-order meta-gradient: the gradient of the penalty at the adapted
weights, applied to the released weights (no second derivatives), so hardening costs
``n + 1`` extra forward/backward passes per step.

The adapted weights are written into the parameters' storage (``.data``) and
restored bit for bit before the training step's backward pass runs, so the
training graph, which holds those same tensors, is unaffected. Which parameters
require a gradient is never changed: the permitted groups stay trainable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moeguard.defense.regularizers import first_order_surrogate, subset_failure
from moeguard.errors import InputError
from moeguard.models import MoEModel
from moeguard.models.keep_sets import KeepSets
from moeguard.realign.scopes import scope_parameters
from moeguard.training import lm_loss

# The re-alignment scopes a simulated attacker may train.
ATTACKER_TRAINABLES = ("router", "experts", "all")


@dataclass
class SimulatedAttack:
    """One simulated attack: the loss the attacker reached, the hinge penalty, and its first-order surrogate."""

    attacked_loss: float
    initial_loss: float
    penalty: float
    surrogate: torch.Tensor


def attacker_parameters(moe: MoEModel, trainables: str) -> list[nn.Parameter]:
    """What a re-aligning attacker trains: the routers, the routed experts, or everything (the
    re-alignment scopes of the same names)."""
    if trainables not in ATTACKER_TRAINABLES:
        raise InputError(f"attacker trainables must be {', '.join(ATTACKER_TRAINABLES)}, got {trainables!r}.")
    return [p for p in scope_parameters(moe, trainables).values() if p.requires_grad]


def _sign_step(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None], lr: float) -> None:
    with torch.no_grad():
        for param, grad in zip(params, grads):
            if grad is not None:
                param.data.sub_(lr * grad.sign())


def simulated_attack(
    moe: MoEModel,
    batch: dict[str, torch.Tensor],
    keep: KeepSets,
    *,
    trainables: str = "experts",
    steps: int = 2,
    lr: float = 1e-3,
    gamma: torch.Tensor | float,
) -> SimulatedAttack:
    """Run one simulated attack (see the module docstring); the model is left exactly as it was.

    The returned ``surrogate`` carries the first-order gradient of the penalty for
    every parameter of the model that requires a gradient.
    """
    attacked = attacker_parameters(moe, trainables)
    if not attacked:
        raise InputError(f"the simulated attacker trains the {trainables} parameters, but none of them requires a gradient.")
    released = [p.detach().clone() for p in attacked]
    outer = [p for p in moe.model.parameters() if p.requires_grad]
    try:
        with moe.mask_experts(keep):
            initial = None
            for _ in range(steps):
                loss = lm_loss(moe, batch)
                initial = loss.item() if initial is None else initial
                grads = torch.autograd.grad(loss, attacked, allow_unused=True)
                _sign_step(attacked, grads, lr)
            adapted = lm_loss(moe, batch)
            penalty = subset_failure(adapted.unsqueeze(0), gamma)
            if penalty.requires_grad:
                meta = torch.autograd.grad(penalty, outer, allow_unused=True)
            else:
                meta = [None] * len(outer)
    finally:
        with torch.no_grad():
            for param, value in zip(attacked, released):
                param.data.copy_(value)
    pairs = [(p, g) for p, g in zip(outer, meta) if g is not None]
    surrogate = first_order_surrogate([p for p, _ in pairs], [g for _, g in pairs], penalty)
    return SimulatedAttack(adapted.item(), initial, penalty.item(), surrogate)
