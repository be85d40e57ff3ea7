"""One place picks each process's device, and collectives run where the backend needs them."""

from __future__ import annotations

import pytest
import torch

from moeguard import distributed
from moeguard.models.loading import resolve_device


@pytest.fixture
def cuda_machine(monkeypatch):
    """A machine with 4 GPUs, as far as moeguard can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return monkeypatch


def test_each_process_of_a_launch_gets_its_own_gpu(cuda_machine):
    assert distributed.process_device() == resolve_device(None) == "cuda"  # no launcher: the default GPU
    cuda_machine.setenv("WORLD_SIZE", "4")
    for rank in range(4):
        cuda_machine.setenv("LOCAL_RANK", str(rank))
        assert distributed.process_device() == resolve_device(None) == f"cuda:{rank}"
    assert resolve_device("cpu") == "cpu"  # an explicit device wins


def test_without_cuda_every_process_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.process_device() == resolve_device(None) == "cpu"


def test_collectives_run_on_the_current_gpu_under_nccl_and_on_the_cpu_under_gloo(monkeypatch):
    import torch.distributed as dist

    assert distributed.collective_device() == torch.device("cpu")  # no group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert distributed.collective_device() == torch.device("cuda", 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


def test_a_count_is_summed_over_processes_on_the_collective_device_and_stays_an_integer(monkeypatch):
    import torch.distributed as dist

    seen = []
    monkeypatch.setattr(distributed, "distributed_world", lambda: (0, 2))

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)
        tensor.mul_(2)  # the other process held the same value

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    total = distributed.sum_over_processes(21)
    assert total == 42 and isinstance(total, int)
    assert seen == [distributed.collective_device()]
