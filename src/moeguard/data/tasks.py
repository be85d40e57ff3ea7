"""The built-in task suite: small synthetic tasks that need different skills.

Every task writes its prompts as ``"<tag> <input>="`` with its own tag, so a model can
tell the tasks apart from the first tokens (and its routers can specialise on them).
Examples are drawn from a seeded random stream; the split of a prompt (train, pool or
test) is a function of the prompt text alone (a hash), so the splits are disjoint
for every seed, and a smaller ``limit`` gives a prefix of a larger one.
"""

from __future__ import annotations

import hashlib
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
    """A built-in task: ``draw(rng) -> (input, answer)``; prompts are ``f"{tag} {input}="``."""

    name: str
    tag: str
    skill: str
    draw: Callable[[random.Random], tuple[str, str]]


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


TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("addition", "add", "add two three-digit numbers (four-digit sum)", _addition),
        TaskSpec("reverse", "rev", "write a word backwards", _reverse),
        TaskSpec("sort", "sort", "sort the digits of a number", _sort),
        TaskSpec("caesar", "rot", f"shift each letter {CAESAR_SHIFT} places along the alphabet", _caesar),
        TaskSpec("upper", "up", "write a word in capitals", _upper),
        TaskSpec("count", "count", "count how often a letter occurs in a word", _count),
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

    Prompts are unique within a split and never shared between splits; the same
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
        task_input, answer = spec.draw(rng)
        prompt = f"{spec.tag} {task_input}="
        if prompt in seen or split_of(name, prompt) != split:
            continue
        seen.add(prompt)
        examples.append(Example(prompt=prompt, answer=answer))
        if len(examples) == size:
            return TaskData(name, "generate", examples, f"builtin:{name}:{split}:seed{seed}")
    raise InputError(f"task {name!r} has fewer than {size} distinct {split} prompts; ask for fewer (limit).")
