"""The defense regularisers: values and gradients on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from moeguard.defense.regularizers import (
    contribution_dispersion,
    contribution_shares,
    first_order_surrogate,
    kl_to_uniform,
    routing_dispersion,
    subset_failure,
)


def test_kl_to_uniform_is_zero_for_uniform_and_log_e_for_one_hot():
    values = kl_to_uniform(torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]))
    assert torch.allclose(values, torch.tensor([0.0, math.log(4), math.log(2)]), atol=1e-6)


def test_routing_dispersion_averages_the_kl_of_each_tasks_mean_routing():
    probs = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # task 0
            [0.0, 1.0, 0.0, 0.0],  # task 0 -> mean [.5, .5, 0, 0], KL = log 2
            [0.25, 0.25, 0.25, 0.25],  # task 2 -> uniform, KL = 0
        ]
    )
    task = torch.tensor([0, 0, 2])
    # Task 1 has no tokens and must not count as a (zero) term of the mean.
    assert routing_dispersion(probs, task, num_tasks=3).item() == pytest.approx(math.log(2) / 2)


def test_routing_dispersion_is_zero_when_tokens_are_sharp_but_the_task_average_is_uniform():
    probs = torch.eye(4)
    assert routing_dispersion(probs, torch.zeros(4, dtype=torch.long), 1).item() == pytest.approx(0.0, abs=1e-7)


def test_routing_dispersion_gradient_matches_the_closed_form():
    # dD/dp_{t,i} = (log(E pbar_{c,i}) + 1) / (T n_c)  for token t of task c.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    probs.requires_grad_(True)
    task = torch.tensor([0, 0, 1])
    routing_dispersion(probs, task, 2).backward()
    mean0 = probs.detach()[:2].mean(0)
    mean1 = probs.detach()[2]
    expected = torch.stack(
        [(torch.log(4 * mean0) + 1) / (2 * 2), (torch.log(4 * mean0) + 1) / (2 * 2), (torch.log(4 * mean1) + 1) / (2 * 1)]
    )
    assert torch.allclose(probs.grad, expected)


def test_routing_dispersion_descent_moves_router_logits_away_from_the_overused_expert():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]], requires_grad=True)
    routing_dispersion(logits.softmax(-1), torch.zeros(2, dtype=torch.long), 1).backward()
    assert (logits.grad[:, 0] > 0).all()  # descent lowers the favoured expert's logit
    assert (logits.grad[:, 2:] < 0).all()  # and raises the idle experts'


def contribution_example(dtype=torch.float32):
    index = torch.tensor([[0, 1], [1, 2], [3, 0]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.6, 0.4]], dtype=dtype)
    norms = torch.tensor([[2.0, 4.0], [1.0, 1.0], [3.0, 1.0]], dtype=dtype)
    task = torch.tensor([0, 0, 1])
    return index, weights, norms, task


def test_contribution_shares_weigh_routing_by_output_norm():
    index, weights, norms, task = contribution_example()
    shares, present = contribution_shares(index, weights, norms, task, num_tasks=3, num_experts=4)
    # task 0: expert 0 gets .75*2, expert 1 .25*4 + .5*1, expert 2 .5*1 -> [1.5, 1.5, .5, 0] / 3.5
    assert torch.allclose(shares[0], torch.tensor([3 / 7, 3 / 7, 1 / 7, 0.0]))
    # task 1: expert 3 gets .6*3, expert 0 .4*1 -> [.4, 0, 0, 1.8] / 2.2
    assert torch.allclose(shares[1], torch.tensor([0.4 / 2.2, 0.0, 0.0, 1.8 / 2.2]))
    assert present.tolist() == [True, True, False]


def test_contribution_dispersion_value_and_gradient_match_the_closed_form():
    # One task whose two tokens reach all four experts (every share positive).
    index = torch.tensor([[0, 1], [2, 3]])
    task = torch.zeros(2, dtype=torch.long)
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    norms = torch.tensor([[2.0, 4.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    value = contribution_dispersion(index, weights, norms, task, 1, 4)
    mass = torch.tensor([0.75 * 2, 0.25 * 4, 0.5 * 1, 0.5 * 1], dtype=torch.float64)
    shares = mass / mass.sum()
    kl = (shares * torch.log(4 * shares)).sum()
    assert value.item() == pytest.approx(kl.item())
    value.backward()
    # dKL/da_m = (log(E s_m) - KL) / A, and a_m = w * ||y|| for the one pair routed to m.
    da = (torch.log(4 * shares) - kl) / mass.sum()
    expected = torch.stack([da[:2] * weights[0], da[2:] * weights[1]])
    assert torch.allclose(norms.grad, expected)
    assert norms.grad[0, 0] > 0 and norms.grad[1, 0] < 0  # descent shrinks the dominant expert's output


def test_subset_failure_penalises_only_subsets_whose_loss_is_below_gamma():
    losses = torch.tensor([1.0, 3.0, 1.5], requires_grad=True)
    value = subset_failure(losses, gamma=2.0)
    assert value.item() == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    value.backward()
    assert torch.allclose(losses.grad, torch.tensor([-1 / 3, 0.0, -1 / 3]))


def test_first_order_surrogate_has_the_given_value_and_gradients():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    grads = [torch.tensor([0.5, -1.0]), torch.tensor([[2.0]])]
    value = first_order_surrogate([a, b], grads, torch.tensor(7.0))
    assert value.item() == pytest.approx(7.0)
    value.backward()
    assert torch.equal(a.grad, grads[0]) and torch.equal(b.grad, grads[1])
