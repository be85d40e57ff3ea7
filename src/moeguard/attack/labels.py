"""Labels to the target: the paper's regime, where the attacker has only the labels it pays for.

The carve is the one the head start's attacker chose (the same experts); the attacker
re-aligns it with :func:`moeguard.realign.realign` (mask mode: the model under attack
is restored afterwards) and is tuned over the acquisition function (the best we have:
sequence NLL and BADGE), the optimizer steps per round (compute decoupled from labels)
and the learning rate, on the tuning seeds; the chosen configuration is reported on the
fresh seeds. A run's cost is the labels at the first round that reaches the target
retention; a run that never does counts its whole budget and is flagged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moeguard.attack.tuning import STRATEGIES, Configuration, Outcome, Tuning, configuration_label, tune
from moeguard.errors import InputError, TrainingDivergedError
from moeguard.fields import setting
from moeguard.models import MoEModel
from moeguard.realign import RealignConfig, RealignData, realign
from moeguard.realign.acquisition import ACQUISITIONS

log = logging.getLogger("moeguard.attack")

# The base of every label-paying run: a budget resolved in 32-label rounds, batch 16, everything trained.
LABEL_ATTACKER = RealignConfig(budget=256, rounds=8, steps_per_round=15, batch_size=16, acquisition="sequence_nll")


@dataclass
class LabelSettings:
    """The grid of the label-paying attacker (the rest of each run is ``LABEL_ATTACKER``)."""

    acquisitions: tuple[str, ...] = setting(("sequence_nll", "badge"), "acquisition functions the attacker tries",
                                            choices=ACQUISITIONS)
    round_steps: tuple[int, ...] = setting((15, 45), "optimizer steps per round the attacker tries")
    label_lrs: tuple[float, ...] = setting((1e-3, 3e-3), "learning rates the label-paying attacker tries")
    label_tuning_seeds: tuple[int, ...] = setting((1000,), "seeds the label-paying attacker is tuned on (each of its runs "
                                                  "costs acquisition passes over the pool, so fewer than the head start's)")

    def grid(self) -> dict[str, tuple]:
        return {"acquisition": self.acquisitions, "steps_per_round": self.round_steps, "lr": self.label_lrs}

    def check(self, report_seeds: tuple[int, ...] = ()) -> None:
        shared = sorted(set(self.label_tuning_seeds) & set(report_seeds))
        if shared:
            raise InputError(f"seeds {shared} are both tuning and report seeds of the label-paying attacker.",
                             arguments=("label_tuning_seeds", "report_seeds"))
        for name, values in self.grid().items():
            if not values:
                raise InputError(f"the label-paying attacker needs at least one {name}.", arguments=(name,))
        for acquisition in self.acquisitions:
            if acquisition not in ACQUISITIONS:
                raise InputError(f"unknown acquisition {acquisition!r}; choose from {', '.join(ACQUISITIONS)}.",
                                 arguments=("acquisitions",))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LabelRun:
    seed: int
    reached: bool
    labels: int  # to the target, or the budget when not reached
    steps: int | None
    final_retention: float


@dataclass
class LabelsResult:
    """The chosen configuration (tuned on the tuning seeds) and its runs on the report seeds."""

    tuning: Tuning
    runs: list[LabelRun] = field(default_factory=list)
    budget: int = 0

    @property
    def labels(self) -> list[float]:
        return [float(r.labels) for r in self.runs]

    @property
    def censored(self) -> bool:
        return not all(r.reached for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": configuration_label(self.tuning.chosen), "configuration": self.tuning.chosen,
                "tuning": self.tuning.to_dict(), "runs": [asdict(r) for r in self.runs], "budget": self.budget,
                "censored": self.censored}


def measure_labels_to_target(
    moe: MoEModel,
    data: RealignData,
    keep_sets: Callable[[int], dict[int, list[int]]],
    settings: LabelSettings,
    *,
    report_seeds: tuple[int, ...],
    out: str | Path,
    base: RealignConfig = LABEL_ATTACKER,
    strategy: str = "coordinate",
    target_retention: float = 0.9,
) -> LabelsResult:
    """Labels to ``target_retention`` of ``moe``'s own accuracy, for the experts ``keep_sets(seed)`` (see the module
    docstring); every run is saved under ``out`` and resumes."""
    settings.check(report_seeds)
    if strategy not in STRATEGIES:
        raise InputError(f"unknown tuning {strategy!r}; choose from {', '.join(STRATEGIES)}.", arguments=("tuning",))
    base = replace(base, target_retention=target_retention)
    base.check(len(data.pool))
    out = Path(out)

    def run(configuration: Configuration, seed: int, role: str) -> LabelRun:
        config = replace(base, seed=seed, **configuration)
        directory = out / role / configuration_label(configuration).replace("/", ",") / f"seed{seed}"
        try:
            result = realign(moe, data, config, keep=keep_sets(seed), out=directory, resume=True, progress=False)
        except TrainingDivergedError:
            log.info("label-paying attack %s seed %d diverged: not reached", configuration_label(configuration), seed)
            return LabelRun(seed, False, config.budget, None, 0.0)
        threshold = result.threshold
        labels = threshold.labels if threshold.reached else config.budget
        return LabelRun(seed, threshold.reached, labels, threshold.steps, result.final.retention)

    def measure(configuration: Configuration, seed: int) -> Outcome:
        outcome = run(configuration, seed, "tuning")
        return Outcome(outcome.reached, float(outcome.labels), outcome.final_retention)

    tuning = tune(settings.grid(), measure, settings.label_tuning_seeds, strategy=strategy)
    runs = [run(tuning.chosen, seed, "report") for seed in report_seeds]
    log.info("labels to target with %s: %s", configuration_label(tuning.chosen),
             ", ".join(str(r.labels) + ("" if r.reached else "+") for r in runs))
    return LabelsResult(tuning, runs, base.budget)
