"""Tokenizing task data into padded batches of CPU tensors.

A generate example becomes ``prompt + answer + eos``, a choice example ``prompt +
right choice + eos`` (for training; evaluation scores every choice), an lm example its
text. Prompts are encoded with the tokenizer's special tokens (a ``bos`` where the
tokenizer adds one), continuations without, the usual way to score a continuation.
Where the model's :class:`~moeguard.models.PromptFormat` says so (by default: when the
tokenizer has a chat template), a prompt is first written as a user turn of the chat
template (with the system prompt, and the opening of the assistant's turn), so the
continuation is the assistant's answer; plain text (lm) is never templated.

Batches are padded on the right: every real token then keeps the position it has
without padding and, under the causal mask, never sees a pad, so no position ids are
needed and results do not depend on the padding.

Nothing longer than the model's context (``max_position_embeddings``) reaches the model:
a language-modelling text is cut to the context, with one warning naming how many texts
were cut and where the first one is (perplexity is then measured on each text's first
``context`` tokens); a prompt/answer or choice example that does not fit is refused
with its file and line, because cutting it would change what it asks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moeguard.data.examples import Example, TaskData, require_examples
from moeguard.errors import DataError, InputError
from moeguard.models.prompting import PromptFormat

log = logging.getLogger("moeguard.data")

IGNORE_INDEX = -100  # label of tokens without loss (the value transformers uses)
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example: ``prompt`` (no loss) followed by ``target`` (loss)."""

    prompt: list[int]
    target: list[int]


def pad_id_of(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else eos, else 0 (padding is masked anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat of one prompt: an optional system message, then the prompt as the user's message."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], prompt_format: PromptFormat | None = None) -> list[list[int]]:
    """Prompts as token ids, written as ``prompt_format`` says (default: the chat template when the tokenizer
    has one).

    Through the chat template: the rendered conversation up to the opening of the
    assistant's turn (the template's own special tokens, nothing added); otherwise the
    prompt (after the system prompt and a blank line, if one is given) with the
    tokenizer's own special tokens (e.g. bos).
    """
    if not prompts:
        return []
    prompt_format = prompt_format or PromptFormat()
    if prompt_format.uses_template(tokenizer):
        rendered = [tokenizer.apply_chat_template(chat_messages(p, prompt_format.system_prompt), tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
        return [list(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    if prompt_format.system_prompt:
        prompts = [f"{prompt_format.system_prompt}\n\n{p}" for p in prompts]
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Plain texts (lm) as token ids, with the tokenizer's own special tokens (never a chat template)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]] if texts else []


def encode_continuations(tokenizer: Any, texts: Sequence[str], *, eos: bool) -> list[list[int]]:
    """Continuations as token ids without special tokens, each closed by eos if ``eos``."""
    if not texts:
        return []
    closing = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    return [list(ids) + closing for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], prompt_format: PromptFormat | None = None
) -> list[EncodedExample]:
    """Token ids of each example, in order (see the module docstring for the layout); the examples may be
    of several kinds (a training mixture)."""
    texts = [i for i, e in enumerate(examples) if e.kind == "lm"]
    prompted = [i for i, e in enumerate(examples) if e.kind != "lm"]
    encoded: list[EncodedExample | None] = [None] * len(examples)
    for i, ids in zip(texts, encode_texts(tokenizer, [examples[i].text for i in texts])):
        encoded[i] = EncodedExample([], ids)
    prompts = encode_prompts(tokenizer, [examples[i].prompt for i in prompted], prompt_format)
    targets = encode_continuations(tokenizer, [examples[i].target for i in prompted], eos=True)
    for i, prompt, target in zip(prompted, prompts, targets):
        encoded[i] = EncodedExample(prompt, target)
    return encoded


def truncate(encoded: EncodedExample, max_length: int | None) -> EncodedExample:
    """Fit an example into ``max_length`` tokens.

    A text without prompt (lm) keeps its beginning; a prompt + target keeps its end,
    so the target survives and the prompt loses its first tokens.
    """
    if max_length is None or len(encoded.prompt) + len(encoded.target) <= max_length:
        return encoded
    if not encoded.prompt:
        return EncodedExample([], encoded.target[:max_length])
    keep_prompt = max(0, max_length - len(encoded.target))
    return EncodedExample(encoded.prompt[len(encoded.prompt) - keep_prompt :], encoded.target[-max_length:])


def context_length(model: Any) -> int | None:
    """The longest token sequence ``model`` (an ``MoEModel`` or a causal LM) takes: its config's
    ``max_position_embeddings`` (None when the config does not say)."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def refuse_beyond_context(data: TaskData, lengths: Sequence[int], context: int | None, *, what: str = "the example") -> None:
    """Refuse the first example of ``data`` whose token count ``lengths[i]`` exceeds ``context``, naming where it is."""
    if context is None:
        return
    for index, length in enumerate(lengths):
        if length > context:
            raise DataError(
                f"{data.origin(index)}: {what} is {length} tokens, longer than the model's context of {context} "
                "tokens; shorten or drop that example (cutting it would change what it asks)."
            )


def cut_to_context(data: TaskData, encoded: Sequence[EncodedExample], context: int | None) -> list[EncodedExample]:
    """Language-modelling texts cut to their first ``context`` tokens, with one warning if any was cut."""
    if context is None:
        return list(encoded)
    long = [i for i, e in enumerate(encoded) if len(e.prompt) + len(e.target) > context]
    if long:
        log.warning("%d text(s) of %s are longer than the model's context of %d tokens and were cut to it (first: %s)",
                    len(long), data.name, context, data.origin(long[0]))
    return [truncate(e, context) for e in encoded]


def fit_to_context(data: TaskData, encoded: Sequence[EncodedExample], context: int | None) -> list[EncodedExample]:
    """``encoded`` (the examples of ``data``, of one kind or a mixture) within ``context`` tokens: lm texts cut,
    other examples refused if longer."""
    lengths = [0 if example.kind == "lm" else len(e.prompt) + len(e.target) for e, example in zip(encoded, data.examples)]
    refuse_beyond_context(data, lengths, context, what="its prompt and answer together")
    return cut_to_context(data, encoded, context)  # only texts can be longer now


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, S], attention_mask [B, S])`` for sequences padded to the longest one."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[row, span] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def collate(encoded: Sequence[EncodedExample], indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of ``encoded`` examples (see :func:`batches` for the keys)."""
    input_ids, attention_mask = pad_sequences([e.prompt + e.target for e in encoded], pad_id)
    prompt_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    answer_mask = torch.zeros_like(prompt_mask)
    for row, example in enumerate(encoded):
        prompt_mask[row, : len(example.prompt)] = True
        answer_mask[row, len(example.prompt) : len(example.prompt) + len(example.target)] = True
    labels = input_ids.masked_fill(~answer_mask, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_mask": prompt_mask,
        "answer_mask": answer_mask,
        "example_index": torch.as_tensor(list(indices), dtype=torch.long),
    }


def batches(
    tokenizer: Any,
    data: TaskData,
    *,
    batch_size: int,
    max_length: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epochs: int | None = 1,
    context: int | None = None,
    prompt_format: PromptFormat | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of ``data``: dicts of CPU tensors.

    Keys: ``input_ids``, ``attention_mask`` ``[B, S]``; ``labels`` ``[B, S]`` (the
    token ids where there is loss, -100 elsewhere: on prompt and padding for generate
    and choice data, on padding only for lm data); ``prompt_mask`` and ``answer_mask``
    ``[B, S]`` bool (the target tokens, closing eos included; ``answer_mask`` equals
    ``labels != -100``); ``example_index`` ``[B]``, positions in ``data.examples``.

    With ``shuffle`` the order is a permutation drawn from ``seed`` (a new one each
    epoch); ``epochs=None`` repeats the data forever. ``max_length`` truncates every
    example (see :func:`truncate`); ``context`` (the model's, :func:`context_length`)
    cuts lm texts and refuses other examples that do not fit (:func:`fit_to_context`).
    Everything is checked before the first batch is made. Prompts are written as
    ``prompt_format`` says (pass the model's ``prompt_format``; default: the chat template
    when the tokenizer has one).
    """
    require_examples(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise InputError(f"max_length must be a positive integer or None, got {max_length!r}.")
    encoded = [truncate(e, max_length) for e in encode_examples(tokenizer, data.examples, prompt_format)]
    encoded = fit_to_context(data, encoded, context)
    return _batches(encoded, batch_size=batch_size, pad_id=pad_id_of(tokenizer), shuffle=shuffle, seed=seed, epochs=epochs)


def _batches(
    encoded: list[EncodedExample], *, batch_size: int, pad_id: int, shuffle: bool, seed: int, epochs: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while epochs is None or epoch < epochs:
        if shuffle:
            order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = list(range(len(encoded)))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield collate([encoded[i] for i in chunk], chunk, pad_id)
        epoch += 1


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` a causal LM's forward takes (``model(**model_inputs(batch))``)."""
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``device`` (other values unchanged)."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
