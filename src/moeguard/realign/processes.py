"""Running the loop under ``torch.distributed`` (``accelerate launch``, ``torchrun``): every helper
is a no-op with one process.

The pool and the test sets are split between processes (:func:`shard`) and the
per-example results gathered back (:func:`gather_rows`); training wraps the model
in ``DistributedDataParallel`` (:func:`data_parallel`); the first process writes
the files, and the run ends only if every process holds the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moeguard.attribution.collect import distributed_world, iterate_shard
from moeguard.errors import InternalError
from moeguard.eval.evaluate import causal_lm
from moeguard.models import MoEModel
from moeguard.models.fingerprint import short, update_with_tensor


def shard(indices: Sequence[int]) -> list[int]:
    """This process's share of ``indices`` (every ``world``-th one, from its rank)."""
    return list(iterate_shard(indices, *distributed_world()))


def gather_rows(indices: Sequence[int], local: list[int], values: torch.Tensor) -> torch.Tensor:
    """Rows of ``values`` (one per index of ``local``) from every process, in the order of ``indices``."""
    _, world = distributed_world()
    pairs = [(local, values.cpu())]
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, pairs[0])
        pairs = gathered
    position = {index: row for row, index in enumerate(indices)}
    template = next((shard_values for _, shard_values in pairs if shard_values.numel()), values.cpu())
    out = torch.empty((len(indices), *template.shape[1:]), dtype=template.dtype)
    for shard_indices, shard_values in pairs:
        for index, row in zip(shard_indices, shard_values):
            out[position[index]] = row
    return out


def sum_over_processes(value: int) -> int:
    """``value`` summed over every process (itself with one process)."""
    _, world = distributed_world()
    if world == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(total)
    return int(total)


def is_main() -> bool:
    """True on the process that writes files and reports (rank 0)."""
    return distributed_world()[0] == 0


def barrier() -> None:
    """Wait until every process gets here (no-op with one process)."""
    if distributed_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def data_parallel(moe: MoEModel, trainable: dict[str, nn.Parameter]) -> Iterator[Any]:
    """The model to train: ``moe`` itself, or under ``torch.distributed`` its causal LM wrapped in
    ``DistributedDataParallel`` over the trainable parameters only (the rest is frozen while the
    wrapper lives, so DDP neither waits for nor averages their gradients)."""
    if distributed_world()[1] == 1:
        yield moe
        return
    from torch.nn.parallel import DistributedDataParallel

    lm = causal_lm(moe)
    chosen = {id(p) for p in trainable.values()}
    frozen = [p for p in lm.parameters() if p.requires_grad and id(p) not in chosen]
    for param in frozen:
        param.requires_grad_(False)
    try:
        # Experts a process's batch never routes to get no gradient there: find_unused_parameters.
        yield DistributedDataParallel(lm, find_unused_parameters=True)
    finally:
        for param in frozen:
            param.requires_grad_(True)


def check_replicas_agree(trainable: dict[str, nn.Parameter]) -> None:
    """Under ``torch.distributed``, refuse to finish unless every process holds the same trained weights."""
    _, world = distributed_world()
    if world == 1:
        return
    import torch.distributed as dist

    digest = hashlib.sha256()
    for name, param in trainable.items():
        update_with_tensor(digest, name, param)
    digests: list = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise InternalError(f"the {world} processes ended with different weights ({[short(d) for d in digests]}); "
                         "their gradients were not averaged. This is a bug in moeguard.")


def broadcast_from_first(value: Any) -> Any:
    """The first process's ``value``, on every process."""
    if distributed_world()[1] == 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
