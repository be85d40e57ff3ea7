"""What a re-alignment run is asked to do and what it found: config, per-round records, result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import moeguard
from moeguard.errors import InputError
from moeguard.fields import setting
from moeguard.realign.acquisition import ACQUISITIONS
from moeguard.realign.metrics import Threshold, labels_to_reach
from moeguard.realign.pool import check_acquisition
from moeguard.realign.scopes import TRAIN_SCOPES, check_scope


def label_schedule(budget: int, seed_size: int, rounds: int) -> list[int]:
    """Labels used after each round: ``seed_size`` first, then ``budget - seed_size`` split as
    evenly as possible over the other ``rounds - 1`` rounds (earlier batches one larger),
    so the last entry is exactly ``budget``."""
    if rounds == 1:
        return [budget]
    extra, remainder = divmod(budget - seed_size, rounds - 1)
    schedule = [seed_size]
    for r in range(rounds - 1):
        schedule.append(schedule[-1] + extra + (1 if r < remainder else 0))
    return schedule


@dataclass
class RealignConfig:
    """How a re-alignment run labels and trains; the defaults are moeguard's one choice for each.

    ``batch_size`` is the global batch (split over processes). The audit and the defense
    evaluation nest one of these for their attacker (the evaluation with its own
    documented preset, see :class:`moeguard.defense.evaluation.DefenseEvalSettings`).
    """

    budget: int = setting(64, "pool examples that may be labelled")
    seed_size: int | None = setting(None, "random labels before the first round (default: budget / rounds)")
    rounds: int = setting(4, "fine-tuning rounds")
    acquisition: str = setting("entropy", "how the next examples are chosen", choices=ACQUISITIONS)
    scope: str = setting("all", "what is fine-tuned", choices=TRAIN_SCOPES)
    lr: float = setting(1e-3, "peak learning rate")
    steps_per_round: int = setting(25, "optimizer steps per round")
    batch_size: int = setting(8, "training batch size (global)")
    seed: int = setting(0, "seed of the seed set, the data order and the acquisition")
    lora_rank: int = setting(8, "LoRA rank with the lora scope")
    eval_batch_size: int = setting(64, "batch size of evaluation and pool scoring")
    target_retention: float = setting(0.9, "share of the unpruned accuracy the run must win back")

    @property
    def first_labels(self) -> int:
        return self.seed_size if self.seed_size is not None else math.ceil(self.budget / self.rounds)

    def schedule(self) -> list[int]:
        return label_schedule(self.budget, self.first_labels, self.rounds)

    def check(self, pool_size: int) -> None:
        """Refuse what cannot run, before any work starts."""
        check_acquisition(self.acquisition)
        check_scope(self.scope)
        for name in ("budget", "rounds", "steps_per_round", "batch_size", "lora_rank", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}.", arguments=(name,))
        if self.budget > pool_size:
            raise InputError(
                f"the label budget ({self.budget}) is larger than the pool ({pool_size} unlabelled examples); "
                "lower `budget` or give a larger pool (`pool_size`, or a larger `data` file).",
                arguments=("budget", "pool_size", "data"),
            )
        seed = self.first_labels
        if not isinstance(seed, int) or not 1 <= seed <= self.budget:
            raise InputError(f"the seed set size must be between 1 and the budget ({self.budget}), got {seed!r}.")
        if self.rounds == 1 and seed != self.budget:
            raise InputError(f"with one round the seed set is the whole budget: set seed_size={self.budget} or more "
                             "`rounds`.", arguments=("seed_size", "rounds"))
        if self.rounds > 1 and self.budget - seed < self.rounds - 1:
            raise InputError(
                f"{self.budget - seed} labels after the seed set cannot be spread over {self.rounds - 1} more rounds; "
                "raise `budget`, lower `seed_size` or use fewer `rounds`.", arguments=("budget", "seed_size", "rounds"),
            )
        if not self.lr > 0:
            raise InputError(f"`lr` must be positive, got {self.lr!r}.", arguments=("lr",))
        if not 0 < self.target_retention <= 1:
            raise InputError(f"`target_retention` must be in (0, 1], got {self.target_retention!r}.",
                             arguments=("target_retention",))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoundRecord:
    """The state of the run after one round (round 0: the pruned model before any training).

    ``accuracy`` is the target task's test score in its metric (:attr:`RealignResult.metric`;
    an accuracy, a ROUGE-L, a token loss), ``other_accuracy`` the other tasks' scores,
    ``retention`` and ``recovery`` measured as :mod:`moeguard.realign.metrics` says.
    ``steps``/``tokens``/``wall_seconds`` are cumulative; ``wall_seconds`` counts the
    attacker's work (acquisition + training), not the measurements.
    """

    round: int
    labels: int
    steps: int
    tokens: int
    wall_seconds: float
    accuracy: float
    retention: float
    recovery: float
    other_accuracy: dict[str, float]
    other_retention: float
    train_loss: float = math.nan
    train_seconds: float = 0.0
    acquire_seconds: float = 0.0

    TIMING = ("wall_seconds", "train_seconds", "acquire_seconds")


@dataclass
class RealignResult:
    """A finished (or loaded) re-alignment run; ``rounds[0]`` is the pruned model before training.

    Scores (``*_accuracy``) are in the target task's ``metric``; retention is measured from
    its no-knowledge ``reference_score`` (0, or the unigram loss of lm text).
    """

    task: str
    mode: str  # "pruned" (a pruned model directory) or "mask" (a keep set on the unpruned model)
    config: dict[str, Any]
    model_fingerprint: str
    kept: list[list[int]]
    unpruned_accuracy: float
    unpruned_other: dict[str, float]
    rounds: list[RoundRecord]
    labelled: list[int]
    frozen_verified: bool
    pool_size: int
    model_dir: str | None = None
    history_path: str | None = None
    complete: bool = True
    data_signature: str = ""  # RealignData.signature() of the pool, test set and other tasks
    metric: str = "exact_match"
    reference_score: float = 0.0
    higher_is_better: bool = True
    trained_rounds: int = 0  # rounds this call trained; the others were resumed (not saved in the history)

    @property
    def pruned_accuracy(self) -> float:
        return self.rounds[0].accuracy

    @property
    def final(self) -> RoundRecord:
        return self.rounds[-1]

    @property
    def threshold(self) -> Threshold:
        """Labels and steps to reach the target retention (90% by default)."""
        return labels_to_reach(
            [r.labels for r in self.rounds],
            [r.steps for r in self.rounds],
            [r.retention for r in self.rounds],
            self.config.get("target_retention", 0.9),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["trained_rounds"]
        data["threshold"] = asdict(self.threshold)
        data["pruned_accuracy"] = self.pruned_accuracy
        data["moeguard_version"] = moeguard.__version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RealignResult":
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["rounds"] = [RoundRecord(**r) for r in data["rounds"]]
        return cls(**values)

    def describe(self) -> str:
        final = self.final
        lines = [
            f"{self.task}: re-aligned with {self.config['acquisition']} acquisition, scope {self.config['scope']}, "
            f"{final.labels} labels in {len(self.rounds) - 1} rounds ({final.steps} steps, {final.tokens:,} tokens, "
            f"{final.wall_seconds:.1f}s)",
            f"  {self.metric}: unpruned {self.unpruned_accuracy:.3f}, pruned {self.pruned_accuracy:.3f}, "
            f"re-aligned {final.accuracy:.3f} (retention {final.retention:.3f}, recovery {final.recovery:.3f})",
        ]
        if final.other_accuracy:
            lines.append(f"  other tasks: retention {final.other_retention:.3f} of their unpruned accuracy")
        lines.append(f"  {self.threshold.describe()}")
        return "\n".join(lines)
