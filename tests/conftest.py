"""Shared fixtures: tiny randomly initialised MoE models of real transformers families."""

from __future__ import annotations

import copy
import os
import warnings

# Idle OpenMP threads sleep instead of spinning (must be set before torch loads): when
# other processes keep the cores busy, spinning threads stall every parallel region
# (measured on a busy 2-core machine: 4.1 s instead of 0.49 s per training step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

from moeguard.models.random_init import FAMILIES, random_moe  # noqa: E402

# DeepSeek-V3 is built with top-4 over 2 groups, both picked per token, so that
# keep == top_k (2 per group) is a feasible plan as well as larger ones.
FAMILY_SETTINGS = {
    "deepseek_v3": dict(top_k=4, groups=2, groups_per_token=2),
}

_CACHE: dict[str, object] = {}


def tiny_moe(family: str, **overrides):
    """A fresh copy of a cached tiny model of ``family`` (tests may mutate it)."""
    key = f"{family}:{sorted(overrides.items())}"
    if key not in _CACHE:
        _CACHE[key] = random_moe(family, **{**FAMILY_SETTINGS.get(family, {}), **overrides})
    return copy.deepcopy(_CACHE[key])


def tiny_char_moe(family: str):
    """:func:`tiny_moe` with the character tokenizer of the built-in tasks (its vocabulary of 128 holds them)."""
    from moeguard.data import build_char_tokenizer

    moe = tiny_moe(family)
    moe.tokenizer = build_char_tokenizer()
    return moe


def padded_batch(vocab: int = 128, *, batch: int = 3, length: int = 10, seed: int = 0):
    """Random token ids with left padding of different lengths (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch):
        pad = row * 2 % length
        input_ids[row, :pad] = 0
        attention_mask[row, :pad] = 0
    return input_ids, attention_mask


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread: tiny models gain nothing from two, and on a
    busy machine two threads waiting on each other make training many times slower."""
    from moeguard.zoo.demo import intra_op_threads

    with intra_op_threads(1):
        yield


# Every task of the trained tiny model reaches this test exact match (200 examples), or the
# tests that use it cannot mean anything: a training that falls short fails here, once, clearly.
TINY_ACCURACY_FLOOR = 0.95


@pytest.fixture(scope="session")
def trained_tiny():
    """Path of a tiny trained MoE (``moeguard.zoo.TINY_DEMO``: Qwen3-MoE, 2 layers, 8 experts, top-2,
    four tasks) with its tokenizer and card. Trained once, then reused from the cache
    (``$MOEGUARD_CACHE``, default ``~/.cache/moeguard``), keyed by its config.

    Other CPUs train other weights from the same seed: tests assert what any good training
    shows, and this fixture checks that the training was good (:data:`TINY_ACCURACY_FLOOR`)."""
    import json

    from moeguard.zoo import CARD_JSON, TINY_DEMO, demo_model_path

    path = demo_model_path(TINY_DEMO, seed=0, progress=False)
    accuracy = {task: result["value"] for task, result in json.loads((path / CARD_JSON).read_text())["accuracy"].items()}
    short = {task: value for task, value in accuracy.items() if value < TINY_ACCURACY_FLOOR}
    if short:
        pytest.fail(f"the tiny test model ({path}) trained to test exact match {accuracy}: {sorted(short)} below the floor "
                    f"{TINY_ACCURACY_FLOOR}; the training recipe (moeguard.zoo.TINY_DEMO) no longer learns every task on "
                    "this machine.", pytrace=False)
    return path


def tiny_card(path) -> dict:
    """The model card (``demo_card.json``) of the trained tiny model: what this training run shows."""
    import json

    from moeguard.zoo import CARD_JSON

    return json.loads((path / CARD_JSON).read_text())


def top_set_overlap(card: dict, first: str, second: str) -> float:
    """Mean over layers of the Jaccard index of two tasks' top-k expert sets, by the card's routing
    frequencies (test split): how much two tasks share their experts in this training run."""
    frequency, top_k = card["routing"]["frequency"], card["config"]["top_k"]

    def top(row: list[float]) -> set[int]:
        return set(sorted(range(len(row)), key=lambda expert: -row[expert])[:top_k])

    pairs = [(top(a), top(b)) for a, b in zip(frequency[first], frequency[second])]
    return sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs)


# Every task of the trained task-types model reaches this share of the best score possible (its card's
# share_of_best: accuracy, ROUGE-L, or the share of the way from the unigram loss to the bracket
# language's own loss), or the tests that use it cannot mean anything.
TINY_TYPES_FLOOR = 0.9


@pytest.fixture(scope="session")
def trained_tiny_types():
    """Path of a small trained MoE (``moeguard.zoo.TINY_TYPES_DEMO``: Qwen3-MoE, 2 layers, 8 experts, top-2)
    that knows one task of each type: upper (generation, exact match), topic (classification), dyck
    (language modelling) and keywords (generation, ROUGE-L). Trained once, then reused from the cache."""
    import json

    from moeguard.zoo import CARD_JSON, TINY_TYPES_DEMO, demo_model_path

    path = demo_model_path(TINY_TYPES_DEMO, seed=0, progress=False)
    shares = {task: r["share_of_best"] for task, r in json.loads((path / CARD_JSON).read_text())["accuracy"].items()}
    short = {task: value for task, value in shares.items() if value < TINY_TYPES_FLOOR}
    if short:
        pytest.fail(f"the task-types test model ({path}) reached {shares} of the best scores: {sorted(short)} below the "
                    f"floor {TINY_TYPES_FLOOR}; the recipe (moeguard.zoo.TINY_TYPES_DEMO) no longer learns every task.",
                    pytrace=False)
    return path
