"""Two processes over disjoint shards (gloo) give the attribution of one process over all the data."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from conftest import padded_batch, tiny_moe
from moeguard.attribution import CRITERIA, Attribution, collect_attribution
from moeguard.attribution.collect import iterate_shard

WORLD = 2
FAMILY = "qwen2_moe"


def all_batches() -> list[dict]:
    batches = []
    for number in range(5):  # an odd count: the shards differ in size
        input_ids, attention_mask = padded_batch(seed=number, batch=3)
        example_index = torch.arange(3 * number, 3 * number + 3)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "example_index": example_index})
    return batches


def worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        moe = tiny_moe(FAMILY)
        shard = iterate_shard(all_batches(), rank, WORLD)
        attribution = collect_attribution(moe, shard, criteria=CRITERIA, task="shards", progress=False)
        if rank == 0:
            attribution.save(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_over_shards_equal_one_process_over_everything(tmp_path):
    out = tmp_path / "two.json"
    mp.spawn(worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    two = Attribution.load(out)
    one = collect_attribution(tiny_moe(FAMILY), all_batches(), criteria=CRITERIA, task="shards", progress=False)
    assert two.samples == one.samples == 15 and two.batches == one.batches == 5
    assert two.model_fingerprint == one.model_fingerprint
    assert set(two.sums) == set(one.sums)
    for name, value in one.sums.items():
        if value.dtype == torch.int64:
            assert torch.equal(two.sums[name], value), name
        else:
            assert torch.allclose(two.sums[name], value, rtol=1e-9, atol=1e-9), name
    assert torch.equal(two.coactivation, one.coactivation)
