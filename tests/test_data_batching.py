"""Batches: token layout, labels and masks, padding that does not change results, shuffling."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import tiny_moe
from moeguard.data import IGNORE_INDEX, Example, TaskData, batches, build_char_tokenizer, load_task, model_inputs, to_device
from moeguard.data.batching import EncodedExample, truncate
from moeguard.errors import DataError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_char_tokenizer()


def decode(ids) -> str:
    return TOKENIZER.decode([int(i) for i in ids])


def test_a_generate_example_is_bos_prompt_answer_eos_with_loss_on_answer_and_eos_only():
    data = TaskData("t", "generate", [Example(prompt="up ab=", answer="AB"), Example(prompt="up abcd=", answer="ABCD")])
    batch = next(batches(TOKENIZER, data, batch_size=2))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_mask", "answer_mask", "example_index"}
    assert decode(batch["input_ids"][1]) == "<bos>up abcd=ABCD<eos>"
    assert decode(batch["input_ids"][0]) == "<bos>up ab=AB<eos>" + "<pad>" * 4
    assert batch["attention_mask"][0].tolist() == [1] * 10 + [0] * 4
    assert decode(batch["input_ids"][0][batch["prompt_mask"][0]]) == "<bos>up ab="
    assert decode(batch["input_ids"][0][batch["answer_mask"][0]]) == "AB<eos>"
    assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["answer_mask"])
    assert torch.equal(batch["labels"][batch["answer_mask"]], batch["input_ids"][batch["answer_mask"]])
    assert batch["example_index"].tolist() == [0, 1]


def test_lm_text_has_loss_everywhere_but_padding_and_choice_data_trains_on_the_right_choice():
    lm = TaskData("t", "lm", [Example(text="hello"), Example(text="hi")])
    batch = next(batches(TOKENIZER, lm, batch_size=2))
    assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["attention_mask"].bool())
    assert not batch["prompt_mask"].any()
    choice = TaskData("c", "choice", [Example(prompt="1+1=", choices=("3", "2"), label=1)])
    batch = next(batches(TOKENIZER, choice, batch_size=1))
    assert decode(batch["input_ids"][0][batch["answer_mask"][0]]) == "2<eos>"


def test_right_padding_does_not_change_the_loss_or_logits_of_any_example():
    moe = tiny_moe("qwen3_moe")
    data = load_task("reverse", limit=6)
    batch = next(batches(TOKENIZER, data, batch_size=6))
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        together = moe.model(**model_inputs(batch)).logits
        for row in range(6):
            alone = next(batches(TOKENIZER, data.subset([row]), batch_size=1))
            logits = moe.model(**model_inputs(alone)).logits[0]
            length = logits.shape[0]
            torch.testing.assert_close(together[row, :length], logits, rtol=1e-4, atol=1e-5)


def test_truncation_keeps_the_target_and_drops_the_start_of_the_prompt_or_the_end_of_a_text():
    assert truncate(EncodedExample([1, 2, 3, 4], [5, 6]), 4) == EncodedExample([3, 4], [5, 6])
    assert truncate(EncodedExample([1, 2], [5, 6, 7]), 2) == EncodedExample([], [6, 7])
    assert truncate(EncodedExample([], [1, 2, 3]), 2) == EncodedExample([], [1, 2])
    batch = next(batches(TOKENIZER, load_task("reverse", limit=4), batch_size=4, max_length=5))
    assert batch["input_ids"].shape[1] <= 5
    assert (batch["answer_mask"].sum(1) > 0).all()


def test_shuffling_is_a_seeded_permutation_per_epoch_and_epochs_none_repeats_forever():
    data = load_task("count", limit=10)

    def order(**kwargs):
        return [i for b in batches(TOKENIZER, data, batch_size=3, **kwargs) for i in b["example_index"].tolist()]

    assert order() == list(range(10))
    shuffled = order(shuffle=True, seed=1)
    assert sorted(shuffled) == list(range(10)) and shuffled != list(range(10))
    assert order(shuffle=True, seed=1) == shuffled
    two_epochs = order(shuffle=True, seed=1, epochs=2)
    assert two_epochs[:10] == shuffled and sorted(two_epochs[10:]) == list(range(10)) and two_epochs[10:] != shuffled
    endless = batches(TOKENIZER, data, batch_size=4, epochs=None)
    assert len(list(itertools.islice(endless, 50))) == 50


def test_bad_batching_arguments_and_empty_data_are_refused():
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 0"):
        next(batches(TOKENIZER, load_task("count", limit=2), batch_size=0))
    with pytest.raises(DataError, match="task 'e' .* has no examples"):
        next(batches(TOKENIZER, TaskData("e", "generate", []), batch_size=2))


def test_model_inputs_hold_only_what_the_model_takes_and_to_device_moves_every_tensor():
    batch = next(batches(TOKENIZER, load_task("count", limit=2), batch_size=2))
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}
    moved = to_device({**batch, "name": "x"}, "meta")
    assert all(v.device.type == "meta" for k, v in moved.items() if k != "name") and moved["name"] == "x"


def test_batches_cut_text_to_the_context_and_refuse_longer_examples_before_the_first_batch():
    text = TaskData("t", "lm", [Example(text="a" * 40), Example(text="bb")])
    cut = list(batches(TOKENIZER, text, batch_size=2, context=10))
    assert cut[0]["attention_mask"].sum(1).tolist() == [10, 3]  # bos + 9 characters, and bos + 2
    questions = TaskData("q", "generate", [Example(prompt="up a=", answer="A"), Example(prompt="x" * 30, answer="X")],
                         "q.jsonl", ["q.jsonl line 1", "q.jsonl line 7"])
    with pytest.raises(DataError, match="q.jsonl line 7: its prompt and answer together is 33 tokens, longer than the model's context of 10"):
        batches(TOKENIZER, questions, batch_size=2, context=10)
    assert len(list(batches(TOKENIZER, questions.subset([0]), batch_size=2, context=10))) == 1
