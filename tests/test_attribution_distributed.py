"""Two processes over disjoint shards (gloo) give the attribution of one process over all the data."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_moe
from moeguard.attribution import CRITERIA, Attribution, attribute
from moeguard.data import build_char_tokenizer, load_task

# Tiny models gain nothing from a second thread, and on a busy machine two threads stall each other.
pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
FAMILY = "qwen2_moe"


def model_and_data():
    moe = tiny_moe(FAMILY)
    moe.tokenizer = build_char_tokenizer()
    return moe, load_task("caesar", "train", limit=9)  # 3 batches of 3: the shards differ in size


def worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        moe, data = model_and_data()
        # Every process runs the same call; each takes its shard of the batches and rank 0 writes.
        attribute(moe, data, tokens="answer", criteria=CRITERIA, batch_size=3, out=out, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_over_shards_equal_one_process_over_everything(tmp_path):
    out = tmp_path / "two.json"
    mp.spawn(worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    two = Attribution.load(out)
    moe, data = model_and_data()
    one = attribute(moe, data, tokens="answer", criteria=CRITERIA, batch_size=3, progress=False).attribution
    assert two.samples == one.samples == 9 and two.batches == one.batches == 3
    assert two.model_fingerprint == one.model_fingerprint
    assert set(two.sums) == set(one.sums)
    for name, value in one.sums.items():
        if value.dtype == torch.int64:
            assert torch.equal(two.sums[name], value), name
        else:
            assert torch.allclose(two.sums[name], value, rtol=1e-9, atol=1e-9), name
    assert torch.equal(two.coactivation, one.coactivation)
