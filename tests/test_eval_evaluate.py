"""Evaluation on hand-made cases: an oracle bigram model with known outputs, and the tiny trained MoE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from moeguard.data import Example, TaskData, build_char_tokenizer, load_task
from moeguard.errors import DataError, InputError
from moeguard.eval import evaluate, evaluate_tasks
from moeguard.models import load_moe

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_char_tokenizer()


class BigramConfig(PretrainedConfig):
    model_type = "moeguard_test_bigram"


class BigramLM(PreTrainedModel, GenerationMixin):
    """An oracle whose next-token log-probabilities depend on the current token only (a table)."""

    config_class = BigramConfig

    def __init__(self, config):
        super().__init__(config)
        self.log_probs = nn.Parameter(torch.zeros(config.vocab_size, config.vocab_size))

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        return CausalLMOutputWithPast(logits=self.log_probs[input_ids], past_key_values=past_key_values)


def tok(character: str) -> int:
    return TOKENIZER.convert_tokens_to_ids(character)


def bigram_oracle() -> BigramLM:
    """After '=' it writes 'xy' then eos; after '?' it writes 'a' then a newline; otherwise 'b' is likeliest."""
    vocab = len(TOKENIZER)
    config = BigramConfig(vocab_size=vocab, num_hidden_layers=1, hidden_size=4, num_attention_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = BigramLM(config)
    table = torch.zeros(vocab, vocab)
    table[:, tok("b")] = 3.0
    table[:, tok("c")] = 2.0
    for previous, following in [("=", "x"), ("x", "y"), ("y", "</s>"), ("?", "a")]:
        table[tok(previous), TOKENIZER.eos_token_id if following == "</s>" else tok(following)] = 10.0
    with torch.no_grad():
        model.log_probs.copy_(torch.log_softmax(table, dim=-1))
    return model.eval()


def test_exact_match_is_greedy_decoding_to_eos_compared_with_the_answer():
    model = bigram_oracle()
    data = TaskData("oracle", "generate", [
        Example(prompt="q=", answer="xy"),
        Example(prompt="a much longer prompt=", answer=" xy "),  # answers compare stripped
        Example(prompt="q=", answer="x"),
        Example(prompt="q", answer="b"),  # the model never stops: 'bbbb' is not 'b'
    ])
    result = evaluate(model, TOKENIZER, data, batch_size=3)
    assert (result.metric, result.n) == ("exact_match", 4)
    assert result.predictions == ["xy", "xy", "xy", "bbbb"]
    assert result.correct == [True, True, False, False]
    assert result.value == 0.5
    assert result.ci_low < 0.5 < result.ci_high


def test_choice_accuracy_picks_the_choice_with_the_highest_log_likelihood():
    model = bigram_oracle()
    data = TaskData("mc", "choice", [
        Example(prompt="q=", choices=("b", "xy", "c"), label=1),   # 'xy' after '=' is nearly certain
        Example(prompt="q", choices=("c", "b"), label=0),          # 'b' beats 'c': wrong label
        Example(prompt="q", choices=("bb", "b"), label=1),          # a longer choice has a lower sum
    ])
    result = evaluate(model, TOKENIZER, data)
    assert result.metric == "choice_accuracy"
    assert result.predictions == ["xy", "b", "b"]
    assert result.correct == [True, False, True]


def test_text_loss_perplexity_and_unigram_reference_equal_the_hand_computed_values():
    model = bigram_oracle()
    texts = ["bc", "=xy"]
    data = TaskData("text", "lm", [Example(text=t) for t in texts])
    table = model.log_probs.detach()
    nll, count = 0.0, 0
    for text in texts:
        ids = [TOKENIZER.bos_token_id] + [tok(c) for c in text]
        for previous, following in zip(ids, ids[1:]):
            nll -= float(table[previous, following])
            count += 1
    result = evaluate(model, TOKENIZER, data, batch_size=1)
    assert result.metric == "loss" and result.n == 2 and not result.higher_is_better
    assert result.value == pytest.approx(nll / count, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert result.ci_low <= result.value <= result.ci_high
    # the scored tokens b, c, =, x, y are all different: the unigram reference is log 5
    assert result.reference == pytest.approx(math.log(5))


@pytest.mark.slow
def test_batched_evaluation_equals_one_at_a_time_and_padding_changes_nothing(trained_tiny):
    moe = load_moe(trained_tiny)
    tasks = moe_tasks(trained_tiny)
    for name in tasks:
        data = load_task(name, limit=40)
        batched = evaluate(moe, None, data, batch_size=40)
        single = evaluate(moe, None, data, batch_size=1)
        assert batched.predictions == single.predictions and batched.correct == single.correct
    mixed_lengths = TaskData("lm", "lm", [Example(text="rev abc=cba"), Example(text="up abcdefgh=ABCDEFGH"), Example(text="x")])
    batched = evaluate(moe, None, mixed_lengths, batch_size=3)
    single = evaluate(moe, None, mixed_lengths, batch_size=1)
    assert batched.value == pytest.approx(single.value, rel=1e-5)


def moe_tasks(path) -> list[str]:
    import json

    return json.loads((path / "demo_card.json").read_text())["config"]["tasks"]


def test_a_raw_transformers_model_and_its_moe_view_score_the_same_and_modes_are_restored(trained_tiny):
    moe = load_moe(trained_tiny)
    raw = AutoModelForCausalLM.from_pretrained(trained_tiny)
    raw.train()
    data = load_task(moe_tasks(trained_tiny)[0], limit=30)
    via_moe = evaluate(moe, moe.tokenizer, data)
    via_raw = evaluate(raw, moe.tokenizer, data)
    assert via_moe.predictions == via_raw.predictions
    assert raw.training, "evaluate must restore the train mode it found"
    results = evaluate_tasks(moe, None, [data, load_task("count", limit=10)])
    assert list(results) == [data.name, "count"] and results[data.name].value == via_moe.value


def test_bad_evaluation_inputs_are_refused():
    model = bigram_oracle()
    data = load_task("count", limit=2)
    with pytest.raises(InputError, match="evaluation needs a tokenizer"):
        evaluate(model, None, data)
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 0"):
        evaluate(model, TOKENIZER, data, batch_size=0)
    with pytest.raises(DataError, match="has no examples"):
        evaluate(model, TOKENIZER, TaskData("none", "generate", []))
    with pytest.raises(InputError, match="choice '' encodes to no tokens"):
        evaluate(model, TOKENIZER, TaskData("mc", "choice", [Example(prompt="q", choices=("a", ""), label=0)]))
    with pytest.raises(InputError, match="distinct names"):
        evaluate_tasks(model, TOKENIZER, [data, data])


def test_inputs_beyond_the_context_are_cut_when_text_and_refused_with_their_line_otherwise(tmp_path, caplog):
    """A model with a context of 10 tokens: a longer text is scored on its first 10 tokens (with a
    warning); a prompt whose answer or choices do not fit is refused, naming its file and line."""
    import json
    import logging

    from moeguard.data import load_jsonl

    model = bigram_oracle()
    model.config.max_position_embeddings = 10
    long_text = "bcbcbcbcbcbcbcbcbc"
    with caplog.at_level(logging.WARNING, logger="moeguard"):
        cut = evaluate(model, TOKENIZER, TaskData("t", "lm", [Example(text=long_text)]), batch_size=1)
    first = evaluate(bigram_oracle(), TOKENIZER, TaskData("t", "lm", [Example(text=long_text[:9])]), batch_size=1)
    assert cut.value == pytest.approx(first.value, rel=1e-9)
    assert "1 text(s) of t are longer than the model's context of 10 tokens" in caplog.text
    path = tmp_path / "long.jsonl"
    for lines, message in [
        ([{"prompt": "=", "answer": "xy"}, {"prompt": "=========", "answer": "xy"}], "long.jsonl line 2: its prompt"),
        ([{"prompt": "?", "choices": ["a", "bbbbbbbbbbb"], "label": 0}], "long.jsonl line 1: its prompt with its longest"),
    ]:
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(DataError, match=message):
            evaluate(model, TOKENIZER, load_jsonl(path), batch_size=4)


def test_empty_text_and_answer_lines_are_input_errors_with_their_line(tmp_path):
    from moeguard.data import load_jsonl

    path = tmp_path / "empty.jsonl"
    for content, message in [('{"text": "abc"}\n{"text": "  "}\n', "empty.jsonl line 2: field 'text' is empty"),
                             ('{"prompt": "=", "answer": ""}\n', "empty.jsonl line 1: field 'answer' is empty")]:
        path.write_text(content)
        with pytest.raises(DataError, match=message):
            load_jsonl(path)
