"""The simulated attacker of non-fine-tunable training, first order.

One simulated attack on a task's batch ``B``: mask the model to a keep set ``S``,
take ``n`` fine-tuning steps on ``B`` with the attacker's trainable parameters ``phi``
(router, experts or all), then measure the adapted masked loss:

    phi_0 = phi,   phi_{j+1} = phi_j - eta * u_j(grad_phi L_S(phi_j; B))
    penalty = relu(gamma - L_S(phi_n; B))

The update ``u_j`` is the attacker's optimiser: ``sign`` (Adam's first update, whose
bias-corrected ``m / sqrt(v)`` is ``sign(g)``), ``adam`` (Adam's moments over the
``n`` steps, betas 0.9 / 0.95, the re-alignment loop's) or ``sgd`` (the gradient
scaled to unit RMS per tensor, so one learning rate suits every optimiser). With
``reinit_routers`` the routers start from fresh random weights, as an attacker who
discards them would. The defense minimises the penalty with the first-order
meta-gradient: the gradient of the penalty at the adapted weights, applied to the
released weights (no second derivatives), so hardening costs ``n + 1`` extra
forward/backward passes per step.

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

from moeguard.attack.students import reinit_routers
from moeguard.defense.regularizers import first_order_surrogate, subset_failure
from moeguard.errors import InputError
from moeguard.models import MoEModel
from moeguard.models.keep_sets import KeepSets
from moeguard.realign.scopes import scope_parameters
from moeguard.training import lm_loss

# The re-alignment scopes a simulated attacker may train, and the optimisers it may use.
ATTACKER_TRAINABLES = ("router", "experts", "all")
OPTIMISERS = ("sign", "adam", "sgd")
ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8


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


class _InnerOptimiser:
    """The simulated attacker's update rule (see the module docstring), applied to the parameters' storage."""

    def __init__(self, kind: str, params: Sequence[nn.Parameter], lr: float) -> None:
        if kind not in OPTIMISERS:
            raise InputError(f"the simulated attacker's optimiser must be one of {', '.join(OPTIMISERS)}, got {kind!r}.")
        self.kind, self.params, self.lr, self.step_count = kind, params, lr, 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params] if kind == "adam" else []

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None]) -> None:
        self.step_count += 1
        for index, (param, grad) in enumerate(zip(self.params, grads)):
            if grad is None:
                continue
            if self.kind == "sign":
                update = grad.sign()
            elif self.kind == "sgd":
                update = grad / grad.pow(2).mean().sqrt().clamp_min(1e-12)
            else:
                first, second = self.moments[index]
                first.mul_(ADAM_BETAS[0]).add_(grad, alpha=1 - ADAM_BETAS[0])
                second.mul_(ADAM_BETAS[1]).addcmul_(grad, grad, value=1 - ADAM_BETAS[1])
                corrected_first = first / (1 - ADAM_BETAS[0] ** self.step_count)
                corrected_second = second / (1 - ADAM_BETAS[1] ** self.step_count)
                update = corrected_first / (corrected_second.sqrt() + ADAM_EPS)
            param.data.sub_(self.lr * update)


def simulated_attack(
    moe: MoEModel,
    batch: dict[str, torch.Tensor],
    keep: KeepSets,
    *,
    trainables: str = "experts",
    steps: int = 2,
    lr: float = 1e-3,
    gamma: torch.Tensor | float,
    optimiser: str = "sign",
    reinit_seed: int | None = None,
) -> SimulatedAttack:
    """Run one simulated attack (see the module docstring); the model is left exactly as it was.

    The returned ``surrogate`` carries the first-order gradient of the penalty for
    every parameter of the model that requires a gradient (the routers excepted when
    ``reinit_seed`` draws fresh ones before the attack: the released routers took no part).
    """
    attacked = attacker_parameters(moe, trainables)
    if not attacked:
        raise InputError(f"the simulated attacker trains the {trainables} parameters, but none of them requires a gradient.")
    routers = [p for layer in moe.layers for p in layer.router_parameters()]
    touched = attacked + [p for p in routers if all(p is not q for q in attacked)]
    released = [p.detach().clone() for p in touched]
    replaced = {id(p) for p in routers} if reinit_seed is not None else set()
    outer = [p for p in moe.model.parameters() if p.requires_grad and id(p) not in replaced]
    update = _InnerOptimiser(optimiser, attacked, lr)
    try:
        if reinit_seed is not None:
            reinit_routers(moe, reinit_seed)
        with moe.mask_experts(keep):
            initial = None
            for _ in range(steps):
                loss = lm_loss(moe, batch)
                initial = loss.item() if initial is None else initial
                update.step(torch.autograd.grad(loss, attacked, allow_unused=True))
            adapted = lm_loss(moe, batch)
            penalty = subset_failure(adapted.unsqueeze(0), gamma)
            if penalty.requires_grad:
                meta = torch.autograd.grad(penalty, outer, allow_unused=True)
            else:
                meta = [None] * len(outer)
    finally:
        with torch.no_grad():
            for param, value in zip(touched, released):
                param.data.copy_(value)
    pairs = [(p, g) for p, g in zip(outer, meta) if g is not None]
    surrogate = first_order_surrogate([p for p, _ in pairs], [g for _, g in pairs], penalty)
    return SimulatedAttack(adapted.item(), initial, penalty.item(), surrogate)
