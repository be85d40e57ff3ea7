"""`moeguard realign` runs unchanged under `accelerate launch` with two CPU processes (gloo, DDP)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_moe
from moeguard.data import build_char_tokenizer
from moeguard.models import load_moe


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_under_accelerate_launch_realign_a_pruned_model_and_agree(tmp_path):
    parent = tiny_moe("mixtral")
    parent.tokenizer = build_char_tokenizer()
    parent.save(tmp_path / "parent")
    pruned = load_moe(tmp_path / "parent")
    pruned.prune({0: [1, 2, 6], 1: [0, 4, 7]})
    pruned.save(tmp_path / "pruned")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(sys.executable).parent / "moeguard"), "-q", "realign",
        "--model", str(tmp_path / "pruned"), "--task", "upper", "--pool-size", "16", "--test-size", "4",
        "--other-tasks", "none", "--budget", "8", "--rounds", "2", "--acquisition", "entropy", "--train", "all",
        "--steps-per-round", "2", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu", "--out", str(out), "--json",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[:4000]
    # Only the first process reports and writes; the run checks that both ended with the same weights.
    printed = json.loads(done.stdout[done.stdout.index("{"):])
    assert printed["rounds"][-1]["labels"] == 8 and printed["frozen_verified"]
    assert len(set(printed["labelled"])) == 8
    assert printed["rounds"][-1]["steps"] == 4 and printed["rounds"][-1]["tokens"] > 0
    realigned = load_moe(out / "model")
    assert realigned.fingerprint() != pruned.fingerprint()
    assert json.loads((out / "history.json").read_text())["complete"]


def pruned_pair(root: Path) -> Path:
    """A tiny parent and a pruned copy of it on disk (the pruned one's manifest names the parent)."""
    parent = tiny_moe("qwen2_moe")
    parent.tokenizer = build_char_tokenizer()
    parent.save(root / "parent")
    pruned = load_moe(root / "parent")
    pruned.prune({0: [0, 2, 5, 7], 1: [1, 2, 3, 6]})
    return pruned.save(root / "pruned")


def realign_worker(rank: int, init_file: str, pruned: str, out: str, world: int) -> None:
    import torch
    import torch.distributed as dist

    from moeguard.realign import RealignConfig, builtin_data, realign

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # An odd budget and batch: some batches have fewer rows than processes.
        config = RealignConfig(budget=9, rounds=2, seed_size=5, acquisition="entropy", scope="all", steps_per_round=3,
                               batch_size=3, lr=1e-2)
        data = builtin_data("upper", pool_size=16, test_size=6, other_size=4, other_tasks=["sort"])
        realign(load_moe(pruned), data, config, out=out, progress=False)
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_realign_to_what_one_process_does(tmp_path):
    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    pruned = pruned_pair(tmp_path)
    mp.spawn(realign_worker, args=(str(tmp_path / "init"), str(pruned), str(tmp_path / "two"), 2), nprocs=2, join=True)
    realign_worker(0, "", str(pruned), str(tmp_path / "one"), 1)
    one, two = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("one", "two"))
    assert one["labelled"] == two["labelled"] and len(set(one["labelled"])) == 9
    for a, b in zip(one["rounds"], two["rounds"], strict=True):
        assert (a["labels"], a["steps"], a["tokens"]) == (b["labels"], b["steps"], b["tokens"])
        assert a["accuracy"] == b["accuracy"] and a["other_accuracy"] == b["other_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, nan_ok=True)
    weights = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two")]
    before = load_file(pruned / "model.safetensors")
    assert any(not torch.equal(before[name], weights[0][name]) for name in before)  # training changed the weights
    for name, value in weights[0].items():
        # Equal up to the order of floating-point sums, which Adam's normalisation amplifies a little:
        # a thousandth of what training moved each tensor (measured: below 1e-3 of it).
        moved = (value - before[name]).abs().max()
        assert (weights[1][name] - value).abs().max() <= 1e-2 * moved + 1e-7, name
