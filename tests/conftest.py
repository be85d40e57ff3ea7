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


@pytest.fixture(scope="session")
def trained_tiny():
    """Path of a tiny trained MoE (``moeguard.zoo.TINY_DEMO``: Qwen3-MoE, 2 layers, 8 experts, top-2,
    four tasks) with its tokenizer and card. Trained once, then reused from the cache
    (``$MOEGUARD_CACHE``, default ``~/.cache/moeguard``), keyed by its config."""
    from moeguard.zoo import TINY_DEMO, demo_model_path

    return demo_model_path(TINY_DEMO, seed=0, progress=False)
