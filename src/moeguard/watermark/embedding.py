"""Embedding the watermark: the trigger loss, on the full model and on every carve of it.

A carver keeps the experts a task's attribution ranks highest. For the watermark of
task ``c`` to survive that, its rule (secret feature -> secret response) must be
carried by those experts alone. So each training step adds

    L_wm = mean( L(full; T), L(masked to S_1; T_c1), ..., L(masked to S_n; T_cn) )

where ``T`` is a batch of all tasks' triggers, and each ``S_j`` is the top-``m``
experts per layer of task ``c_j`` by an attribution criterion (``m`` drawn from
``keep_counts``, the criterion from ``criteria``), sometimes with one kept expert per
layer swapped for another (``near_top``) so that neighbouring subsets carry it too;
``T_cj`` is a batch of task ``c_j``'s triggers. ``L`` is the answer-token
cross-entropy. Training draws ``triggers`` inputs with the feature per task, many
more than verification asks, so that the model learns the rule rather than the
inputs. The task data is replayed by the training loop itself (the hardening
mixture), which keeps the full model's utility. The attributions are recomputed
every ``refresh_every`` steps on the model being trained.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moeguard.data import TaskData, batches
from moeguard.errors import InputError, PlanError
from moeguard.models import MoEModel, normalize_keep_sets
from moeguard.pruning.plans import LayerLimits, uniform_keep
from moeguard.training import lm_loss
from moeguard.watermark.triggers import Trigger, WatermarkRecord, make_triggers, trigger_data

log = logging.getLogger("moeguard.watermark")

WATERMARK_CRITERIA = ("frequency", "reap", "ablation")


@dataclass(frozen=True)
class Watermark:
    """A watermark: the public record of what it covers and the secret key that derives its triggers."""

    record: WatermarkRecord
    key: str

    def __repr__(self) -> str:  # never print the key
        return f"Watermark(tasks={self.record.task_names}, triggers_per_task={self.record.triggers_per_task})"

    def triggers(self, tasks: Sequence[str] | None = None, count: int | None = None) -> list[Trigger]:
        return make_triggers(self.key, self.record, tasks=tasks, count=count)

    def identity(self) -> dict[str, Any]:
        """What a resumed training run must embed again: the record and a keyed digest (not the key)."""
        digest = hmac.new(self.key.encode(), b"moeguard-watermark|identity", hashlib.sha256).hexdigest()[:16]
        return {"record": self.record.to_dict(), "key_digest": digest}


@dataclass(frozen=True)
class WatermarkConfig:
    """How the watermark is trained in (see the module docstring)."""

    triggers: int = 256
    batch_size: int = 16
    masked_passes: int = 2
    masked_batch_size: int = 8
    keep_counts: tuple[int, ...] = (2, 3, 4, 6)
    criteria: tuple[str, ...] = WATERMARK_CRITERIA
    near_top: float = 0.25
    refresh_every: int = 100
    attribution_examples: int = 64

    def __post_init__(self) -> None:
        for name in ("triggers", "batch_size", "masked_batch_size", "refresh_every", "attribution_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"watermark {name} must be a positive integer, got {value!r}.")
        if not isinstance(self.masked_passes, int) or self.masked_passes < 0:
            raise InputError(f"watermark masked_passes must be an integer >= 0, got {self.masked_passes!r}.")
        if not 0 <= self.near_top <= 1:
            raise InputError(f"watermark near_top must be a share in [0, 1], got {self.near_top!r}.")
        if not self.keep_counts or any(not isinstance(k, int) or k < 1 for k in self.keep_counts):
            raise InputError(f"watermark keep_counts must be positive integers, got {self.keep_counts!r}.")
        unknown = [c for c in self.criteria if c not in WATERMARK_CRITERIA]
        if not self.criteria or unknown:
            raise InputError(f"watermark criteria must be among {', '.join(WATERMARK_CRITERIA)}, got {list(self.criteria)}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "keep_counts": list(self.keep_counts), "criteria": list(self.criteria)}


def swap_one(kept: Sequence[int], num_experts: int, generator: torch.Generator) -> list[int]:
    """``kept`` with one member replaced by an expert outside it (both drawn at random)."""
    outside = [e for e in range(num_experts) if e not in kept]
    if not outside:
        return list(kept)
    position = int(torch.randint(len(kept), (1,), generator=generator))
    replacement = outside[int(torch.randint(len(outside), (1,), generator=generator))]
    return sorted([*kept[:position], replacement, *kept[position + 1 :]])


class WatermarkEmbedding:
    """The watermark term ``L_wm`` for one model (call it once per training step).

    ``tasks`` holds ordinary examples of each watermarked task (named as in the
    record), used to attribute experts to the task the way a carver would.
    """

    def __init__(
        self,
        moe: MoEModel,
        watermark: Watermark,
        tasks: Sequence[TaskData],
        config: WatermarkConfig = WatermarkConfig(),
        *,
        seed: int = 0,
    ) -> None:
        if moe.tokenizer is None:
            raise InputError(f"{moe.source}: the model has no tokenizer, so the triggers cannot be encoded; save one with it.")
        by_name = {task.name: task for task in tasks}
        missing = [name for name in watermark.record.task_names if name not in by_name]
        if missing:
            raise InputError(
                f"the watermark covers the tasks {watermark.record.task_names}, but no data was given for {missing}; "
                "train on every watermarked task."
            )
        self.moe = moe
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)
        self.limits = [LayerLimits.of(layer) for layer in moe.layers]
        self.keep_counts = [k for k in config.keep_counts if self._feasible(k)]
        if config.masked_passes and not self.keep_counts:
            raise InputError(
                f"none of the watermark keep counts {list(config.keep_counts)} is a proper expert subset this model can "
                f"route with (experts {moe.num_experts}, top-k {moe.top_k}); choose counts between top-k and the expert count."
            )
        triggers = watermark.triggers(count=max(config.triggers, watermark.record.triggers_per_task))
        self.task_names = watermark.record.task_names
        self.attribution_data = {
            name: by_name[name].head(config.attribution_examples) for name in self.task_names
        }
        self.all_triggers = self._stream(trigger_data(triggers), config.batch_size, seed)
        self.task_triggers = {
            name: self._stream(trigger_data([t for t in triggers if t.task == name], name), config.masked_batch_size, seed + 1 + i)
            for i, name in enumerate(self.task_names)
        }
        self.plans: dict[tuple[str, str, int], dict[int, list[int]]] = {}
        self.calls = 0
        self.next_task = 0

    def _feasible(self, count: int) -> bool:
        if count >= min(self.moe.num_experts):
            return False
        try:
            kept = uniform_keep(torch.zeros(len(self.limits), max(self.moe.num_experts)), self.limits, count)
            normalize_keep_sets(self.moe.layers, dict(enumerate(kept)), physical=False)
        except PlanError:
            return False
        return True

    def _stream(self, data: TaskData, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return batches(self.moe.tokenizer, data, batch_size=batch_size, shuffle=True, seed=seed, epochs=None)

    def refresh_plans(self) -> None:
        """Attribute every task's experts on the model as it is now, and take each criterion's top sets."""
        from moeguard.attribution import collect_attribution, scores

        attribution_log = logging.getLogger("moeguard.attribution")
        level = attribution_log.level
        attribution_log.setLevel(logging.WARNING)  # one refresh is one line, not one per task
        try:
            for name in self.task_names:
                attribution = collect_attribution(
                    self.moe, batches(self.moe.tokenizer, self.attribution_data[name], batch_size=32),
                    criteria=self.config.criteria, task=name, progress=False,
                )
                for criterion in self.config.criteria:
                    ranking = scores(attribution, criterion).float()
                    for count in self.keep_counts:
                        kept = uniform_keep(ranking, self.limits, count)
                        self.plans[(name, criterion, count)] = dict(enumerate(kept))
        finally:
            attribution_log.setLevel(level)
        log.debug("watermark: expert attributions refreshed at step %d", self.calls)

    def _draw(self, options: Sequence[Any]) -> Any:
        return options[int(torch.randint(len(options), (1,), generator=self.generator))]

    def keep_sets(self, task: str) -> dict[int, list[int]]:
        """A carve of ``task``: its top experts by a drawn criterion and keep count, sometimes one swapped per layer."""
        kept = self.plans[(task, self._draw(self.config.criteria), self._draw(self.keep_counts))]
        if float(torch.rand((), generator=self.generator)) >= self.config.near_top:
            return kept
        swapped = {layer: swap_one(experts, self.limits[layer].num_experts, self.generator) for layer, experts in kept.items()}
        try:
            normalize_keep_sets(self.moe.layers, swapped, physical=False)
        except PlanError:  # a group-limited router cannot route over the swapped set
            return kept
        return swapped

    def __call__(self) -> tuple[torch.Tensor, dict[str, float]]:
        """``(L_wm, {"watermark_full": ..., "watermark_masked": ...})`` for this step."""
        if self.config.masked_passes and self.calls % self.config.refresh_every == 0:
            self.refresh_plans()
        self.calls += 1
        full = lm_loss(self.moe, next(self.all_triggers))
        losses, masked = [full], []
        for _ in range(self.config.masked_passes):
            task = self.task_names[self.next_task % len(self.task_names)]
            self.next_task += 1
            with self.moe.mask_experts(self.keep_sets(task)):
                masked.append(lm_loss(self.moe, next(self.task_triggers[task])))
        losses += masked
        values = {"watermark_full": full.item()}
        if masked:
            values["watermark_masked"] = sum(m.item() for m in masked) / len(masked)
        return torch.stack(losses).mean(), values

