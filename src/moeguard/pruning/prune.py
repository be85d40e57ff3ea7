"""The pruning attack's second step: choose experts from an attribution and delete the rest.

:func:`prune_model` loads the model (or, with ``streaming=True``, only its config),
refuses an attribution made on another model, builds a :class:`PrunePlan`,
removes every expert it drops and writes a stock transformers model directory
with ``moeguard_manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.attribution import Attribution, check_fingerprint, scores
from moeguard.errors import FingerprintMismatchError, InputError
from moeguard.io import check_output
from moeguard.models import MoEModel, ParameterCounts, PruneManifest, load_moe
from moeguard.models.fingerprint import short
from moeguard.pruning.plans import PrunePlan, make_plan
from moeguard.pruning.streaming import load_meta_moe, streaming_prune

logger = logging.getLogger("moeguard.pruning")


@dataclass
class PruneSummary:
    """What a prune kept and what it saved."""

    out_dir: Path
    plan: PrunePlan
    manifest: PruneManifest
    before: ParameterCounts
    after: ParameterCounts
    streaming: bool

    @property
    def compression_ratio(self) -> float:
        """Total parameters before / after."""
        return self.before.total / self.after.total

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "streaming": self.streaming,
            "selection": self.plan.selection(),
            "kept": self.manifest.kept,
            "parameters": {
                "before": {"total": self.before.total, "active_per_token": self.before.active_per_token},
                "after": {"total": self.after.total, "active_per_token": self.after.active_per_token},
                "compression_ratio": self.compression_ratio,
            },
            "parent_fingerprint": self.manifest.parent_fingerprint,
            "parent_fingerprint_kind": self.manifest.parent_fingerprint_kind,
        }

    def describe(self) -> str:
        """The summary the ``prune`` command prints."""
        plan = self.plan
        size = {"uniform": f"keep {plan.keep}", "coverage": f"coverage {plan.coverage}", "global": f"budget {plan.budget}"}
        lines = [
            f"pruned by {plan.label} ({size[plan.method]}{f', task {plan.task}' if plan.task else ''}): "
            f"{sum(plan.keep_counts)} of {sum(plan.num_experts)} routed experts kept"
        ]
        for layer, (kept, total) in enumerate(zip(self.manifest.kept, plan.num_experts)):
            lines.append(f"  MoE layer {layer:>2}: {len(kept)}/{total} experts kept {kept}")
        before, after = self.before, self.after
        lines.append(
            f"parameters: {before.total:,} -> {after.total:,} total ({self.compression_ratio:.2f}x smaller); "
            f"{before.active_per_token:,} -> {after.active_per_token:,} active per token"
        )
        kind = "checkpoint" if self.manifest.parent_fingerprint_kind == "checkpoint" else "weights"
        lines.append(f"parent {kind} fingerprint {short(self.manifest.parent_fingerprint)}; written to {self.out_dir}")
        return "\n".join(lines)


def _attribution(attribution: Attribution | str | Path) -> tuple[Attribution, str | None]:
    if isinstance(attribution, Attribution):
        return attribution, None
    return Attribution.load(attribution), str(attribution)


def check_checkpoint_fingerprint(attribution: Attribution, meta: MoEModel, model_dir: str) -> str:
    """The checkpoint fingerprint a streaming prune must find, after the checks possible without reading weights."""
    if attribution.num_experts != meta.num_experts or attribution.model_type != meta.model_type:
        raise FingerprintMismatchError(
            f"the attribution was computed on a {attribution.model_type} model with {attribution.num_experts} experts "
            f"per MoE layer, but {model_dir} is a {meta.model_type} model with {meta.num_experts}; run "
            "`moeguard attribute` on this model."
        )
    expected = attribution.checkpoint_fingerprint
    if not expected:
        raise FingerprintMismatchError(
            f"the attribution records only the fingerprint of the weights in memory "
            f"({short(attribution.model_fingerprint)}), which a streaming prune cannot compute without loading the "
            f"model; it needs the checkpoint fingerprint, recorded when `moeguard attribute` loads a local model "
            f"directory. Attribute {model_dir} itself, or prune without `streaming`.", arguments=("streaming",)
        )
    return expected


def prune_model(
    model: str | Path | MoEModel,
    attribution: Attribution | str | Path,
    out_dir: str | Path,
    *,
    keep: int | None = None,
    coverage: float | None = None,
    budget: int | None = None,
    criterion: str = "frequency",
    least_used: bool = False,
    protect: list[tuple[int, int]] | tuple = (),
    seed: int = 0,
    streaming: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **load_kwargs: Any,
) -> PruneSummary:
    """Physically prune ``model`` to the experts ``attribution`` ranks highest and save it to ``out_dir``.

    ``model`` is a model directory, a hub id or a loaded :class:`MoEModel` (pruned
    in place). Exactly one of ``keep`` / ``coverage`` / ``budget`` sizes the plan
    (see :func:`make_plan`); a physical prune needs the same count in every layer.
    ``streaming=True`` prunes a local safetensors checkpoint shard by shard without
    loading it (peak memory: one shard). ``load_kwargs`` go to :func:`load_moe`.
    """
    source = model.source if isinstance(model, MoEModel) else str(model)
    check_output(out_dir, inputs=[source, None if isinstance(attribution, Attribution) else attribution],
                 overwrite=overwrite, directory=True)
    record, attribution_path = _attribution(attribution)

    def plan_for(layers: list, fingerprint: str) -> tuple[PrunePlan, dict[str, Any]]:
        plan = make_plan(scores(record, criterion, seed=seed), layers, keep=keep, coverage=coverage, budget=budget,
                         protect=protect, least_used=least_used, criterion=criterion, task=record.task,
                         attribution_fingerprint=fingerprint)
        return plan, {**plan.selection(), "attribution": attribution_path, "seed": seed if criterion == "random" else None}

    if streaming:
        if isinstance(model, MoEModel):
            raise InputError("a streaming prune reads a checkpoint directory; pass its path, not a loaded model.")
        trust_remote_code = bool(load_kwargs.get("trust_remote_code", False))
        meta = load_meta_moe(model, trust_remote_code=trust_remote_code)
        expected = check_checkpoint_fingerprint(record, meta, str(model))
        plan, selection = plan_for(meta.layers, expected)
        result = streaming_prune(model, plan.keep_sets(), out_dir, selection=selection, expected_fingerprint=expected,
                                 overwrite=overwrite, trust_remote_code=trust_remote_code, progress=progress)
        return PruneSummary(result.out_dir, plan, result.manifest, result.before, result.after, streaming=True)

    moe = model if isinstance(model, MoEModel) else load_moe(model, **load_kwargs)
    check_fingerprint(record, moe)
    plan, selection = plan_for(moe.layers, record.model_fingerprint)
    before = moe.parameter_counts()
    manifest = moe.prune(plan.keep_sets(), selection=selection)
    after = moe.parameter_counts()
    out = moe.save(out_dir, manifest, overwrite=overwrite)
    logger.info("pruned %s to %s experts per layer -> %s", moe.source, plan.keep_counts, out)
    return PruneSummary(out, plan, manifest, before, after, streaming=False)
