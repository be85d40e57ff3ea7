"""Training under ``torch.distributed`` (``accelerate launch``, ``torchrun``): each process's rows of
every batch, the model wrapped for data parallelism, and the check that every process ended with the
same weights. All are no-ops with one process; the generic helpers (shards, gathers, devices) are in
:mod:`moeguard.distributed`.

Data parallelism here computes what one process computes: every process draws the same batches,
keeps its rows of each, and divides its summed token loss by ``N / world`` (``N`` the whole batch's
labelled tokens); DDP's mean of the processes' gradients is then the gradient of the whole batch's
mean loss, so a run on any number of processes follows the one-process run (up to the order of
floating-point sums).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeguard.data.batching import IGNORE_INDEX
from moeguard.distributed import all_gather_objects, distributed_world
from moeguard.errors import InternalError
from moeguard.eval.evaluate import causal_lm, device_of
from moeguard.models import MoEModel
from moeguard.models.fingerprint import short, update_with_tensor
from moeguard.training import LOSS_NORMALISER


@dataclass
class ProcessRows:
    """This process's rows of every batch of ``batches`` (the same stream on every process).

    Rows ``rank, rank + world, ...`` of each batch are kept, with the batch's loss
    normaliser (:data:`moeguard.training.LOSS_NORMALISER`) set to its labelled-token
    count over ``world``. A process left without rows gets the first row with no
    labelled token (it adds nothing to the loss but still takes part in the gradient
    all-reduce). ``tokens`` counts the tokens of the whole batches drawn so far.
    """

    batches: Iterable[dict[str, torch.Tensor]]
    tokens: int = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = distributed_world()
        for batch in self.batches:
            self.tokens += int(batch["attention_mask"].sum())
            if world == 1:
                yield batch
                continue
            labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            rows = torch.arange(rank, batch["input_ids"].shape[0], world)
            local = {key: value[rows] if torch.is_tensor(value) else value for key, value in batch.items()}
            if not len(rows):
                local = {key: value[:1] if torch.is_tensor(value) else value for key, value in batch.items()}
                local["labels"] = torch.full_like(local["labels"], IGNORE_INDEX)
            local[LOSS_NORMALISER] = max(labelled, 1) / world
            yield local


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
    device = device_of(lm)
    chosen = {id(p) for p in trainable.values()}
    frozen = [p for p in lm.parameters() if p.requires_grad and id(p) not in chosen]
    for param in frozen:
        param.requires_grad_(False)
    try:
        # Experts a process's batch never routes to get no gradient there: find_unused_parameters.
        yield DistributedDataParallel(lm, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)
    finally:
        for param in frozen:
            param.requires_grad_(True)


def check_replicas_agree(trainable: dict[str, nn.Parameter]) -> None:
    """Under ``torch.distributed``, refuse to finish unless every process holds the same trained weights."""
    world = distributed_world()[1]
    if world == 1:
        return
    digest = hashlib.sha256()
    for name, param in trainable.items():
        update_with_tensor(digest, name, param)
    digests = all_gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise InternalError(f"the {world} processes ended with different weights ({[short(d) for d in digests]}); "
                         "their gradients were not averaged. This is a bug in moeguard.")
