"""The active-learning re-alignment loop: the attack's third step.

A random seed set is drawn from the pool. Each round then (from the second on)
scores the unlabelled pool with the acquisition function and labels the best
batch, fine-tunes the trainable scope on every labelled example with
:func:`moeguard.training.train`, and measures the target task's and the other
tasks' test score. The label schedule ends exactly at the budget.

Every task type re-aligns: generation and classification train on the answer (the
correct choice) after the prompt, language modelling on the text itself (for text, a
"label" is a text of the pool chosen for training; it costs no answer). Scores are in
each task's metric (``accuracy`` fields hold the score: an accuracy, a ROUGE-L, a token
loss) and retention is measured from its no-knowledge reference
(:func:`moeguard.data.task_types.retention`).

Two entry points share all of it: a pruned model directory (its manifest names
the parent and the kept experts) or, in mask mode, the unpruned model with a keep
set (the parent is the same model without the mask; the model's weights are
restored when the run ends).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import moeguard
from moeguard.data.batching import batches, context_length, encode_continuations, encode_examples, fit_to_context
from moeguard.distributed import (
    barrier,
    broadcast_from_first,
    distributed_world,
    gather_rows,
    init_distributed_from_environment,
    is_main,
    shard,
    sum_over_processes,
)
from moeguard.errors import FingerprintMismatchError, InputError, InternalError, ModelError, MoeGuardError, ResumeError
from moeguard.eval.evaluate import ANSWER_TOKEN_MARGIN, evaluate, scoring
from moeguard.io import check_output, read_json, write_json
from moeguard.models import MoEModel, RealignRecord, load_moe, normalize_keep_sets
from moeguard.models.fingerprint import checkpoint_fingerprint, short
from moeguard.realign.acquisition import ACQUISITIONS
from moeguard.realign.inputs import RealignData
from moeguard.realign.metrics import recovery, retention
from moeguard.realign.pool import check_acquisition_for, pool_values, removed_expert_masks, routing_shares, select
from moeguard.realign.processes import ProcessRows, check_replicas_agree, data_parallel
from moeguard.realign.result import RealignConfig, RealignResult, RoundRecord
from moeguard.realign.scopes import TRAIN_SCOPES, LoraAdapters, add_lora, frozen_digest, scope_parameters
from moeguard.realign.state import STATE_DIR, derive_seed, generator, load_latest_round, restore_trainable, save_round
from moeguard.runs import Run
from moeguard.training import train

log = logging.getLogger("moeguard.realign")

HISTORY_NAME = "history.json"
MODEL_DIR = "model"


# ---------------------------------------------------------------- measurements
def accuracy(moe: MoEModel, data: Any, *, batch_size: int) -> float:
    """The test score of ``moe`` on ``data`` in its metric, each process evaluating its share of the examples:
    ``sum(scores) / sum(weights)`` over every example (the mean score, or the mean token loss of lm texts)."""
    everything = list(range(len(data)))
    local = shard(everything)
    rows = torch.zeros(0, 2, dtype=torch.float64)
    if local:
        result = evaluate(moe, moe.tokenizer, data.subset(local), batch_size=batch_size)
        weights = result.weights if result.weights is not None else [1] * len(result.scores)
        rows = torch.tensor(list(zip(result.scores, weights)), dtype=torch.float64)
    totals = gather_rows(everything, local, rows).sum(dim=0)
    return float(totals[0] / totals[1])


def _accuracies(moe: MoEModel, data: RealignData, batch_size: int) -> tuple[float, dict[str, float]]:
    target = accuracy(moe, data.test, batch_size=batch_size)
    return target, {other.name: accuracy(moe, other, batch_size=batch_size) for other in data.others}


def _retention(value: float, unpruned: float, scored: dict[str, Any]) -> float:
    return retention(value, unpruned, scored["reference"], higher_is_better=scored["higher_is_better"])


def _mean_other_retention(other: dict[str, float], unpruned_other: dict[str, float], scoring: dict[str, dict]) -> float:
    values = [_retention(other[name], unpruned_other[name], scoring[name]) for name in other]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------- the parent
def _load_parent(moe: MoEModel, parent: MoEModel | str | Path | None) -> tuple[MoEModel, bool]:
    """The unpruned parent of a pruned model, checked against its manifest; ``(parent, loaded_here)``."""
    manifest = moe.manifest
    if isinstance(parent, MoEModel):
        found, loaded = parent, False
    else:
        source = parent if parent is not None else manifest.parent_model
        if source is None:
            raise ModelError(
                "the prune manifest does not name the parent model; retention is measured against it, so pass "
                "the unpruned model as `parent`.", arguments=("parent",),
            )
        try:
            found = load_moe(source, dtype=next(moe.model.parameters()).dtype)
        except ModelError as error:
            raise ModelError(f"cannot load the unpruned parent ({error}); pass it as `parent`.", arguments=("parent",)) from None
        found.model.to(moe.device)
        loaded = True
    if found.tokenizer is None:
        found.tokenizer = moe.tokenizer
    found.prompt_format = moe.prompt_format
    if manifest.parent_fingerprint_kind == "checkpoint":
        actual = checkpoint_fingerprint(found.source) if found.source and Path(found.source).is_dir() else ""
    else:
        actual = found.fingerprint()
    if actual != manifest.parent_fingerprint:
        raise FingerprintMismatchError(
            f"the pruned model was carved from the model with {manifest.parent_fingerprint_kind} fingerprint "
            f"{short(manifest.parent_fingerprint)}, but the parent given ({found.source}) has {short(actual) or 'none'}; "
            "pass the exact model it was pruned from (same weights and dtype) as `parent`.", arguments=("parent",),
        )
    return found, loaded


@dataclass
class Reference:
    """Measurements on the unpruned parent, taken once: scores (in each task's metric) and (routing
    acquisition) pool shares."""

    accuracy: float
    other: dict[str, float]
    routing_shares: list[float] | None = None


def _measure_reference(
    parent: MoEModel, data: RealignData, config: RealignConfig, removed: list[torch.Tensor]
) -> Reference:
    target, other = _accuracies(parent, data, config.eval_batch_size)
    shares = None
    if ACQUISITIONS[config.acquisition].parent_routing:
        shares = routing_shares(parent, data.pool, range(len(data.pool)), removed, batch_size=config.eval_batch_size).tolist()
    log.info("unpruned parent: accuracy %.3f on %s", target, data.task)
    return Reference(target, other, shares)


# ---------------------------------------------------------------- the run
@dataclass
class _Run:
    """Everything a round reads and updates; ``scoring`` says how each task is scored (by name)."""

    moe: MoEModel
    data: RealignData
    config: RealignConfig
    trainable: dict[str, nn.Parameter]
    reference: Reference
    scoring: dict[str, dict[str, Any]]
    labelled: list[int] = field(default_factory=list)
    history: list[RoundRecord] = field(default_factory=list)
    trained_rounds: int = 0  # rounds trained by this call (the others were resumed)

    def record(self, round_index: int, trained: Any, train_seconds: float, acquire_seconds: float) -> RoundRecord:
        target, other = _accuracies(self.moe, self.data, self.config.eval_batch_size)
        previous = self.history[-1] if self.history else None
        steps = (previous.steps if previous else 0) + (trained.steps if trained else 0)
        tokens = (previous.tokens if previous else 0) + (trained.tokens if trained else 0)
        wall = (previous.wall_seconds if previous else 0.0) + train_seconds + acquire_seconds
        pruned = self.history[0].accuracy if self.history else target
        scored = self.scoring[self.data.task]
        record = RoundRecord(
            round=round_index,
            labels=len(self.labelled) if round_index else 0,
            steps=steps,
            tokens=tokens,
            wall_seconds=wall,
            accuracy=target,
            retention=_retention(target, self.reference.accuracy, scored),
            recovery=recovery(target, pruned, self.reference.accuracy, higher_is_better=scored["higher_is_better"]),
            other_accuracy=other,
            other_retention=_mean_other_retention(other, self.reference.other, self.scoring),
            train_loss=trained.final_loss if trained else math.nan,
            train_seconds=train_seconds,
            acquire_seconds=acquire_seconds,
        )
        self.history.append(record)
        return record

    def max_new_tokens(self) -> int:
        """A generation budget for unlabelled prompts: the longest labelled answer plus a margin."""
        if self.data.pool.kind != "generate":
            return 0  # choices are scored, texts are their own answers: nothing is generated
        answers = [self.data.pool.examples[i].target for i in self.labelled]
        lengths = [len(ids) for ids in encode_continuations(self.moe.tokenizer, answers, eos=True)]
        return max(lengths, default=1) + ANSWER_TOKEN_MARGIN

    def acquire(self, round_index: int, count: int) -> list[int]:
        config = self.config
        entry = ACQUISITIONS[config.acquisition]
        rng = generator(config.seed, "acquire", round_index)
        chosen = set(self.labelled)
        candidates = [i for i in range(len(self.data.pool)) if i not in chosen]
        values: torch.Tensor | None = None
        if entry.parent_routing:
            values = torch.tensor(self.reference.routing_shares, dtype=torch.float64)
        elif entry.value is not None:
            scored = candidates + (self.labelled if entry.reads_labelled else [])
            rows = pool_values(
                self.moe,
                self.data.pool,
                scored,
                config.acquisition,
                max_new_tokens=self.max_new_tokens(),
                batch_size=config.eval_batch_size,
                generator=rng,
            )
            values = torch.full((len(self.data.pool), *rows.shape[1:]), math.nan, dtype=rows.dtype)
            values[scored] = rows
        # Every process computed the same values; the first one's choice is used, so they cannot drift.
        return broadcast_from_first(select(config.acquisition, values, candidates, self.labelled, count, rng))

    def train_round(self, round_index: int, checkpoint: Path | None, progress: bool) -> Any:
        """Fine-tune on every labelled example; the round's training state is kept in ``checkpoint``."""
        config = self.config
        round_seed = derive_seed(config.seed, "train", round_index)
        order = torch.randperm(len(self.labelled), generator=torch.Generator().manual_seed(round_seed)).tolist()
        # Every process draws the same batches and trains on its rows of each (see realign.processes).
        stream = ProcessRows(batches(
            self.moe.tokenizer,
            self.data.pool.subset([self.labelled[i] for i in order]),
            batch_size=config.batch_size,
            shuffle=True,
            seed=round_seed,
            epochs=None,
            context=context_length(self.moe),
            prompt_format=self.moe.prompt_format,
        ))
        with data_parallel(self.moe, self.trainable) as model:
            trained = train(
                model,
                stream,
                steps=config.steps_per_round,
                lr=config.lr,
                parameters=list(self.trainable.values()),
                seed=round_seed,
                progress=progress,
                checkpoint=checkpoint,
                checkpoint_every=max(1, config.steps_per_round // 2),
                checkpoint_settings={"round": round_index, "labelled": len(self.labelled)},
            )
        world = distributed_world()[1]
        # The whole batches' tokens, and the loss of the whole batches (the mean of the processes' shares).
        return replace(trained, tokens=stream.tokens, final_loss=sum_over_processes(trained.final_loss) / world)

    def state(self, model_fingerprint: str, mode: str) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "mode": mode,
            "task": self.data.task,
            "data": self.data.signature(),
            "model_fingerprint": model_fingerprint,
            "reference": asdict(self.reference),
            "labelled": self.labelled,
            "history": [asdict(r) for r in self.history],
        }


RUN_LABELS = {"config": "options", "mode": "mode", "task": "target task", "data": "data (pool, test set or other tasks)",
              "model_fingerprint": "model weights"}


def _open_run(out_dir: Path, settings: dict[str, Any], resume: bool) -> Run:
    """The run in ``out_dir``: a new one, or (with ``resume``) the interrupted or finished one started with
    exactly these settings. Every process decides before any of them writes."""
    existing = Run.record(out_dir) is not None or (out_dir / HISTORY_NAME).exists() or (out_dir / STATE_DIR).exists()
    barrier()
    if existing and not resume:
        raise InputError(f"{out_dir} already holds a re-alignment run; pass resume=True to continue it, or choose "
                         "another output directory.", arguments=("resume",))
    if existing and Run.record(out_dir) is None:
        raise ResumeError(f"{out_dir} holds a re-alignment run of an earlier moeguard that did not record its "
                          "settings; delete it or choose another output directory.")
    return Run.open(out_dir, "re-alignment run", settings, labels=RUN_LABELS)


def _log_round(record: RoundRecord, rounds: int) -> None:
    log.info(
        "round %d/%d: %d labels, %d steps, accuracy %.3f (retention %.3f, recovery %.3f), other tasks %.3f, %.1fs",
        record.round, rounds, record.labels, record.steps, record.accuracy, record.retention, record.recovery,
        record.other_retention, record.wall_seconds,
    )


def _prune_record(moe: MoEModel, keep: dict[int, Sequence[int]] | None) -> tuple[list | None, list[list[int]], list[torch.Tensor]]:
    """``(keep sets for the mask or None, kept parent experts per layer, removed-expert masks per layer)``."""
    if keep is not None:
        keep_sets = normalize_keep_sets(moe.layers, keep, physical=False)
        kept = [k if k is not None else list(range(layer.num_experts)) for k, layer in zip(keep_sets, moe.layers)]
        return keep_sets, kept, removed_expert_masks(moe.num_experts, kept)
    if moe.manifest is None:
        raise InputError(
            f"{moe.source} has no moeguard_manifest.json, so it is not known which parent it was pruned from or "
            "which experts it kept; prune it with `moeguard prune`, or pass keep= to re-align the unpruned model "
            "in mask mode."
        )
    kept = [list(k) for k in moe.manifest.kept]
    return None, kept, removed_expert_masks(moe.manifest.parent_num_experts, kept)


def _trainable(moe: MoEModel, config: RealignConfig) -> tuple[LoraAdapters | None, dict[str, nn.Parameter]]:
    """``(LoRA adapters or None, trainable parameters by name)`` of the configured scope."""
    if TRAIN_SCOPES[config.scope].parameters is not None:
        return None, scope_parameters(moe, config.scope)
    torch.manual_seed(derive_seed(config.seed, "lora"))  # the adapters' initial A matrices
    adapters = add_lora(moe, rank=config.lora_rank)
    return adapters, adapters.parameters


@contextlib.contextmanager
def _restored_afterwards(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Put ``params`` back to their current values when the block ends (mask mode leaves the model as it was)."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)


def realign(
    model: MoEModel | str | Path,
    data: RealignData,
    config: RealignConfig,
    *,
    keep: dict[int, Sequence[int]] | None = None,
    parent: MoEModel | str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    progress: bool = True,
) -> RealignResult:
    """Re-align a pruned model by active-learning-driven fine-tuning; see the module docstring.

    ``model`` is a pruned model (directory or :class:`MoEModel` with its prune
    manifest; its ``parent``, by default the manifest's, gives the unpruned
    accuracy), or with ``keep`` the unpruned model, restricted to those experts by
    a mask. With ``out``, the run's settings are recorded first and its state is saved
    after every round (``resume=True`` picks an interrupted or finished run up, only
    with the same model, data and options) and the history JSON and, for a pruned
    model, the re-aligned model directory are written there; the recovery curves are
    drawn from the result (:func:`moeguard.realign.figures.recovery_figure`).
    ``on_round`` is called with each round's record after its state is saved.
    In pruned mode the model's manifest gains a :class:`RealignRecord` of the run
    (written with the model to ``out/model``).
    """
    init_distributed_from_environment()
    moe = model if isinstance(model, MoEModel) else load_moe(model)
    if moe.tokenizer is None:
        raise InputError("re-alignment needs the model's tokenizer, but none is saved with it; save one beside the weights.")
    data.check()
    config.check(len(data.pool))
    check_acquisition_for(config.acquisition, data.pool.kind, data.task)
    for part in (data.pool, data.test, *data.others):  # every example fits the model's context, checked up front
        fit_to_context(part, encode_examples(moe.tokenizer, part.examples, moe.prompt_format), context_length(moe))
    mode = "mask" if keep is not None else "pruned"
    keep_sets, kept, removed = _prune_record(moe, keep)
    if isinstance(parent, MoEModel):
        parent_source = parent.source
    else:
        parent_source = parent if parent is not None or moe.manifest is None else moe.manifest.parent_model
    sources = [moe.source, parent_source, *(d.source for d in (data.pool, data.test, *data.others))]
    out_dir = check_output(out, inputs=sources, directory=True, resumable=True) if out is not None else None
    model_fingerprint = moe.fingerprint()
    settings = {"config": config.to_dict(), "mode": mode, "task": data.task, "data": data.signature(),
                "model_fingerprint": model_fingerprint}
    state_dir = out_dir / STATE_DIR if out_dir else None
    created = out_dir is not None and not out_dir.exists()
    if out_dir is not None:
        _open_run(out_dir, settings, resume)
        finished = read_json(out_dir / HISTORY_NAME, what="re-alignment history") if (out_dir / HISTORY_NAME).is_file() else None
        if finished is not None and finished.get("complete"):
            log.info("%s holds this finished run; nothing to do", out_dir)
            return RealignResult.from_dict(finished)

    saved = load_latest_round(state_dir) if state_dir is not None else None
    if saved is not None:
        reference = Reference(**saved.data["reference"])
        log.info("resuming from round %d of %s", saved.round, out_dir)
    elif mode == "mask":
        reference = _measure_reference(moe, data, config, removed)
    else:
        try:
            parent_moe, loaded = _load_parent(moe, parent)
        except MoeGuardError:
            if created:  # refused before any work: the run directory this call made goes again
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        reference = _measure_reference(parent_moe, data, config, removed)
        if loaded:
            del parent_moe
            gc.collect()

    lora, trainable = _trainable(moe, config)
    restore = _restored_afterwards(list(trainable.values())) if mode == "mask" else contextlib.nullcontext()
    digest = frozen_digest(moe, trainable, keep_sets)
    masked = moe.mask_experts(keep) if keep is not None else contextlib.nullcontext()
    scoring_of = {d.name: scoring(moe.tokenizer, d, context=context_length(moe)) for d in (data.test, *data.others)}
    run = _Run(moe, data, config, trainable, reference, scoring_of)
    schedule = config.schedule()
    try:
        with restore, masked:
            if saved is not None:
                restore_trainable(trainable, saved.tensors, source=str(out_dir / STATE_DIR))
                run.labelled = list(saved.data["labelled"])
                run.history = [RoundRecord(**r) for r in saved.data["history"]]
            else:
                run.record(0, None, 0.0, 0.0)
                _log_round(run.history[0], config.rounds)
                first = torch.randperm(len(data.pool), generator=generator(config.seed, "seed set"))
                run.labelled = first[: schedule[0]].tolist()
            for round_index in range(len(run.history), config.rounds + 1):
                start = time.perf_counter()
                if round_index > 1:
                    run.labelled += run.acquire(round_index, schedule[round_index - 1] - len(run.labelled))
                acquire_seconds = time.perf_counter() - start
                checkpoint = state_dir / f"train-rank{distributed_world()[0]}" if state_dir else None
                start = time.perf_counter()
                trained = run.train_round(round_index, checkpoint, progress)
                run.trained_rounds += 1
                record = run.record(round_index, trained, time.perf_counter() - start, acquire_seconds)
                _log_round(record, config.rounds)
                if state_dir is not None:
                    if is_main():
                        save_round(state_dir, round_index, run.state(model_fingerprint, mode), trainable)
                        write_json(out_dir / HISTORY_NAME, _result(run, mode, kept, model_fingerprint, False, False).to_dict())
                    barrier()
                if on_round is not None:
                    on_round(record)
            if frozen_digest(moe, trainable, keep_sets) != digest:
                raise InternalError("parameters outside the trainable scope changed during re-alignment; this is a bug in moeguard.")
            check_replicas_agree(trainable)
            if lora is not None and mode == "pruned":
                lora.merge(moe)
            result = _result(run, mode, kept, model_fingerprint, True, True)
            if mode == "pruned":
                # The pruned model's manifest now says what was done to its weights (and is saved with them).
                moe.manifest = replace(moe.manifest, realign=[*moe.manifest.realign, realign_record(moe, run, result)])
            if out_dir is not None:
                _finish(moe, run, result, out_dir)
    finally:
        if lora is not None and mode == "mask":
            lora.remove(moe)
    log.info("%s", result.describe())
    return result


def _result(run: _Run, mode: str, kept: list[list[int]], fingerprint: str, verified: bool, complete: bool) -> RealignResult:
    scored = run.scoring[run.data.task]
    return RealignResult(
        task=run.data.task,
        metric=scored["metric"],
        reference_score=scored["reference"],
        higher_is_better=scored["higher_is_better"],
        mode=mode,
        config=run.config.to_dict(),
        model_fingerprint=fingerprint,
        kept=[list(k) for k in kept],
        unpruned_accuracy=run.reference.accuracy,
        unpruned_other=run.reference.other,
        rounds=list(run.history),
        labelled=list(run.labelled),
        frozen_verified=verified,
        pool_size=len(run.data.pool),
        complete=complete,
        data_signature=run.data.signature(),
        trained_rounds=run.trained_rounds,
    )


def realign_record(moe: MoEModel, run: _Run, result: RealignResult) -> RealignRecord:
    """The manifest entry of a finished run on a pruned model (``moe`` holds the re-aligned weights)."""
    config, final = run.config, result.final
    return RealignRecord(
        parent_fingerprint=result.model_fingerprint,
        fingerprint=moe.fingerprint(),
        task=result.task,
        scope=config.scope,
        acquisition=config.acquisition,
        labels=final.labels,
        budget=config.budget,
        rounds=config.rounds,
        steps=final.steps,
        tokens=final.tokens,
        lr=config.lr,
        seed=config.seed,
        unpruned_accuracy=result.unpruned_accuracy,
        pruned_accuracy=result.pruned_accuracy,
        accuracy=final.accuracy,
        retention=final.retention,
        data_signature=run.data.signature(),
        lora_rank=config.lora_rank if config.scope == "lora" else None,
        moeguard_version=moeguard.__version__,
    )


def _finish(moe: MoEModel, run: _Run, result: RealignResult, out_dir: Path) -> None:
    """Write the re-aligned model (pruned mode) and the final history; drop the state."""
    if result.mode == "pruned":
        if is_main():
            moe.save(out_dir / MODEL_DIR, overwrite=True)
        result.model_dir = str(out_dir / MODEL_DIR)
    result.history_path = str(out_dir / HISTORY_NAME)
    if is_main():
        write_json(out_dir / HISTORY_NAME, result.to_dict())
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
    barrier()
