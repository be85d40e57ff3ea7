"""What an audit found, per task and per model: plain dataclasses that round-trip through JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from moeguard.realign.result import RealignResult


@dataclass
class RealignRun:
    """One re-alignment run of the best plan at one keep count, summarised.

    ``labels``/``steps``/``tokens``/``seconds`` are what it took to reach the target
    retention (None when it was not reached within ``budget`` labels).
    """

    keep: int
    criterion: str
    acquisition: str
    fraction_kept: float
    kept: list[list[int]]
    budget: int
    pruned_retention: float
    final_retention: float
    reached: bool
    labels: int | None
    steps: int | None
    tokens: int | None
    seconds: float | None
    curve: list[dict[str, float]]  # per round: labels, steps, retention, other_retention
    history: str  # the run's full history JSON

    @classmethod
    def of(cls, result: RealignResult, keep: int, criterion: str, fraction_kept: float, history: str) -> "RealignRun":
        threshold = result.threshold
        at = next((r for r in result.rounds if threshold.reached and r.labels == threshold.labels), None)
        return cls(
            keep=keep, criterion=criterion, acquisition=result.config["acquisition"], fraction_kept=fraction_kept,
            kept=[list(k) for k in result.kept],
            budget=result.config["budget"], pruned_retention=result.rounds[0].retention,
            final_retention=result.final.retention, reached=threshold.reached, labels=threshold.labels,
            steps=threshold.steps, tokens=at.tokens if at else None, seconds=at.wall_seconds if at else None,
            curve=[{"labels": r.labels, "steps": r.steps, "retention": r.retention, "other_retention": r.other_retention}
                   for r in result.rounds],
            history=history,
        )


@dataclass
class Compressed:
    """Parameters of the model an attacker carves out, against the full model."""

    total: int
    active_per_token: int
    full_total: int
    full_active_per_token: int

    @property
    def ratio(self) -> float:
        return self.full_total / self.total

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class TaskAudit:
    """The attack on one task of one model.

    ``full_accuracy`` is the full model's score in the task's ``metric`` (of task type
    ``kind``); retention is measured from ``reference`` (:mod:`moeguard.data.task_types`).
    ``fraction_without``: the smallest fraction of experts whose prune alone retains the
    target share (1.0: no prune in the sweep does). ``fraction_with``: the
    smallest fraction at which re-alignment reached the target within the budget
    (equal to ``fraction_without`` when no re-alignment beat it); ``cost`` is that run.
    """

    task: str
    source: str
    full_accuracy: float
    test_examples: int
    kind: str = "generate"
    metric: str = "exact_match"
    reference: float = 0.0
    higher_is_better: bool = True
    skipped: str | None = None
    keep_without: int | None = None
    criterion_without: str | None = None
    fraction_without: float = 1.0
    keep_with: int | None = None
    fraction_with: float = 1.0
    cost: RealignRun | None = None
    compressed: Compressed | None = None
    al_vs_random: dict[str, Any] | None = None
    sweep: list[dict[str, Any]] = field(default_factory=list)
    realign_runs: list[RealignRun] = field(default_factory=list)
    specialisation: dict[str, Any] | None = None
    forensics: dict[str, Any] | None = None
    headstart: dict[str, Any] | None = None  # the head start at the attacker's keep count (HeadStartResult summary)
    figures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compressed"] = self.compressed.to_dict() if self.compressed else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskAudit":
        values = dict(data)
        values["cost"] = RealignRun(**data["cost"]) if data.get("cost") else None
        compressed = data.get("compressed")
        values["compressed"] = Compressed(**{k: v for k, v in compressed.items() if k != "ratio"}) if compressed else None
        values["realign_runs"] = [RealignRun(**r) for r in data.get("realign_runs", [])]
        return cls(**values)


@dataclass
class ModelAudit:
    """Every task's attack on one model, with what the model is."""

    role: str  # "model" or "compare"
    source: str
    fingerprint: str
    model_type: str
    num_experts: list[int]
    top_k: list[int]
    parameters: dict[str, int]
    criteria: list[str]
    tasks: dict[str, TaskAudit]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Per stage, the units of work found in the stage cache ("reused": evaluations, attributions, sweep
    # points, re-alignment rounds, forensic checks) and those this run computed ("computed").
    work: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks"] = {name: task.to_dict() for name, task in self.tasks.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelAudit":
        values = dict(data)
        values["tasks"] = {name: TaskAudit.from_dict(task) for name, task in data["tasks"].items()}
        return cls(**values)


@dataclass
class DefenseComparison:
    """The defended model against the undefended one, per task.

    ``cost_multiplier`` = labels the attacker needs on the defended model / on the
    undefended one, both at the undefended attack's keep count (a lower bound, flagged
    ``censored``, when the defended attack did not reach the target within the budget);
    ``utility_cost`` = how much worse the defended full model scores (undefended - defended
    score; defended - undefended for a loss).
    """

    task: str
    keep: int | None
    undefended_labels: int | None
    defended_labels: int | None
    censored: bool
    cost_multiplier: float | None
    utility_cost: float
    fraction_without: tuple[float, float]
    fraction_with: tuple[float, float]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_multiplier"] = json_multiplier(self.cost_multiplier)
        return data

    def describe_multiplier(self, *, markup: bool = False) -> str:
        """``3.00x``, ``>=4.00x`` (a lower bound), ``inf`` (the undefended attack needed no labels) or ``-``."""
        if self.cost_multiplier is None:
            return "-"
        if math.isinf(self.cost_multiplier):
            return "&infin;" if markup else "inf"
        bound = ("&ge;" if markup else ">=") if self.censored else ""
        return f"{bound}{self.cost_multiplier:.2f}x"


def json_multiplier(value: float | None) -> float | str | None:
    """A multiplier as strict JSON: infinity becomes the string "inf"."""
    return "inf" if value is not None and math.isinf(value) else value
