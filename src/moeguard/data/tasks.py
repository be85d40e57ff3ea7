"""The built-in task suite: small synthetic tasks that need different skills, of all three task types.

Every task writes its prompts as ``"<tag> <input>="`` (a language-modelling text as
``"<tag> <text>"``) with its own tag, so a model can tell the tasks apart from the first
tokens (and its routers can specialise on them). Examples are drawn from a seeded random
stream; the split of a prompt (train, pool or test) is a function of the prompt text
alone (a hash), so the splits are disjoint for every seed, and a smaller ``limit`` gives
a prefix of a larger one.

Besides six exact-match generation tasks there are one of each other kind: ``topic``
(classification: the topic most words of a phrase belong to), ``dyck`` (language
modelling: balanced brackets of two kinds, drawn from a known stochastic process whose
exact log-probability of every text is :func:`dyck_log_prob`, so the best achievable loss
is known) and ``keywords`` (summarisation-like: the content words of a sentence, scored
by ROUGE-L).
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from moeguard.data.examples import Example, TaskData
from moeguard.errors import InputError

SPLITS = ("train", "pool", "test")
# Share of all possible prompts that belongs to each split (hash buckets out of 20).
_SPLIT_BUCKETS = {"train": range(0, 16), "pool": range(16, 18), "test": range(18, 20)}
DEFAULT_SIZES = {"train": 20_000, "pool": 2_000, "test": 200}
# A new version changes which examples the generators produce (part of the demo cache key).
TASK_SUITE_VERSION = 2


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task of task type ``kind``: ``draw(rng)`` gives an :class:`Example` without its tag
    (its prompt is the input, or its text the body); prompts become ``f"{tag} {input}="``, texts
    ``f"{tag} {body}"``. ``metric`` is the metric it is scored by (None: its type's default).
    A language-modelling task may give ``body_log_prob(body)``: the log-probability of each
    character of a body under the process that draws it (the best any model can do)."""

    name: str
    tag: str
    skill: str
    draw: Callable[[random.Random], Example]
    kind: str = "generate"
    metric: str | None = None
    body_log_prob: Callable[[str], list[float]] | None = None

    def tagged(self, example: Example) -> Example:
        """``example`` with the task's tag in front."""
        if example.text is not None:
            return Example(text=f"{self.tag} {example.text}")
        return Example(prompt=f"{self.tag} {example.prompt}=", answer=example.answer, choices=example.choices,
                       label=example.label)


def _generate(draw: Callable[[random.Random], tuple[str, str]]) -> Callable[[random.Random], Example]:
    """A generation task's ``draw`` from one that gives ``(input, answer)``."""
    def example(rng: random.Random) -> Example:
        task_input, answer = draw(rng)
        return Example(prompt=task_input, answer=answer)

    return example


def _letters(rng: random.Random, low: int, high: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _addition(rng: random.Random) -> tuple[str, str]:
    # Fixed widths (three-digit operands, four-digit sum) give every digit a fixed place.
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a:03d}+{b:03d}", f"{a + b:04d}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 3, 8)
    return word, word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = _letters(rng, 3, 8, string.digits)
    return digits, "".join(sorted(digits))


CAESAR_SHIFT = 3


def _caesar(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 3, 8)
    shifted = "".join(chr((ord(c) - ord("a") + CAESAR_SHIFT) % 26 + ord("a")) for c in word)
    return word, shifted


def _upper(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 3, 8)
    return word, word.upper()


def _count(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 4, 9, "abcd")
    letter = rng.choice("abcd")
    return f"{letter} in {text}", str(text.count(letter))


TOPICS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "cow", "pig", "owl", "fox", "bee", "ant", "rat", "yak", "elk", "eel", "hen", "emu", "bat", "ape"),
    "fruit": ("fig", "kiwi", "lime", "pear", "plum", "date", "apple", "mango", "grape", "lemon", "melon", "guava", "berry",
              "quince", "papaya", "banana"),
    "colour": ("red", "tan", "blue", "pink", "grey", "gold", "teal", "navy", "cyan", "jade", "ruby", "beige", "ivory",
               "khaki", "mauve", "azure"),
}


def _topic(rng: random.Random) -> Example:
    # Two words of the labelled topic and one of another, shuffled: the majority topic is the label.
    names = list(TOPICS)
    label = rng.randrange(len(names))
    other = rng.choice([name for position, name in enumerate(names) if position != label])
    words = [*rng.sample(TOPICS[names[label]], 2), rng.choice(TOPICS[other])]
    rng.shuffle(words)
    return Example(prompt=" ".join(words), choices=tuple(names), label=label)


FILLERS = ("the", "a", "an", "of", "to", "in", "on", "and", "is", "was", "by", "for", "at", "it", "or", "as")
_CONSONANTS, _VOWELS = "bcdfgklmnprstvz", "aeiou"


def _content_word(rng: random.Random) -> str:
    while True:
        word = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        if word not in FILLERS:
            return word


def _keywords(rng: random.Random) -> Example:
    # Content words (made-up, so they must be copied, not remembered) among filler words, in order.
    content = [_content_word(rng) for _ in range(rng.randint(2, 3))]
    fillers = [rng.choice(FILLERS) for _ in range(rng.randint(1, 2))]
    slots = sorted(rng.sample(range(len(content) + len(fillers)), len(content)))
    words, next_content, next_filler = [], iter(content), iter(fillers)
    for position in range(len(content) + len(fillers)):
        words.append(next(next_content) if position in slots else next(next_filler))
    return Example(prompt=" ".join(words), answer=" ".join(content))


# The bracket language: at depth 0 a text opens "(" or "[", or (once it is DYCK_MIN_LENGTH
# characters long) ends with "."; inside it opens either kind or closes the innermost one;
# the depth never exceeds DYCK_DEPTH and a text closes once it is DYCK_MAX_LENGTH characters
# long. The minimum length makes the texts many (3% repeats among 20,000 draws), so the hash
# split leaves their distribution nearly as the process draws it.
DYCK_OPEN = {"(": ")", "[": "]"}
DYCK_DEPTH, DYCK_MIN_LENGTH, DYCK_MAX_LENGTH = 4, 12, 18
DYCK_END_PROBABILITY, DYCK_CLOSE_PROBABILITY = 0.5, 0.5


def dyck_step(stack: list[str], length: int) -> dict[str, float]:
    """The distribution of the next character of a bracket text after a prefix with open
    brackets ``stack`` (innermost last) and ``length`` characters."""
    if not stack:
        if length < DYCK_MIN_LENGTH:
            return {"(": 0.5, "[": 0.5}
        if length >= DYCK_MAX_LENGTH:
            return {".": 1.0}
        opening = (1 - DYCK_END_PROBABILITY) / 2
        return {"(": opening, "[": opening, ".": DYCK_END_PROBABILITY}
    close = DYCK_OPEN[stack[-1]]
    if len(stack) >= DYCK_DEPTH or length >= DYCK_MAX_LENGTH:
        return {close: 1.0}
    opening = (1 - DYCK_CLOSE_PROBABILITY) / 2
    return {"(": opening, "[": opening, close: DYCK_CLOSE_PROBABILITY}


def _apply(stack: list[str], character: str) -> None:
    if character in DYCK_OPEN:
        stack.append(character)
    elif character != ".":
        stack.pop()


def _dyck(rng: random.Random) -> Example:
    stack: list[str] = []
    text = ""
    while not text.endswith("."):
        step = dyck_step(stack, len(text))
        character = rng.choices(list(step), weights=list(step.values()))[0]
        _apply(stack, character)
        text += character
    return Example(text=text)


def dyck_log_prob(body: str) -> list[float]:
    """``log p(c_t | c_<t)`` of every character of a bracket text under the process that draws them.

    ``-sum`` of these is the loss of the best possible model of the language on this text
    (its expectation is the text's entropy), the floor of any trained model's loss.
    """
    stack: list[str] = []
    values = []
    for length, character in enumerate(body):
        probability = dyck_step(stack, length).get(character, 0.0)
        values.append(math.log(probability) if probability > 0 else -math.inf)
        _apply(stack, character)
    return values


TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("addition", "add", "add two three-digit numbers (four-digit sum)", _generate(_addition)),
        TaskSpec("reverse", "rev", "write a word backwards", _generate(_reverse)),
        TaskSpec("sort", "sort", "sort the digits of a number", _generate(_sort)),
        TaskSpec("caesar", "rot", f"shift each letter {CAESAR_SHIFT} places along the alphabet", _generate(_caesar)),
        TaskSpec("upper", "up", "write a word in capitals", _generate(_upper)),
        TaskSpec("count", "count", "count how often a letter occurs in a word", _generate(_count)),
        TaskSpec("topic", "cls", f"the topic most words of a phrase share ({', '.join(TOPICS)})", _topic,
                 kind="choice"),
        TaskSpec("dyck", "dyck", "text of balanced brackets of two kinds", _dyck, kind="lm",
                 body_log_prob=dyck_log_prob),
        TaskSpec("keywords", "key", "write the content words of a sentence", _keywords,
                 metric="rouge_l"),
    )
}
BUILTIN_TASKS: tuple[str, ...] = tuple(TASK_SPECS)


def split_of(task: str, prompt: str) -> str:
    """The split a prompt of ``task`` belongs to: a hash of the text into 20 buckets (16/2/2)."""
    bucket = int.from_bytes(hashlib.sha256(f"{task}\n{prompt}".encode()).digest()[:8], "big") % 20
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def task_spec(name: str) -> TaskSpec:
    if name not in TASK_SPECS:
        raise InputError(f"unknown built-in task {name!r}; valid tasks: {', '.join(BUILTIN_TASKS)} (or 'all').")
    return TASK_SPECS[name]


def resolve_task_names(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of built-in task names, checked."""
    names = list(BUILTIN_TASKS) if text.strip() == "all" else [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InputError(f"no task named in {text!r}; valid tasks: {', '.join(BUILTIN_TASKS)} (or 'all').")
    for name in names:
        task_spec(name)
    return names


def load_task(name: str, split: str = "test", *, limit: int | None = None, seed: int = 0) -> TaskData:
    """``limit`` examples (default: the split's standard size) of built-in task ``name``.

    Prompts (texts) are unique within a split and never shared between splits; the same
    ``(name, split, seed)`` always gives the same examples, and a smaller ``limit``
    gives a prefix of a larger one.
    """
    spec = task_spec(name)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
    size = DEFAULT_SIZES[split] if limit is None else limit
    if not isinstance(size, int) or size < 1:
        raise InputError(f"limit must be a positive integer, got {limit!r}.")
    rng = random.Random(f"moeguard:{name}:{split}:{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    # Give up long before an endless loop if a task's space were too small for the size asked.
    for _ in range(size * 200):
        example = spec.tagged(spec.draw(rng))
        key = example.text if example.text is not None else example.prompt
        if key in seen or split_of(name, key) != split:
            continue
        seen.add(key)
        examples.append(example)
        if len(examples) == size:
            return TaskData(name, spec.kind, examples, f"builtin:{name}:{split}:seed{seed}", metric=spec.metric)
    raise InputError(f"task {name!r} has fewer than {size} distinct {split} prompts; ask for fewer (limit).")
