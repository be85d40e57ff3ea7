"""Running under several processes (``torchrun``, ``accelerate launch``): every helper is a no-op with one.

A launcher starts one process per device and describes the job in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). :func:`init_distributed_from_environment`
joins the process group it describes, :func:`process_device` is the device each
process puts its model on (the one place that maps ``LOCAL_RANK`` to a GPU), and the
collectives here run on the device the backend needs (NCCL: this process's GPU;
gloo: the CPU), whatever device the values come from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch


def launched_world_size() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``, 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``, 0 without a launcher)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def process_device() -> str:
    """The device this process runs on by default: with CUDA, under a launcher of several
    processes, GPU ``LOCAL_RANK`` (one GPU per process); else the first GPU; without CUDA, the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    if launched_world_size() > 1 or distributed_world()[1] > 1:
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return "cuda"


def init_distributed_from_environment() -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1), with NCCL on CUDA and gloo otherwise.

    Under NCCL this process's GPU (:func:`process_device`) becomes the current CUDA
    device, so collectives and the model share it. Returns True when a group was
    started here (the caller destroys it).
    """
    import torch.distributed as dist

    if launched_world_size() <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(torch.device(process_device()))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


@contextlib.contextmanager
def process_group_from_environment() -> Iterator[None]:
    """The block runs in the launcher's process group (:func:`init_distributed_from_environment`);
    a group started here is destroyed when the block ends."""
    started = init_distributed_from_environment()
    try:
        yield
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors must be for a collective of the default group: the current GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every process, in place (no-op with one process); runs on :func:`collective_device`."""
    if distributed_world()[1] == 1:
        return tensor
    import torch.distributed as dist

    device = collective_device()
    moved = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def sum_over_processes(value: float) -> float:
    """``value`` summed over every process (itself with one process)."""
    if distributed_world()[1] == 1:
        return value
    total = all_reduce_sum_(torch.tensor([value], dtype=torch.float64))
    return type(value)(total.item())


def iterate_shard(items: Iterable[Any], rank: int, world: int) -> Iterator[Any]:
    """Every ``world``-th item starting at ``rank``: this process's disjoint shard."""
    for position, item in enumerate(items):
        if position % world == rank:
            yield item


def shard(indices: Sequence[int]) -> list[int]:
    """This process's share of ``indices`` (every ``world``-th one, from its rank)."""
    return list(iterate_shard(indices, *distributed_world()))


def gather_rows(indices: Sequence[int], local: list[int], values: torch.Tensor) -> torch.Tensor:
    """Rows of ``values`` (one per index of ``local``) from every process, in the order of ``indices``."""
    pairs = all_gather_objects((local, values.cpu()))
    position = {index: row for row, index in enumerate(indices)}
    template = next((shard_values for _, shard_values in pairs if shard_values.numel()), values.cpu())
    out = torch.empty((len(indices), *template.shape[1:]), dtype=template.dtype)
    for shard_indices, shard_values in pairs:
        for index, row in zip(shard_indices, shard_values):
            out[position[index]] = row
    return out


def is_main() -> bool:
    """True on the process that writes files and reports (rank 0)."""
    return distributed_world()[0] == 0


def barrier() -> None:
    """Wait until every process gets here (no-op with one process)."""
    if distributed_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_from_first(value: Any) -> Any:
    """The first process's ``value``, on every process."""
    if distributed_world()[1] == 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (``[value]`` with one process)."""
    world = distributed_world()[1]
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered
