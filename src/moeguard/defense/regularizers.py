"""The defense regularisers: pure functions over tensors.

Notation: a batch holds ``n`` routed tokens; token ``t`` belongs to task ``c(t)``;
``p_t`` is its routing distribution over the ``E`` experts of one MoE layer
(softmax of the router logits), ``S_t`` the ``k`` experts it is sent to with weights
``w_{t,i}``, and ``y_{t,i}`` expert ``i``'s output on it. ``U`` is the uniform
distribution over experts. Every function returns a scalar to *minimise* (added to
the task loss with a weight) and is differentiable in its floating-point inputs.
"""

from __future__ import annotations

import torch


def kl_to_uniform(distribution: torch.Tensor) -> torch.Tensor:
    """``KL(q || U) = sum_i q_i log(E q_i)`` over the last axis (``0 log 0 = 0``).

    Zero for the uniform distribution, ``log E`` for a one-hot one. ``distribution``
    must sum to one over its last axis.
    """
    num_experts = distribution.shape[-1]
    safe = distribution.clamp_min(torch.finfo(distribution.dtype).tiny)
    terms = torch.where(distribution > 0, distribution * torch.log(safe * num_experts), torch.zeros_like(distribution))
    return terms.sum(-1)


def task_means(values: torch.Tensor, task: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task sums of ``values [n, E]``: ``(sums [T, E], token counts [T])``.

    ``sums[c] = sum_{t: c(t) = c} values[t]``; ``task`` is ``[n]`` with values in ``0..T-1``.
    """
    sums = values.new_zeros(num_tasks, values.shape[-1]).index_add(0, task.long(), values)
    counts = torch.bincount(task.long(), minlength=num_tasks)
    return sums, counts


def routing_dispersion(probs: torch.Tensor, task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean over the tasks present of ``KL(pbar_c || U)``, ``pbar_c = mean_{t: c(t)=c} p_t``.

    ``probs`` is ``[n, E]`` (rows sum to one). Zero when every task spreads its
    routing mass evenly over all experts, so no small expert subset serves a task;
    ``log E`` when a task always routes to one expert. Only the task *average* is
    pushed towards uniform: single tokens stay free to route sharply.
    """
    sums, counts = task_means(probs, task, num_tasks)
    present = counts > 0
    means = sums[present] / counts[present].unsqueeze(1).to(probs.dtype)
    return kl_to_uniform(means).mean()


def contribution_shares(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    output_norms: torch.Tensor,
    task: torch.Tensor,
    num_tasks: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's share of routed contribution per expert: ``(shares [T, E], present [T])``.

    ``a_{c,i} = sum_{t: c(t)=c} sum_{i in S_t} w_{t,i} ||y_{t,i}||`` and
    ``shares[c, i] = a_{c,i} / sum_j a_{c,j}`` (the per-task REAP-style mass);
    ``present[c]`` says whether task ``c`` has tokens with non-zero contribution.
    All of ``top_k_index``, ``top_k_weights``, ``output_norms`` are ``[n, k]``.
    """
    mass = top_k_weights * output_norms
    per_token = mass.new_zeros(mass.shape[0], num_experts).scatter_add(1, top_k_index.long(), mass)
    sums, _ = task_means(per_token, task, num_tasks)
    totals = sums.sum(-1)
    present = totals > 0
    shares = sums / totals.clamp_min(torch.finfo(sums.dtype).tiny).unsqueeze(1)
    return shares, present


def contribution_dispersion(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    output_norms: torch.Tensor,
    task: torch.Tensor,
    num_tasks: int,
    num_experts: int,
) -> torch.Tensor:
    """Mean over the tasks present of ``KL(s_c || U)`` with ``s_c`` from :func:`contribution_shares`.

    Routing dispersion alone can be met by routing evenly while some experts
    return near-zero outputs; those experts look idle to an output-aware
    attribution (REAP: weight x output norm) and are pruned for free. This term
    spreads the *contribution* ``w ||y||`` evenly instead, so frequency- and
    contribution-based attribution both find no small subset that carries a task.
    """
    shares, present = contribution_shares(top_k_index, top_k_weights, output_norms, task, num_tasks, num_experts)
    return kl_to_uniform(shares[present]).mean()


def subset_failure(masked_losses: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """Anti-prunability: ``mean_S relu(gamma - L(masked to S))``.

    With the task loss ``L(full)`` the hardening objective is
    ``L = L(full) + lambda * mean_S relu(gamma - L(masked to S))``: the full model
    stays good while every sampled expert subset ``S`` (random, or a task's top
    experts by current attribution) is pushed to a loss of at least ``gamma``.
    Subsets already that bad contribute nothing (no unbounded ascent).
    ``masked_losses`` is ``[num_subsets]``.
    """
    gamma = torch.as_tensor(gamma, dtype=masked_losses.dtype, device=masked_losses.device)
    return torch.relu(gamma - masked_losses).mean()


def first_order_surrogate(
    params: list[torch.Tensor], grads: list[torch.Tensor], value: torch.Tensor
) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``params[j]`` is ``grads[j]``.

    ``value.detach() + sum_j <theta_j, g_j> - sum_j <theta_j, g_j>.detach()``: how a
    first-order meta-gradient (the gradient of a loss measured at adapted weights
    ``theta'``, applied to ``theta``; first-order MAML) enters an ordinary
    ``loss.backward()``.
    """
    inner = value.new_zeros(())
    for param, grad in zip(params, grads):
        inner = inner + (param * grad.detach().to(param.dtype)).sum()
    return value.detach() + inner - inner.detach()
