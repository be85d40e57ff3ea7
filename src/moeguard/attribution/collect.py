"""Collecting an attribution: run the model over batches and sum routing statistics.

The statistics come from the routing the experts actually receive
(:meth:`MoEModel.capture_routing`), restricted to the selected tokens (all non-pad
tokens, or prompt / answer tokens only). Expert outputs for REAP and EAN are
computed for the routed ``(token, expert)`` pairs only. Ablation costs one masked
pass per expert over every batch and is opt-in.

Under ``torch.distributed`` each process collects over its own shard of the
batches and the sums are all-reduced at the end, which gives exactly the totals of
one process over all batches. A long collection saves its sums to a checkpoint
directory and resumes from it when run again over the same batches.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moeguard.attribution.ablation import AblationUnit, ablation_units, loss_by_part, loss_labels
from moeguard.attribution.record import (
    ABLATION_SUMS,
    INTEGER_SUMS,
    NORM_SUMS,
    ROUTING_SUMS,
    SUM_SHAPES,
    TOKEN_MODES,
    Attribution,
)
from moeguard.attribution.scores import DEFAULT_CRITERIA, collected_statistics
from moeguard.attribution.statistics import (
    PARTS,
    coactivation_counts,
    output_norms,
    sum_by_expert,
    tokens_by_part,
)
from moeguard.data import model_inputs, to_device
from moeguard.distributed import all_reduce_sum_, distributed_world, sum_over_processes
from moeguard.errors import DataError, InputError
from moeguard.io import atomic_dir
from moeguard.models import MoEModel, RoutingEvent
from moeguard.models.fingerprint import checkpoint_fingerprint
from moeguard.runs import Run

logger = logging.getLogger("moeguard.attribution")

STATE_DIR, CHECKPOINT_FILE = "state", "attribution.json"  # replaced whole at every save


def select_tokens(batch: dict[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """``[B, S]`` bool: the tokens whose routing is counted (never padding).

    ``all``: every non-pad token; ``prompt`` / ``answer``: the batch's
    ``prompt_mask`` / ``answer_mask`` within the attention mask.
    """
    if "input_ids" not in batch:
        raise InputError(f"a batch needs input_ids; this one has {sorted(batch)}.")
    input_ids = batch["input_ids"]
    attention = batch.get("attention_mask")
    selected = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention.bool()
    if tokens == "all":
        return selected
    key = f"{tokens}_mask"
    if key not in batch:
        raise InputError(
            f"tokens={tokens!r} needs batches with a {key} (task data with prompts and answers); this batch has "
            f"{sorted(batch)}. Use tokens='all' for plain text."
        )
    return selected & batch[key].bool()


def example_parts(batch: dict[str, torch.Tensor], first_index: int) -> torch.Tensor:
    """``[B]`` part of each example: its ``example_index`` (or running position) modulo 2."""
    index = batch.get("example_index")
    if index is None:
        index = torch.arange(first_index, first_index + batch["input_ids"].shape[0])
    return (index.long() % PARTS).to(batch["input_ids"].device)


def empty_sums(names: Iterable[str], num_layers: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed sums of the given names, shaped by :data:`SUM_SHAPES` with a parts axis."""
    sizes = {"L": num_layers, "E": width}
    return {
        name: torch.zeros(
            (PARTS, *(sizes[a] for a in SUM_SHAPES[name])),
            dtype=torch.int64 if name in INTEGER_SUMS else torch.float64,
            device=device,
        )
        for name in names
    }


class StatisticsAccumulator:
    """The sums of one process, fed by routing events; ``row_part`` is set per batch."""

    def __init__(self, moe: MoEModel, *, norms: bool, ablation: bool) -> None:
        self.moe = moe
        self.norms = norms
        self.width = max(moe.num_experts)
        names = ROUTING_SUMS + (NORM_SUMS if norms else ()) + (ABLATION_SUMS if ablation else ())
        self.sums = empty_sums(names, moe.num_layers, self.width, moe.device)
        self.coactivation = torch.zeros(moe.num_layers, self.width, self.width, dtype=torch.int64, device=moe.device)
        self.row_part = torch.zeros(0, dtype=torch.long)
        self.batches = 0

    def on_route(self, event: RoutingEvent) -> None:
        layer, index, weights = event.layer.index, event.top_k_index, event.top_k_weights
        part = self.row_part[event.token_positions[:, 0]]
        sums = self.sums
        sums["tokens"][:, layer] += tokens_by_part(part)
        sums["routed"][:, layer] += sum_by_expert(index, part, self.width)
        sums["gate_mass"][:, layer] += sum_by_expert(index, part, self.width, weights)
        self.coactivation[layer] += coactivation_counts(index, self.width)
        if self.norms and index.shape[0]:
            outputs = event.expert_outputs
            norms = output_norms(outputs if outputs is not None else self.moe.expert_outputs(layer, event.hidden_states, index))
            sums["output_norm"][:, layer] += sum_by_expert(index, part, self.width, norms)
            sums["weighted_norm"][:, layer] += sum_by_expert(index, part, self.width, norms * weights.float())

    def add_ablation(self, unit: AblationUnit | None, loss_sums: torch.Tensor) -> None:
        """Add per-part loss sums of the unmasked model (``unit`` None) or of one masked expert."""
        if unit is None:
            self.sums["base_loss"] += loss_sums
        else:
            self.sums["masked_loss"][:, unit.layer, unit.expert] += loss_sums

    def restore(self, attribution: Attribution) -> None:
        for name, value in attribution.sums.items():
            self.sums[name].copy_(value)
        if attribution.coactivation is not None:
            self.coactivation.copy_(attribution.coactivation)
        self.batches = attribution.batches

    def all_reduce(self) -> None:
        """Sum every statistic over the processes of the default ``torch.distributed`` group."""
        for tensor in (*self.sums.values(), self.coactivation):
            all_reduce_sum_(tensor)
        self.batches = int(sum_over_processes(self.batches))


def collect_attribution(
    moe: MoEModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    tokens: str = "all",
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    task: str | None = None,
    task_source: str | None = None,
    total_batches: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
) -> Attribution:
    """Run ``moe`` over ``batches`` and return the summed routing statistics.

    ``batches`` yields dicts with ``input_ids [B, S]`` and optionally
    ``attention_mask``, ``prompt_mask`` / ``answer_mask`` (for ``tokens``),
    ``labels`` (-100 where no loss; for ablation, default: every non-pad token) and
    ``example_index`` (which half of the samples an example belongs to; default:
    its position). Routing counts, gate mass and co-activation are always
    collected; ``criteria`` containing ``reap`` or ``ean`` adds expert output
    norms, ``ablation`` adds one masked pass per expert.

    ``checkpoint`` names a directory (a :class:`moeguard.runs.Run`) where the sums are
    saved every ``checkpoint_seconds``; a collection started again with the same
    checkpoint, model, settings and batches skips the batches already counted (other
    settings are refused). It is removed at the end.
    Under ``torch.distributed`` pass each process its own shard of the batches;
    the returned attribution holds the sums over all processes.
    """
    if tokens not in TOKEN_MODES:
        raise InputError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}.")
    norms, ablation = collected_statistics([criteria] if isinstance(criteria, str) else criteria)
    units = ablation_units(moe) if ablation else []
    rank, world = distributed_world()
    accumulator = StatisticsAccumulator(moe, norms=norms, ablation=ablation)
    done = 0
    run = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if world > 1:
            checkpoint = checkpoint.with_name(f"{checkpoint.name}.rank{rank}")
        settings = {"model_fingerprint": moe.fingerprint(), "settings": {
            "task": task, "tokens": tokens, "statistics": sorted(accumulator.sums), "shard": [rank, world]}}
        run = Run.open(checkpoint, "attribution collection", settings, labels={"model_fingerprint": "model weights"})
        if (checkpoint / STATE_DIR / CHECKPOINT_FILE).is_file():
            state = Attribution.load(checkpoint / STATE_DIR / CHECKPOINT_FILE)
            accumulator.restore(state)
            done = state.batches
            logger.info("resuming the attribution from %s after %d batches", checkpoint, done)

    stored_fingerprint = checkpoint_fingerprint(moe.source) if moe.source and Path(moe.source).is_dir() else ""

    def make(sums: dict[str, torch.Tensor], coactivation: torch.Tensor, batch_count: int) -> Attribution:
        return Attribution(
            model_fingerprint=moe.fingerprint(),
            checkpoint_fingerprint=stored_fingerprint or None,
            model_source=moe.source,
            model_type=moe.model_type,
            task=task,
            task_source=task_source,
            tokens=tokens,
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            expert_ids=[list(ids) for ids in moe.expert_ids],
            sums={name: value.cpu() for name, value in sums.items()},
            coactivation=coactivation.cpu(),
            batches=batch_count,
        )

    def save_checkpoint() -> None:
        with atomic_dir(checkpoint / STATE_DIR, overwrite=True) as tmp:
            make(accumulator.sums, accumulator.coactivation, accumulator.batches).save(tmp / CHECKPOINT_FILE)

    was_training = moe.model.training
    moe.model.eval()
    started = time.perf_counter()
    last_save = started
    bar = tqdm(batches, total=total_batches, desc="attribution", unit="batch", disable=None if progress else True)
    try:
        with torch.no_grad():
            for position, batch in enumerate(bar):
                if position < done:
                    continue
                _collect_batch(moe, to_device(batch, moe.device), accumulator, tokens, units, progress)
                if checkpoint is not None and time.perf_counter() - last_save >= checkpoint_seconds:
                    save_checkpoint()
                    last_save = time.perf_counter()
    finally:
        bar.close()
        moe.model.train(was_training)
    if checkpoint is not None and world > 1:
        save_checkpoint()  # the local sums survive a failure of the reduction below
    if world > 1:
        accumulator.all_reduce()
    attribution = make(accumulator.sums, accumulator.coactivation, accumulator.batches)
    _check_not_empty(attribution, tokens)
    if run is not None:
        run.remove()
    logger.info(
        "attribution of %s: %d samples, %d tokens (%s), %d batches in %.1fs",
        task or "the data", attribution.samples, attribution.token_counts[0], tokens, attribution.batches,
        time.perf_counter() - started,
    )
    return attribution


def _collect_batch(
    moe: MoEModel,
    batch: dict[str, torch.Tensor],
    accumulator: StatisticsAccumulator,
    tokens: str,
    units: list[AblationUnit],
    progress: bool,
) -> None:
    selection = select_tokens(batch, tokens)
    part = example_parts(batch, int(accumulator.sums["samples"].sum()))
    accumulator.row_part = part
    inputs = model_inputs(batch)
    with moe.capture_routing(keep=False, on_route=accumulator.on_route, expert_outputs=accumulator.norms) as capture:
        capture.selection = selection
        output = moe.model(**inputs, **({} if units else last_logits_only(moe.model)))
    accumulator.sums["samples"] += tokens_by_part(part)
    accumulator.batches += 1
    if not units:
        return
    labels = loss_labels(batch)
    loss_sums, counts = loss_by_part(output.logits, labels, part)
    del output
    accumulator.add_ablation(None, loss_sums)
    accumulator.sums["loss_tokens"] += counts
    if not int(counts.sum()):
        return  # masking cannot change a loss over no tokens
    for unit in tqdm(units, desc="ablation", unit="expert", leave=False, disable=None if progress else True):
        with moe.mask_experts(unit.keep):
            logits = moe.model(**inputs).logits
        accumulator.add_ablation(unit, loss_by_part(logits, labels, part)[0])


def last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """Keyword arguments that make a causal LM compute the logits of the last position only (routing needs
    none; a full ``[batch, seq, vocab]`` of logits is the largest activation at real vocabulary sizes)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _check_not_empty(attribution: Attribution, tokens: str) -> None:
    if attribution.samples == 0:
        raise DataError("the data is empty: no batches reached the model; give at least one example.")
    if max(attribution.token_counts) == 0:
        hint = "" if tokens == "all" else f" this data has no {tokens} tokens; use tokens='all'."
        raise InputError(
            f"no tokens were selected (tokens={tokens!r}) in {attribution.samples} samples, so there is nothing "
            f"to attribute;{hint or ' every token is padding.'}", arguments=("tokens",),
        )

