"""Hardening: the defense objective inside the training loop, and the simulated attacker."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_char_moe

from moeguard.data import batches, build_char_tokenizer, load_task, mixture
from moeguard.defense.attacker import attacker_parameters, simulated_attack
from moeguard.defense.harden import HardenSettings, harden, task_of_examples
from moeguard.defense.objective import DefenseConfig, DefenseObjective, defense_config
from moeguard.defense.parameter_groups import group_parameters
from moeguard.defense.regularizers import kl_to_uniform
from moeguard.errors import InputError
from moeguard.training import lm_loss, train

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_char_tokenizer()
TASKS = [load_task(name, "train", limit=48) for name in ("addition", "reverse")]


def char_moe(family: str = "mixtral"):
    return tiny_char_moe(family)


def first_batch(size: int = 16, tasks=TASKS):
    return next(batches(TOKENIZER, mixture(tasks), batch_size=size, shuffle=True, seed=3))


def task_routing_kl(moe) -> float:
    """Mean over layers and tasks of KL(task's top-k routing frequencies || uniform)."""
    batch = first_batch(96)
    tokens = batch["attention_mask"].bool()
    task = task_of_examples(TASKS)[batch["example_index"]].unsqueeze(1).expand_as(tokens)[tokens]
    with moe.capture_routing() as capture, torch.no_grad():
        moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    values = []
    for layer in range(moe.num_layers):
        chosen = capture.indices(layer)
        for number in range(len(TASKS)):
            counts = torch.bincount(chosen[task == number].reshape(-1), minlength=8).double()
            values.append(kl_to_uniform(counts / counts.sum()).item())
    return sum(values) / len(values)


def run_objective(moe, config: DefenseConfig, batch):
    """One forward pass with the objective attached; returns (task loss, extra loss, objective)."""
    objective = DefenseObjective(moe, config, task_of_examples(TASKS), len(TASKS), seed=0)
    with objective.attached():
        outputs = moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        extra = objective(moe, batch, outputs)
    return outputs, extra, objective


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_every_term_is_finite_and_reaches_the_parameters_it_shapes(family):
    moe = char_moe(family)
    batch = first_batch()
    config = defense_config("entangle+attacker", keep_counts=(4,))
    _, extra, objective = run_objective(moe, config, batch)
    assert torch.isfinite(extra) and extra.item() > 0
    assert set(objective.log.means()) >= {"dispersion", "contribution", "subset_failure", "attacker"}
    extra.backward()
    layer = moe.layers[0]
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.expert_parameters())


def test_training_with_routing_dispersion_spreads_each_tasks_routing():
    settings = dict(steps=20, lr=3e-3)
    plain = char_moe()
    train(plain, batches(TOKENIZER, mixture(TASKS), batch_size=16, shuffle=True, epochs=None), progress=False, **settings)
    defended = char_moe()
    harden(defended, TASKS, defense_config("dispersion"), HardenSettings(batch_size=16, warmup=0, **settings), progress=False)
    assert task_routing_kl(defended) < 0.5 * task_routing_kl(plain)


def test_a_descent_step_on_subset_failure_raises_the_masked_loss():
    moe = char_moe()
    batch = first_batch()
    # One random subset, no attribution subset: the same subset before and after the step.
    config = DefenseConfig(subset_failure=1.0, keep_counts=(4,), attribution_subsets=0, margin=10.0)
    objective = DefenseObjective(moe, config, task_of_examples(TASKS), len(TASKS), seed=0)
    keep = objective._random_keep_sets(4)
    objective.generator.manual_seed(0)
    with torch.no_grad(), moe.mask_experts(keep):
        before = lm_loss(moe, batch).item()
    with objective.attached():
        outputs = moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        objective(moe, batch, outputs).backward()
    with torch.no_grad():
        for p in moe.model.parameters():
            p.sub_(1e-2 * p.grad)
        with moe.mask_experts(keep):
            assert lm_loss(moe, batch).item() > before


def test_the_simulated_attack_leaves_the_model_unchanged_and_gives_the_first_order_meta_gradient():
    moe = char_moe()
    batch = first_batch(8)
    keep = {0: [0, 1, 2, 3], 1: [2, 3, 4, 5]}
    before = {name: p.detach().clone() for name, p in moe.model.named_parameters()}
    flags = {name: p.requires_grad for name, p in moe.model.named_parameters()}
    attack = simulated_attack(moe, batch, keep, trainables="experts", steps=2, lr=1e-2, gamma=100.0)
    for name, p in moe.model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad == flags[name]
    assert attack.attacked_loss < attack.initial_loss  # the attacker did learn
    assert attack.penalty == pytest.approx(100.0 - attack.attacked_loss)
    attack.surrogate.backward()

    # The same attack by hand on a copy: sign steps on the experts, then the gradient at the adapted weights.
    copy_moe = copy.deepcopy(moe)
    experts = attacker_parameters(copy_moe, "experts")
    with copy_moe.mask_experts(keep):
        for _ in range(2):
            grads = torch.autograd.grad(lm_loss(copy_moe, batch), experts)
            with torch.no_grad():
                for p, g in zip(experts, grads):
                    p.sub_(1e-2 * g.sign())
        (100.0 - lm_loss(copy_moe, batch)).backward()
    for (name, p), (_, q) in zip(moe.model.named_parameters(), copy_moe.model.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_after_hardening_with_the_simulated_attacker_a_permitted_fine_tune_still_learns_a_new_task():
    moe = char_moe()
    config = defense_config("attacker", keep_counts=(4,), attacker_lr=1e-2)
    harden(moe, TASKS, config, HardenSettings(steps=4, batch_size=8, lr=1e-3, warmup=0), progress=False)
    permitted = group_parameters(moe, ["router", "attention"])
    assert permitted and all(p.requires_grad for p in permitted)
    new_task = [load_task("upper", "train", limit=32)]
    batch = first_batch(32, new_task)
    with torch.no_grad():
        before = lm_loss(moe, batch).item()
    experts_before = [p.detach().clone() for p in attacker_parameters(moe, "experts")]
    train(moe, batches(TOKENIZER, new_task[0], batch_size=16, epochs=None), steps=15, lr=3e-3, parameters=permitted, progress=False)
    with torch.no_grad():
        assert lm_loss(moe, batch).item() < before - 0.2
    assert all(torch.equal(p, q) for p, q in zip(attacker_parameters(moe, "experts"), experts_before))


def test_bad_defense_settings_are_refused_with_the_fix():
    with pytest.raises(InputError, match="unknown defense method 'entangled'"):
        defense_config("entangled")
    with pytest.raises(InputError, match="dispersion must be a number >= 0"):
        DefenseConfig(dispersion=-1.0)
    with pytest.raises(InputError, match="no active term"):
        DefenseObjective(char_moe(), DefenseConfig(), task_of_examples(TASKS), 2)
    with pytest.raises(InputError, match="none of the keep counts"):
        DefenseObjective(char_moe(), DefenseConfig(subset_failure=1.0, keep_counts=(1, 8)), task_of_examples(TASKS), 2)


def test_a_hardened_demo_model_loads_with_stock_transformers_beside_its_protocol(trained_tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeguard.cli import main
    from moeguard.defense.protocol import PROTOCOL_NAME, Protocol
    from moeguard.defense.verify import verify_fine_tune
    from moeguard.models import MoEModel

    out = tmp_path / "hardened"
    code = main(["harden", "--model", str(trained_tiny), "--method", "entangle+attacker", "--tasks", "reverse,upper",
                 "--steps", "3", "--batch-size", "8", "--train-examples", "32", "--eval-examples", "8",
                 "--keep-counts", "4", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["harden"]["steps"] == 3 and set(report["harden"]["terms"]) >= {"dispersion", "subset_failure", "attacker"}
    model = AutoModelForCausalLM.from_pretrained(out)  # stock classes, no custom code
    tokenizer = AutoTokenizer.from_pretrained(out)
    hardened = MoEModel.from_model(model, tokenizer)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and hardened.num_experts == [8, 8]
    assert report["fingerprint"] == hardened.fingerprint()
    assert verify_fine_tune(hardened, Protocol.load(out / PROTOCOL_NAME)).compliant


def test_the_demo_model_trains_defended_from_scratch(tmp_path):
    from moeguard.defense.harden import demo_defense_loss
    from moeguard.zoo import DemoConfig, train_demo

    config = DemoConfig(layers=1, hidden=32, expert_hidden=32, tasks=("upper", "reverse"), train_examples=64, steps=6,
                        batch_size=8, warmup=1)
    loss = demo_defense_loss(config, "entangle", seed=0)
    train_demo(tmp_path / "demo", config, extra_loss=loss, progress=False)
    # The objective bound itself on the first step and ran on every later one.
    assert loss.objective is not None and loss.objective.log.steps == config.steps - 1
    assert set(loss.objective.log.means()) == {"dispersion", "contribution", "subset_failure"}


def test_the_from_scratch_defense_labels_every_example_of_a_weighted_demo_mixture_with_its_task():
    from moeguard.data.tasks import task_spec
    from moeguard.defense.harden import demo_defense_loss
    from moeguard.zoo import DemoConfig

    # Reverse sampled twice as often: the mixture train_demo builds has 8 upper then 16 reverse examples.
    config = DemoConfig(tasks=("upper", "reverse"), train_examples=8, task_weights=(("reverse", 2.0),))
    loss = demo_defense_loss(config, "entangle", seed=0)
    data = mixture([load_task(task, "train", limit=config.examples_of(task)) for task in config.tasks])
    assert len(loss.task_of_example) == len(data) == 24
    for example, task in zip(data.examples, loss.task_of_example.tolist()):
        assert example.prompt.startswith(task_spec(config.tasks[task]).tag + " ")
