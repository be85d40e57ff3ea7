"""The training loop: the loss it minimises, what it trains, the schedule, determinism and resuming."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import tiny_moe
from moeguard.data import batches, build_char_tokenizer, load_task
from moeguard.errors import InputError, TrainingDivergedError
from moeguard.training import learning_rate, lm_loss, token_cross_entropy, train

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_char_tokenizer()


def task_batches(seed: int = 0, limit: int = 16):
    return batches(TOKENIZER, load_task("upper", "train", limit=limit), batch_size=8, shuffle=True, seed=seed, epochs=None)


def fresh_model():
    moe = tiny_moe("qwen3_moe")  # vocab 128 holds the 99 character tokens
    return moe


def test_token_cross_entropy_is_the_mean_over_labelled_next_tokens():
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 4, 0]])
    terms = [
        -torch.log_softmax(logits[0, 0], -1)[1],
        -torch.log_softmax(logits[0, 1], -1)[2],
        -torch.log_softmax(logits[1, 1], -1)[4],
        -torch.log_softmax(logits[1, 2], -1)[0],
    ]
    torch.testing.assert_close(token_cross_entropy(logits, labels), torch.stack(terms).mean())


def test_training_lowers_the_loss_on_the_data_it_sees():
    moe = fresh_model()
    batch = next(task_batches())
    before = lm_loss(moe, batch).item()
    result = train(moe, task_batches(), steps=20, lr=1e-2, progress=False)
    assert lm_loss(moe, batch).item() < before / 2
    assert result.steps == 20 and len(result.losses) == 20
    assert result.target_tokens > 0 and result.tokens > result.target_tokens
    assert not moe.model.training


def test_the_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    values = [learning_rate(s, steps=110, lr=1.0, warmup=10, min_ratio=0.1) for s in range(110)]
    assert values[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55)
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_only_the_given_parameters_change_and_the_others_keep_their_gradient_flags():
    moe = fresh_model()
    router = moe.layers[0].router.weight
    before = {name: p.detach().clone() for name, p in moe.model.named_parameters()}
    train(moe, task_batches(), steps=3, lr=1e-2, parameters=[router], progress=False)
    changed = [name for name, p in moe.model.named_parameters() if not torch.equal(p, before[name])]
    assert changed == [name for name, p in moe.model.named_parameters() if p is router]
    assert all(p.requires_grad for p in moe.model.parameters())


def test_extra_loss_sees_model_batch_and_outputs_and_steers_training():
    moe = fresh_model()
    seen = []

    def pull_router_to_zero(model, batch, outputs):
        seen.append((model is moe, "labels" in batch, outputs.logits.shape[-1]))
        return 100.0 * model.layers[0].router.weight.pow(2).sum()

    control = fresh_model()
    start = moe.layers[0].router.weight.norm().item()
    train(moe, task_batches(), steps=5, lr=0.1, extra_loss=pull_router_to_zero, progress=False)
    train(control, task_batches(), steps=5, lr=0.1, progress=False)
    assert seen == [(True, True, 128)] * 5
    penalised, free = moe.layers[0].router.weight.norm().item(), control.layers[0].router.weight.norm().item()
    assert penalised < 0.85 * start and penalised < free - 2


def test_the_router_load_balancing_loss_is_added_when_asked_and_refused_where_the_model_has_none():
    moe = fresh_model()
    result = train(moe, task_batches(), steps=2, lr=1e-3, router_aux_loss_coef=0.01, progress=False)
    assert result.steps == 2
    with pytest.raises(InputError, match="returns no router load-balancing loss"):
        train(tiny_moe("deepseek_v3"), task_batches(), steps=1, lr=1e-3, router_aux_loss_coef=0.01, progress=False)


def test_same_seed_and_data_give_the_same_weights():
    first, second = fresh_model(), fresh_model()
    train(first, task_batches(seed=3), steps=6, lr=1e-3, progress=False, seed=3)
    train(second, task_batches(seed=3), steps=6, lr=1e-3, progress=False, seed=3)
    assert first.fingerprint() == second.fingerprint()
    third = fresh_model()
    train(third, task_batches(seed=4), steps=6, lr=1e-3, progress=False, seed=4)
    assert third.fingerprint() != first.fingerprint()


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    reference = fresh_model()
    reference_result = train(reference, task_batches(), steps=10, lr=1e-3, warmup=2, progress=False)

    checkpoint = tmp_path / "run"
    interrupted = fresh_model()

    def stop_at_step_7(model, batch, outputs):
        stop_at_step_7.calls += 1
        if stop_at_step_7.calls == 7:
            raise KeyboardInterrupt
        return outputs.logits.sum() * 0

    stop_at_step_7.calls = 0
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, task_batches(), steps=10, lr=1e-3, warmup=2, progress=False,
              extra_loss=stop_at_step_7, checkpoint=checkpoint, checkpoint_every=3)
    assert checkpoint.is_dir()
    resumed = fresh_model()
    result = train(resumed, task_batches(), steps=10, lr=1e-3, warmup=2, progress=False, checkpoint=checkpoint, checkpoint_every=3)
    assert result.resumed_from == 6 and result.steps == 10 and len(result.losses) == 10
    assert result.cpu_seconds > 0 and result.tokens == reference_result.tokens
    assert resumed.fingerprint() == reference.fingerprint()
    assert not checkpoint.exists(), "a finished run removes its checkpoint"


def test_evaluations_run_every_few_steps_in_eval_mode_and_can_end_training():
    moe = fresh_model()
    seen = []

    def evaluate(step):
        seen.append((step, moe.model.training, torch.is_grad_enabled()))
        return step >= 6

    result = train(moe, task_batches(), steps=20, lr=1e-3, progress=False, evaluate=evaluate, evaluate_every=3)
    assert seen == [(3, False, False), (6, False, False)]
    assert result.steps == 6 and len(result.losses) == 6
    with pytest.raises(InputError, match="evaluate_every"):
        train(moe, task_batches(), steps=2, lr=1e-3, progress=False, evaluate=evaluate)


def test_a_short_iterator_ends_training_early():
    moe = fresh_model()
    result = train(moe, itertools.islice(task_batches(), 3), steps=10, lr=1e-3, progress=False)
    assert result.steps == 3


def test_bad_training_arguments_are_refused():
    moe = fresh_model()
    with pytest.raises(InputError, match="steps must be a positive integer, got 0"):
        train(moe, task_batches(), steps=0, lr=1e-3)
    with pytest.raises(InputError, match="lr must be positive"):
        train(moe, task_batches(), steps=1, lr=0.0)
    with pytest.raises(InputError, match="nothing to train"):
        train(moe, task_batches(), steps=1, lr=1e-3, parameters=[])
    with pytest.raises(TrainingDivergedError, match="loss became nan .* lower the learning rate"):
        train(moe, task_batches(), steps=1, lr=1e-3, extra_loss=lambda m, b, o: torch.tensor(float("nan")), progress=False)
