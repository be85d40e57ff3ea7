"""A character-level Hugging Face fast tokenizer for the built-in tasks.

Built with ``tokenizers`` and wrapped in ``PreTrainedTokenizerFast``, so it saves
with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained`` like any
hub tokenizer. Every printable ASCII character is one token; ``<bos>`` is put in
front of each encoded text, ``<eos>`` ends answers.
"""

from __future__ import annotations

import string

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
ALPHABET = "".join(sorted(set(string.printable) - set(string.whitespace) | {" "}))


def build_char_tokenizer(alphabet: str = ALPHABET):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``alphabet``.

    Other characters become ``<unk>``; decoding joins characters without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in alphabet:
        vocab.setdefault(character, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
