"""Acquisition at a real vocabulary size: logits only at answer tokens, batches bounded, the same values.

A tiny Qwen3-MoE with a 151,936-token vocabulary (Qwen's) scores a pool with every
acquisition function. The output layer is watched: it must never be asked for
logits at more positions than a batch's answer tokens, nor for more than
``LOGIT_BYTES`` of them, and the values must equal those of the plain computation
(full ``[B, T, V]`` logits, one example at a time).
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_moe
from moeguard.data import build_char_tokenizer
from moeguard.data.batching import collate, model_inputs, pad_id_of
from moeguard.eval.evaluate import causal_lm
from moeguard.models.random_init import FAMILIES
from moeguard.realign import RealignConfig, builtin_data, realign
from moeguard.realign import acquisition as acq
from moeguard.realign import pool as pool_module
from moeguard.realign.pool import ACQUISITIONS, batch_values, own_answers, pool_values, removed_expert_masks, routing_shares

VOCAB = 151_936
FROM_OUTPUTS = [name for name in ACQUISITIONS if name not in ("random", "routing")]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def large_vocab_model():
    moe = tiny_moe("qwen3_moe", vocab=VOCAB, hidden=32, intermediate=16)
    moe.tokenizer = build_char_tokenizer()
    return moe


@pytest.fixture(scope="module")
def pool():
    return builtin_data("reverse", pool_size=24, test_size=4, other_size=0, other_tasks=[]).pool


class OutputLayerWatch:
    """Records the number of positions the output layer projects to the vocabulary, per call."""

    def __init__(self, moe):
        self.layer = causal_lm(moe).get_output_embeddings()
        self.positions: list[int] = []

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(lambda module, args, output: self.positions.append(output[..., 0].numel()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def reference_values(moe, data, name, sketches):
    """The plain computation: each example alone, full [1, T, V] logits, the [B, T, V] form of the functions."""
    lm = causal_lm(moe)
    encoded = own_answers(moe, data, range(len(data)), max_new_tokens=6, batch_size=8)
    rows = []
    for i, example in enumerate(encoded):
        batch = collate([example], [i], pad_id_of(moe.tokenizer))
        outputs = lm(**model_inputs(batch), output_hidden_states=True)
        assert outputs.logits.shape[-1] == VOCAB and outputs.logits.dim() == 3
        rows.append(batch_values(name, outputs, batch, sketches)[0].float())
    return torch.stack(rows), encoded


@pytest.mark.parametrize("name", FROM_OUTPUTS)
@torch.no_grad()
def test_every_acquisition_reads_logits_only_at_answer_tokens_within_the_budget(large_vocab_model, pool, monkeypatch, name):
    moe = large_vocab_model
    sketches = pool_module.badge_sketches(moe, torch.Generator().manual_seed(0)) if name == "badge" else (None, None)
    expected, encoded = reference_values(moe, pool, name, sketches)
    # Only the scoring forwards are watched: the model's own answers are given (the same as the reference's).
    monkeypatch.setattr(pool_module, "own_answers", lambda moe, data, local, **kwargs: [encoded[i] for i in local])
    # A budget of 40 answer tokens per batch, so that the 24-example pool needs several batches.
    monkeypatch.setattr(pool_module, "LOGIT_BYTES", 40 * 4 * VOCAB)
    with OutputLayerWatch(moe) as watch:
        values = pool_values(moe, pool, range(len(pool)), name, max_new_tokens=6, batch_size=64,
                             generator=torch.Generator().manual_seed(0))
    answer_tokens = sum(len(e.target) for e in encoded)
    if ACQUISITIONS[name].reads_logits:
        # Exactly the answer-predicting positions, never a whole [B, T, V], in batches within the budget.
        assert sum(watch.positions) == answer_tokens < sum(len(e.prompt) + len(e.target) for e in encoded)
        assert len(watch.positions) > 1 and max(watch.positions) <= 40
    else:  # core-set reads hidden states only: one position per row, in one batch of 64
        assert watch.positions == [len(pool)]
    assert values.shape == expected.shape
    if name == "badge":
        assert values.shape == (len(pool), pool_module.SKETCH_DIM * 32)  # sketched vocabulary x hidden size 32
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_routing_shares_never_ask_for_logits_beyond_one_position(large_vocab_model, pool):
    moe = large_vocab_model
    removed = removed_expert_masks(moe.num_experts, [[0, 1], [2, 3]])
    with OutputLayerWatch(moe) as watch:
        shares = routing_shares(moe, pool, range(len(pool)), removed, batch_size=64)
    assert watch.positions == [len(pool)]  # one batch, the last position of each row
    assert shares.shape == (len(pool),) and bool(((shares >= 0) & (shares <= 1)).all())


@pytest.mark.slow
def test_the_loop_runs_every_acquisition_at_this_vocabulary(large_vocab_model, pool):
    data = builtin_data("reverse", pool_size=12, test_size=2, other_size=0, other_tasks=[])
    for name in ACQUISITIONS:
        config = RealignConfig(budget=6, rounds=2, seed_size=3, acquisition=name, scope="router", steps_per_round=1,
                               batch_size=3, eval_batch_size=64)
        result = realign(large_vocab_model, data, config, keep={0: [0, 1, 2], 1: [3, 4, 5]}, progress=False)
        assert result.final.labels == 6 and len(set(result.labelled)) == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_restricts_its_logits_to_the_answer_positions(family):
    moe = tiny_moe(family)
    lm = causal_lm(moe)
    assert pool_module.accepts_logits_to_keep(lm)
    input_ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    answer_mask = torch.zeros(3, 9, dtype=torch.bool)
    answer_mask[0, 4:7], answer_mask[1, 8], answer_mask[2, 2:9] = True, True, True
    with torch.no_grad():
        full = lm(input_ids=input_ids).logits
        kept = lm(input_ids=input_ids, logits_to_keep=acq.answer_predictors(answer_mask)).logits
    assert kept.shape == (3 + 1 + 7, full.shape[-1])
    for function in (acq.least_confidence, acq.margin, acq.entropy):
        torch.testing.assert_close(function(kept, answer_mask), function(full, answer_mask))
    torch.testing.assert_close(acq.sequence_nll(kept, input_ids, answer_mask), acq.sequence_nll(full, input_ids, answer_mask))
    with pytest.raises(ValueError, match="neither"):
        acq.entropy(kept[:-1], answer_mask)
