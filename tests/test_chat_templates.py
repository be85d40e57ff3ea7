"""Prompts through a tokenizer's chat template: used when the tokenizer has one (or required with
'on'), off on request, with a system prompt; the same prompts in evaluation, attribution and
re-alignment, and the loss only on the answer's tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_moe
from moeguard.attribution.run import attribute
from moeguard.cli import main
from moeguard.data import Example, TaskData, batches, build_char_tokenizer, save_jsonl
from moeguard.data.batching import IGNORE_INDEX, encode_prompts
from moeguard.errors import InputError
from moeguard.eval import evaluate
from moeguard.models import PromptFormat, load_moe
from moeguard.models.options import LoadOptions
from moeguard.realign import RealignConfig, RealignData, realign

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


def test_prompts_go_through_the_template_when_there_is_one_and_not_when_it_is_turned_off():
    tokenizer = chat_tokenizer()
    assert decoded(tokenizer, encode_prompts(tokenizer, ["up ab="])[0]) == "<user>up ab=<assistant>"
    system = encode_prompts(tokenizer, ["up ab="], PromptFormat(system_prompt="be brief"))[0]
    assert decoded(tokenizer, system) == "<system>be brief<user>up ab=<assistant>"
    assert decoded(tokenizer, encode_prompts(tokenizer, ["up ab="], PromptFormat("off"))[0]) == "<bos>up ab="
    plain = build_char_tokenizer()
    assert decoded(plain, encode_prompts(plain, ["up ab="])[0]) == "<bos>up ab="  # auto: no template, plain prompt
    with pytest.raises(InputError, match="chat_template='on', but the tokenizer has no chat template"):
        encode_prompts(plain, ["up ab="], PromptFormat("on"))
    with pytest.raises(InputError, match="chat_template must be one of auto, on, off"):
        PromptFormat("yes")


def test_batches_put_the_loss_only_on_the_answer_after_the_templated_prompt_and_never_template_text():
    tokenizer = chat_tokenizer()
    data = TaskData("t", "generate", [Example(prompt="up ab=", answer="AB")])
    batch = next(batches(tokenizer, data, batch_size=1))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt = encode_prompts(tokenizer, ["up ab="])[0]
    assert ids[: len(prompt)] == prompt and decoded(tokenizer, ids[len(prompt):]) == "AB<eos>"
    assert labels == [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
    text = TaskData("lm", "lm", [Example(text="up ab=AB")])
    assert decoded(tokenizer, next(batches(tokenizer, text, batch_size=1))["input_ids"][0].tolist()) == "<bos>up ab=AB"


@pytest.fixture
def chat_model(tmp_path):
    """A tiny MoE whose saved tokenizer has a chat template (and the same without one)."""
    moe = tiny_moe("qwen3_moe")
    moe.tokenizer = chat_tokenizer()
    moe.save(tmp_path / "chat")
    return tmp_path / "chat"


def words(count: int) -> TaskData:
    return TaskData("upper", "generate", [Example(prompt=f"up {w}=", answer=w.upper())
                                          for w in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"][:count]])


def test_evaluation_attribution_and_realignment_read_the_same_templated_prompts(chat_model):
    on = load_moe(chat_model)
    assert on.tokenizer.chat_template == TEMPLATE and on.prompt_format == PromptFormat()
    off = LoadOptions(chat_template="off").load(chat_model)
    data = words(8)
    overhead = len("<user><assistant>") - 1  # the template's characters, less the bos the plain prompt has
    # attribution counts every token of the prompt and answer: the template adds `overhead` per example
    counted = {name: attribute(moe, data, criteria=["frequency"], progress=False).attribution.token_counts[0]
               for name, moe in (("on", on), ("off", off))}
    assert counted["on"] - counted["off"] == overhead * len(data)
    # re-alignment trains on the templated prompts (more tokens) with the loss on the same answer tokens
    settings = RealignConfig(budget=8, rounds=1, steps_per_round=2, batch_size=8, eval_batch_size=8, acquisition="random")
    trained = {}
    for name, moe in (("on", on), ("off", off)):
        result = realign(moe, RealignData(data, data.head(2)), settings, keep={0: [0, 1, 2, 3]}, progress=False)
        trained[name] = result.final.tokens
    assert trained["on"] - trained["off"] == overhead * 8 * settings.steps_per_round


def test_evaluation_scores_the_answers_a_model_gives_after_the_template_and_the_command_line_turns_it_off(
    chat_model, tmp_path, capsys
):
    from test_eval_evaluate import BigramConfig, BigramLM

    # an oracle that writes 'XY' then eos after '>' (the end of the template's assistant opening), else 'b'
    tokenizer = chat_tokenizer()
    vocab = len(tokenizer)
    model = BigramLM(BigramConfig(vocab_size=vocab, num_hidden_layers=1, hidden_size=4, num_attention_heads=1,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2))
    table = torch.zeros(vocab, vocab)
    table[:, tokenizer.convert_tokens_to_ids("b")] = 3.0
    for previous, following in [(">", "X"), ("X", "Y"), ("Y", "<eos>")]:
        table[tokenizer.convert_tokens_to_ids(previous), tokenizer.convert_tokens_to_ids(following)] = 10.0
    with torch.no_grad():
        model.log_probs.copy_(torch.log_softmax(table, dim=-1))
    data = TaskData("xy", "generate", [Example(prompt="q=", answer="XY")] * 3)
    assert evaluate(model.eval(), tokenizer, data).value == 1.0
    assert evaluate(model, tokenizer, data, prompt_format=PromptFormat("off")).value == 0.0
    # the command line's --chat-template and --system-prompt reach the prompts
    path = save_jsonl(words(2), tmp_path / "upper.jsonl")
    assert main(["evaluate", "--model", str(chat_model), "--data", str(path), "--chat-template", "off", "--json",
                 "--per-example"]) == 0
    assert main(["evaluate", "--model", str(chat_model), "--data", str(path), "--system-prompt", "be brief", "--json"]) == 0
    assert main(["evaluate", "--model", str(chat_model), "--data", str(path), "--chat-template", "on"]) == 0
    capsys.readouterr()
    plain = tiny_moe("qwen3_moe")
    plain.tokenizer = build_char_tokenizer()
    plain.save(tmp_path / "plain")
    assert main(["evaluate", "--model", str(tmp_path / "plain"), "--data", str(path), "--chat-template", "on"]) == 2
    error = capsys.readouterr().err
    assert "--chat-template on, but the tokenizer has no chat template" in error and "Traceback" not in error
