"""``attribute``: one task's attribution from data to files (what ``moeguard attribute`` runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moeguard.attribution.collect import collect_attribution
from moeguard.attribution.record import Attribution, check_fingerprint, tensors_path
from moeguard.attribution.scores import DEFAULT_CRITERIA
from moeguard.attribution.summary import Specialisation, overlap, specialisation
from moeguard.data import TaskData, batches
from moeguard.data.batching import context_length
from moeguard.distributed import distributed_world, iterate_shard
from moeguard.errors import InputError
from moeguard.io import check_outputs
from moeguard.models import MoEModel
from moeguard.runs import partial_path


@dataclass
class AttributionRun:
    """An attribution with its summary, where it was written, and its overlap with other tasks.

    ``compared`` are the other tasks' attributions; ``overlaps[task]`` is the per-layer
    Jaccard index of this task's top sets with that task's (frequency criterion, a
    quarter of the experts).
    """

    attribution: Attribution
    summary: Specialisation
    path: Path | None = None
    compared: list[Attribution] = field(default_factory=list)
    overlaps: dict[str, list[float]] = field(default_factory=dict)

    def describe(self) -> str:
        a = self.attribution
        lines = [
            f"{a.task}: {a.samples} samples, {a.token_counts[0]:,} {a.tokens} tokens per MoE layer, "
            f"{a.num_layers} MoE layers x {a.width} experts",
            f"  {self.summary.describe()}",
        ]
        for task, values in self.overlaps.items():
            lines.append(f"  top-set overlap with {task}: {sum(values) / len(values):.2f} (mean Jaccard over layers)")
        if self.path is not None:
            lines.append(f"  wrote {self.path} (+ {tensors_path(self.path).name})")
        return "\n".join(lines)


def check_data(data: TaskData, tokens: str) -> None:
    """Refuse a token selection the data cannot have (before any forward pass)."""
    if tokens != "all" and data.kind == "lm":
        raise InputError(
            f"tokens={tokens!r} selects the {tokens} part of prompt/answer examples, but {data.name!r} "
            f"({data.source or 'in memory'}) is plain text (lm); use tokens='all'.", arguments=("tokens",),
        )


def check_attribution_outputs(out: str | Path | None, *, inputs: Sequence[str | Path | None], overwrite: bool) -> None:
    """What :func:`attribute` writes, checked before any work: the JSON and its tensor file beside it
    (see :func:`moeguard.io.check_output`)."""
    if out is not None:
        check_outputs([out, tensors_path(out)], inputs=inputs, overwrite=overwrite)


def attribute(
    moe: MoEModel,
    data: TaskData,
    *,
    tokens: str = "all",
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    batch_size: int = 8,
    max_length: int | None = None,
    out: str | Path | None = None,
    compare: Sequence[str | Path] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> AttributionRun:
    """Attribute ``data`` on ``moe`` and write ``out`` (JSON + safetensors); heatmaps are drawn from the result
    (:func:`moeguard.attribution.figures.attribution_figures`).

    ``compare`` names attributions of other tasks on the same model; their top-set
    overlap with this one is reported. Under ``torch.distributed`` every process
    runs this with the same arguments: each collects over its shard of the batches
    and rank 0 writes the files. An interrupted run resumes when run again with
    the same arguments.
    """
    if moe.tokenizer is None:
        raise InputError(f"the model {moe.source} has no tokenizer; attribution needs one to encode the task data.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.", arguments=("batch_size",))
    check_data(data, tokens)
    out = Path(out) if out is not None else None
    check_attribution_outputs(out, inputs=[moe.source, data.source, *compare], overwrite=overwrite)
    others = [Attribution.load(path) for path in compare]
    for path, other in zip(compare, others):
        check_fingerprint(other, moe, what=f"the attribution {path}")
    rank, world = distributed_world()
    total = -(-len(data) // batch_size)
    stream = batches(moe.tokenizer, data, batch_size=batch_size, max_length=max_length, context=context_length(moe),
                     prompt_format=moe.prompt_format)
    shard = iterate_shard(stream, rank, world)
    attribution = collect_attribution(
        moe,
        shard,
        tokens=tokens,
        criteria=criteria,
        task=data.name,
        task_source=data.source,
        total_batches=-(-(total - rank) // world),
        checkpoint=partial_path(out) if out is not None else None,
        progress=progress and rank == 0,
    )
    run = AttributionRun(attribution, specialisation(attribution), compared=others)
    for other in others:
        table = overlap([attribution, other], "frequency")
        run.overlaps[other.task or "other"] = table[0, 1].tolist()
    if rank != 0:
        return run
    if out is not None:
        run.path = attribution.save(out, summary={**run.summary.to_dict(), "overlap": run.overlaps})
    return run

