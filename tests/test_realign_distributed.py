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
