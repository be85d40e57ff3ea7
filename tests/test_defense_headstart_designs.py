"""The defenses aimed at the head start, on tiny models: their terms run, change what they should, and the
defended model stays a stock transformers model."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_char_moe
from moeguard.attack.canonical import blind_coordinates, fold_blind_coordinates
from moeguard.attack.students import carve, uniform_keep_sets
from moeguard.attack.teacher import state_distance
from moeguard.data import batches, build_char_tokenizer, load_task, mixture
from moeguard.defense.attacker import _InnerOptimiser, simulated_attack
from moeguard.defense.harden import HardenSettings, harden, task_of_examples
from moeguard.defense.keys import add_keys, key_leak, token_keys
from moeguard.defense.objective import DefenseObjective, defense_config
from moeguard.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_char_tokenizer()
TASKS = [load_task(name, "train", limit=48) for name in ("upper", "reverse")]


def char_moe(family: str = "qwen3_moe"):
    return tiny_char_moe(family)


def first_batch(size: int = 16):
    return next(batches(TOKENIZER, mixture(TASKS), batch_size=size, shuffle=True, seed=3))


def test_the_inner_optimisers_step_as_specified():
    param = torch.nn.Parameter(torch.zeros(4))
    grad = torch.tensor([0.5, -2.0, 0.0, 4.0])
    for kind, expected in (("sign", grad.sign()), ("sgd", grad / grad.pow(2).mean().sqrt())):
        param.data.zero_()
        _InnerOptimiser(kind, [param], lr=0.1).step([grad])
        torch.testing.assert_close(param.data, -0.1 * expected)
    param.data.zero_()
    adam = _InnerOptimiser("adam", [param], lr=0.1)
    adam.step([grad])  # Adam's first bias-corrected step is the sign of the gradient (where it is not zero)
    torch.testing.assert_close(param.data, -0.1 * grad.sign(), atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="optimiser"):
        _InnerOptimiser("lbfgs", [param], lr=0.1)


def test_a_simulated_attack_with_fresh_routers_restores_them_and_leaves_them_out_of_the_meta_gradient():
    moe = char_moe()
    batch = first_batch(8)
    before = {name: p.detach().clone() for name, p in moe.model.named_parameters()}
    attack = simulated_attack(moe, batch, {0: [0, 1], 1: [2, 3]}, trainables="all", steps=2, lr=1e-2, gamma=50.0,
                              optimiser="adam", reinit_seed=4)
    for name, p in moe.model.named_parameters():
        assert torch.equal(p, before[name]), name
    attack.surrogate.backward()
    routers = {id(p) for layer in moe.layers for p in layer.router_parameters()}
    assert all(p.grad is None for p in moe.model.parameters() if id(p) in routers)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.model.parameters() if id(p) not in routers)


def test_the_ntl_term_hinges_at_a_random_initialisations_loss_and_reaches_the_released_weights():
    moe = char_moe()
    batch = first_batch()
    config = defense_config("ntl", ntl_steps=(2,), ntl_lrs=(1e-2,), ntl_subsets=("random", "search"), keep_counts=(2,))
    objective = DefenseObjective(moe, config, task_of_examples(TASKS), len(TASKS), seed=0)
    before = {name: p.detach().clone() for name, p in moe.model.named_parameters()}
    with objective.attached():
        outputs = moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        extra = objective(moe, batch, outputs)
    assert torch.isfinite(extra)
    assert {"ntl", "ntl_attacked_loss", "distill"} <= set(objective.log.means())
    # A fresh model of the carved architecture was measured once for the drawn attacker; the hinge sits at its loss.
    assert len(objective._random_init_losses) == 1 and list(objective._random_init_losses.values())[0] > 0
    extra.backward()
    assert sum(float(p.grad.abs().sum()) for p in moe.model.parameters() if p.grad is not None) > 0
    for name, p in moe.model.named_parameters():  # the simulated attacks left the weights as they were
        assert torch.equal(p, before[name]), name
    assert objective.log.means()["distill"] == pytest.approx(0.0, abs=1e-6)  # nothing trained yet: same answers


def test_keys_are_random_per_token_on_a_few_coordinates_and_of_the_given_norm():
    keyed = token_keys(vocab=30, hidden=16, dims=4, norm=5.0, seed=1)
    assert len(keyed.coordinates) == 4 and keyed.keys.shape == (30, 16)
    outside = torch.ones(16, dtype=torch.bool)
    outside[keyed.coordinates] = False
    assert torch.all(keyed.keys[:, outside] == 0)
    torch.testing.assert_close(keyed.keys.norm(dim=1), torch.full((30,), 5.0))
    assert torch.equal(token_keys(30, 16, 4, 5.0, 1).keys, keyed.keys) and not torch.equal(token_keys(30, 16, 4, 5.0, 2).keys, keyed.keys)
    with pytest.raises(InputError, match="key_dims"):
        token_keys(30, 16, 16, 5.0, 1)


def test_key_leak_measures_what_attention_writes_along_each_tokens_own_key():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    mask = torch.ones(1, 2)
    assert key_leak(-keys, keys, mask).item() == pytest.approx(1.0)  # cancelling every key
    assert key_leak(torch.tensor([[[0.0, 5.0], [3.0, 0.0]]]), keys, mask).item() == pytest.approx(0.0)  # across them


def test_state_distance_is_the_relative_squared_error_over_the_masked_tokens():
    reference = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    hidden = torch.tensor([[[3.0, 4.0], [9.0, 9.0]]])
    assert state_distance(hidden, reference, torch.tensor([[1, 0]])).item() == 0.0
    assert state_distance(hidden * 0, reference, torch.tensor([[1, 1]])).item() == pytest.approx(1.0)


def test_keyed_embeddings_blind_the_first_layer_and_a_keyed_model_saves_and_loads_as_a_stock_model(tmp_path):
    from transformers import AutoModelForCausalLM

    moe = char_moe()
    embedding = moe.model.get_input_embeddings().weight.detach().clone()
    keyed = add_keys(moe, scale=3.0, dims=8, seed=0)
    assert torch.equal(blind_coordinates(moe), keyed.coordinates)
    assert not len(blind_coordinates(char_moe()))  # an ordinary model has none
    torch.testing.assert_close(moe.model.get_input_embeddings().weight.detach() - embedding, keyed.keys)
    moe.save(tmp_path / "keyed")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "keyed")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, moe.model(input_ids=ids).logits)


@pytest.mark.slow
def test_hardening_with_keys_trains_only_the_first_layer_towards_the_undefended_residual_stream():
    moe = char_moe()
    reference = copy.deepcopy(moe)
    keyed_start = copy.deepcopy(moe)
    add_keys(keyed_start, scale=3.0, dims=8, seed=0)  # what hardening starts from (the same keys: key_seed 0)
    later = {name: p.detach().clone() for name, p in moe.model.named_parameters() if ".layers.1." in name}
    batch = first_batch(32)

    def distance(model):
        with torch.no_grad():
            states = [m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True).hidden_states[1] for m in (model, reference)]
        return state_distance(states[0], states[1], batch["attention_mask"]).item()

    config = defense_config("keys", keys=3.0, key_dims=8)
    harden(moe, TASKS, config, HardenSettings(steps=60, lr=3e-3, batch_size=16), progress=False)
    for name, p in moe.model.named_parameters():
        if name in later:
            assert torch.equal(p, later[name]), name
    assert distance(moe) < 0.5 * distance(keyed_start)  # the first layer learned to give back the undefended stream
    assert torch.equal(blind_coordinates(moe), blind_coordinates(keyed_start))  # its norms stayed blind to the keys


def test_folding_the_blind_coordinates_makes_a_carve_write_what_the_full_model_writes_there():
    moe = char_moe()
    keyed = add_keys(moe, scale=3.0, dims=8, seed=0)
    keep = uniform_keep_sets(moe, 2)
    carved = carve(moe, keep)
    data = load_task("upper", "train", limit=24)
    batch = next(batches(TOKENIZER, data, batch_size=24))

    def residual_after_first_layer(model):
        with torch.no_grad():
            states = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=True).hidden_states[1]
        return states[..., keyed.coordinates]

    mask = batch["attention_mask"].bool()
    before = (residual_after_first_layer(carved) - residual_after_first_layer(moe))[mask].norm()
    assert fold_blind_coordinates(moe, carved, data) == int(mask.sum())
    after = (residual_after_first_layer(carved) - residual_after_first_layer(moe))[mask].norm()
    assert after < 0.5 * before
    assert fold_blind_coordinates(char_moe(), carve(char_moe(), keep), data) == 0  # nothing to fold in an ordinary model
