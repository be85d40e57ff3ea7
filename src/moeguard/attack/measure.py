"""Measuring the carver's head start on one task at one keep count.

Two arms train on the same teacher-labelled data to the same target (``target_share``
of the full model's test accuracy), evaluated every few steps:

- scratch: a freshly initialised model of the carved architecture, its learning rate
  and loss tuned over ``scratch_lrs`` x ``losses``;
- carve: the strongest attacker of :mod:`moeguard.attack.carver`, tuned over
  ``selections`` x ``carve_lrs`` x ``losses`` x router re-initialisation x
  canonicalisation (tried only on a model it changes).

Each arm is tuned on ``tuning_seeds`` (:mod:`moeguard.attack.tuning`) and its chosen
configuration is run on the fresh ``report_seeds``; the head start and its bootstrap
interval come from those runs only (:func:`moeguard.attack.headstart.head_start`).
Every run is saved in its own directory under ``out`` and resumes.

A bounded measurement (``scratch_compute_multiple`` M) runs the carve arm first and
stops every run from scratch once its training compute reaches M times the carve's
mean compute to the target: a scratch run stopped there shows ``H >= M`` (its cost
counts at what it spent, at least M x C_carve), which is all a question like "does the
carve save more than M x the compute?" needs, at a fraction of the scratch arm's cost.
When some carve run did not reach the target the bound is not applied.

The scratch arm does not depend on the model under attack except through its answers
and its accuracy; to compare defenses at a fraction of the cost, the arm measured on
one model (the undefended one) can be given for another (``scratch=``): its curves are
then read at this model's target, and a target above the one they stopped at counts
as not reached.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeguard.attack.canonical import blind_coordinates
from moeguard.attack.carver import AttackTask, carve_and_realign, labelled_pool
from moeguard.attack.curves import LOSSES, Curve, CurveSchedule, train_curve
from moeguard.attack.headstart import UNITS, HeadStart, RunCost, head_start
from moeguard.attack.selection import SELECTIONS, Selection, random_keep, select_experts
from moeguard.attack.students import carved_architecture, scratch_student
from moeguard.attack.tuning import STRATEGIES, Configuration, Outcome, Tuning, configuration_label, tune
from moeguard.errors import InputError
from moeguard.eval import evaluate
from moeguard.fields import setting
from moeguard.models import MoEModel
from moeguard.realign.scopes import TRAIN_SCOPES, check_scope
from moeguard.realign.state import derive_seed
from moeguard.runs import Run

log = logging.getLogger("moeguard.attack")


@dataclass
class HeadStartSettings:
    """The head start: the strongest carve-and-re-align attacker against training from scratch (one task, one keep)."""

    selections: tuple[str, ...] = setting(("search", "attribution", "random"), "expert selections the carver tries",
                                          choices=SELECTIONS)
    carve_lrs: tuple[float, ...] = setting((3e-3, 1e-3, 1e-2), "learning rates the carver tries")
    scratch_lrs: tuple[float, ...] = setting((3e-3, 1e-3, 1e-2), "learning rates of training from scratch")
    losses: tuple[str, ...] = setting(("logits", "answers", "hidden"), "distillation losses tried (answers: the teacher's "
                                      "answers; logits: and its answer-token distribution; hidden: and every decoder "
                                      "layer's output)", choices=LOSSES)
    try_router_reinit: bool = setting(True, "the carver also tries fresh routers")
    try_canonicalise: bool = setting(True, "the carver also canonicalises a model whose structure hides something "
                                     "(blind coordinates in the first MoE layer)")
    carve_scope: str = setting("all", "what the carver trains", choices=TRAIN_SCOPES)
    carve_steps: int = setting(1500, "step cap of a carve run (not reaching the target by then: censored)")
    scratch_steps: int = setting(3000, "step cap of a run from scratch (censored beyond)")
    scratch_compute_multiple: float | None = setting(
        None, "stop a run from scratch once its compute reaches this multiple of the carve's compute to the target "
        "(the head start is then reported as at least that multiple); none: run to scratch_steps")
    student_batch: int = setting(32, "training batch of both arms")
    warmup_steps: int = setting(20, "linear warm-up steps, then a constant learning rate")
    evaluate_every: int = setting(25, "steps between two test evaluations of a curve")
    tuning: str = setting("coordinate", "how configurations are searched on the tuning seeds", choices=STRATEGIES)
    tuning_seeds: tuple[int, ...] = setting((1000, 1001), "seeds the configurations are chosen on")
    report_seeds: tuple[int, ...] = setting((0, 1, 2, 3, 4), "fresh seeds the chosen configurations are reported on")
    target_share: float = setting(0.9, "share of the full model's test accuracy both arms must reach")
    selection_examples: int = setting(64, "teacher-labelled examples the expert selection measures")
    curve_test_size: int = setting(200, "test examples of every curve evaluation")
    unit: str = setting("flops", "the compute unit configurations are chosen by", choices=UNITS)
    resamples: int = setting(4000, "bootstrap resamples of the head start's interval")

    def schedule(self) -> CurveSchedule:
        return CurveSchedule(batch_size=self.student_batch, warmup=self.warmup_steps, evaluate_every=self.evaluate_every,
                             eval_batch_size=min(self.curve_test_size, 256))

    def carve_grid(self, moe: MoEModel) -> dict[str, tuple]:
        canonical = self.try_canonicalise and len(blind_coordinates(moe)) > 0
        return {"selection": self.selections, "lr": self.carve_lrs, "loss": self.losses,
                "router_reinit": (False, True) if self.try_router_reinit else (False,),
                "canonicalise": (False, True) if canonical else (False,)}

    def scratch_grid(self) -> dict[str, tuple]:
        return {"lr": self.scratch_lrs, "loss": self.losses}

    def prompts_needed(self) -> int:
        """Teacher-labelled prompts a run may consume: enough that no run sees an example twice (the same pool for
        both arms, whether or not the scratch arm is measured, so that the data order never depends on it)."""
        return max(self.carve_steps, self.scratch_steps) * self.student_batch

    def check(self) -> None:
        """Refuse what cannot run, before any work starts."""
        self.schedule().check()
        for name in ("carve_steps", "scratch_steps", "selection_examples", "curve_test_size", "resamples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}.", arguments=(name,))
        for name in ("selections", "carve_lrs", "scratch_lrs", "losses", "report_seeds"):
            if not getattr(self, name):
                raise InputError(f"`{name}` needs at least one value.", arguments=(name,))
        for selection in self.selections:
            if selection not in SELECTIONS:
                raise InputError(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}.",
                                 arguments=("selections",))
        for loss in self.losses:
            if loss not in LOSSES:
                raise InputError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}.", arguments=("losses",))
        if any(not lr > 0 for lr in (*self.carve_lrs, *self.scratch_lrs)):
            raise InputError("learning rates must be positive.", arguments=("carve_lrs", "scratch_lrs"))
        check_scope(self.carve_scope)
        if TRAIN_SCOPES[self.carve_scope].parameters is None:
            raise InputError(f"carve_scope={self.carve_scope} is not supported here; choose router, experts, attention "
                             "or all.", arguments=("carve_scope",))
        shared = sorted(set(self.tuning_seeds) & set(self.report_seeds))
        if shared:
            raise InputError(f"seeds {shared} are both tuning and report seeds; the configuration must be chosen on seeds "
                             "it is not reported on.", arguments=("tuning_seeds", "report_seeds"))
        if self.tuning not in STRATEGIES:
            raise InputError(f"unknown tuning {self.tuning!r}; choose from {', '.join(STRATEGIES)}.", arguments=("tuning",))
        multiple = self.scratch_compute_multiple
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, (int, float))
                                     or not multiple >= 1):
            raise InputError(f"`scratch_compute_multiple` must be 1 or more (or none), got {multiple!r}.",
                             arguments=("scratch_compute_multiple",))
        if not 0 < self.target_share <= 1:
            raise InputError(f"`target_share` must be in (0, 1], got {self.target_share!r}.", arguments=("target_share",))
        if self.unit not in UNITS:
            raise InputError(f"unknown unit {self.unit!r}; choose from {', '.join(UNITS)}.", arguments=("unit",))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["scratch_compute_multiple"] is None:
            # An unbounded measurement keeps the identity it had before the bound existed (its runs stay valid).
            del data["scratch_compute_multiple"]
        return data


@dataclass
class ArmResult:
    """One arm: its tuning on the tuning seeds, the chosen configuration, and its runs on the report seeds."""

    arm: str
    tuning: Tuning
    curves: list[Curve]
    selections: dict[str, Selection] = field(default_factory=dict)  # carve: per report seed, the experts kept

    @property
    def chosen(self) -> Configuration:
        return self.tuning.chosen

    def costs(self, target: float | None = None) -> list[RunCost]:
        return [curve.cost(target) for curve in self.curves]

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "chosen": configuration_label(self.chosen),
            "configuration": self.chosen,
            "tuning": self.tuning.to_dict(),
            "curves": [c.to_dict() for c in self.curves],
            "selections": {seed: s.to_dict() for seed, s in self.selections.items()},
        }


@dataclass
class HeadStartResult:
    """The head start of one task at one keep count, in every unit, and everything it was computed from."""

    task: str
    keep: int
    model_fingerprint: str
    full_accuracy: float
    target: float
    scratch: ArmResult
    carve: ArmResult
    head_start: dict[str, HeadStart]
    scratch_shared: bool = False  # the scratch arm was measured on another model and read at this target
    parameters: dict[str, int] = field(default_factory=dict)
    # The scratch arm ran with a compute cap of this multiple of the carve's compute (None: to its step cap only).
    scratch_compute_multiple: float | None = None

    @property
    def stopped_by_compute(self) -> bool:
        """Whether some scratch run was stopped at the compute cap (H is then at least the multiple)."""
        return any(curve.stopped_by_compute for curve in self.scratch.curves)

    def bound_note(self) -> str:
        """What stopped the scratch runs short of the target, for a ``>=`` head start."""
        if self.stopped_by_compute:
            return f"scratch stopped at {self.scratch_compute_multiple:g}x the carve's compute"
        if not all(cost.reached for cost in self.scratch.costs(self.target)):
            return f"scratch did not reach the target in {max(c.max_steps for c in self.scratch.curves)} steps"
        return ""

    def describe(self) -> str:
        flops = self.head_start["flops"]
        note = self.bound_note()
        return (f"{self.task} keep {self.keep}: head start H = {flops.describe()} (FLOPs"
                f"{'; ' + note if note else ''}), "
                f"{self.head_start['tokens'].describe()} (training tokens); carve "
                f"{configuration_label(self.carve.chosen)}, scratch {configuration_label(self.scratch.chosen)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "keep": self.keep, "model_fingerprint": self.model_fingerprint,
            "full_accuracy": self.full_accuracy, "target": self.target, "scratch_shared": self.scratch_shared,
            "parameters": self.parameters, "scratch_compute_multiple": self.scratch_compute_multiple,
            "stopped_by_compute": self.stopped_by_compute,
            "head_start": {u: h.to_dict() for u, h in self.head_start.items()},
            "scratch": self.scratch.to_dict(), "carve": self.carve.to_dict(),
        }


class _Measurement:
    """The shared state of one measurement: the run directory, the data and the cached selections."""

    def __init__(self, moe: MoEModel, task: AttackTask, keep: int, settings: HeadStartSettings, run: Run,
                 data: Any, target: float, full: float, progress: bool) -> None:
        self.moe, self.task, self.keep, self.settings, self.run = moe, task, keep, settings, run
        self.data, self.target, self.full, self.progress = data, target, full, progress
        self.schedule = settings.schedule()
        self.search_data = data.head(settings.selection_examples)
        self.scratch_max_flops: float | None = None  # the bounded measurement's compute cap of the scratch runs

    def selection(self, method: str, seed: int) -> Selection:
        """The experts ``method`` keeps (random: drawn from the seed), computed once and saved."""
        name = f"selections/{method}" + (f"-seed{seed}" if method == "random" else "") + ".json"
        value = self.run.get_or_compute(name, lambda: select_experts(
            self.moe, method, self.keep, search_data=self.search_data, seed=derive_seed(seed, "selection"),
            progress=self.progress).to_dict())
        return Selection(**value)

    def carve_curve(self, configuration: Configuration, seed: int, role: str) -> Curve:
        selection = self.selection(configuration["selection"], seed)
        return carve_and_realign(
            self.moe, self.data, self.task.test.head(self.settings.curve_test_size), self.keep, configuration, seed=seed,
            target=self.target, max_steps=self.settings.carve_steps, schedule=self.schedule,
            scope=self.settings.carve_scope, selection=selection,
            out=self.run.path / "carve" / role / configuration_label(configuration).replace("/", ",") / f"seed{seed}",
            progress=self.progress,
        ).curve

    def scratch_curve(self, configuration: Configuration, seed: int, role: str) -> Curve:
        architecture = carved_architecture(self.moe, self.keep)
        student = scratch_student(architecture, seed)
        return train_curve(
            student, self.moe, self.data, self.task.test.head(self.settings.curve_test_size), target=self.target,
            lr=configuration["lr"], loss=configuration["loss"], seed=seed, max_steps=self.settings.scratch_steps,
            max_flops=self.scratch_max_flops, schedule=self.schedule, arm="scratch",
            configuration=configuration_label(configuration),
            out=self.run.path / "scratch" / role / configuration_label(configuration).replace("/", ",") / f"seed{seed}",
            progress=self.progress,
        )

    def tune(self, name: str) -> Tuning:
        """The configuration of arm ``name`` (carve or scratch), chosen on the tuning seeds only."""
        settings = self.settings
        grid = settings.carve_grid(self.moe) if name == "carve" else settings.scratch_grid()

        def measure(configuration: Configuration, seed: int) -> Outcome:
            curve = self.curve(name, configuration, seed, "tuning")
            cost = curve.cost()
            return Outcome(cost.reached, cost.value(settings.unit), curve.final_accuracy)

        tuning = tune(grid, measure, settings.tuning_seeds, strategy=settings.tuning)
        log.info("[%s keep %d] %s arm: chose %s on tuning seeds %s", self.task.name, self.keep, name,
                 configuration_label(tuning.chosen), list(settings.tuning_seeds))
        return tuning

    def curve(self, name: str, configuration: Configuration, seed: int, role: str) -> Curve:
        return (self.carve_curve if name == "carve" else self.scratch_curve)(configuration, seed, role)

    def arm(self, name: str) -> ArmResult:
        """The arm tuned on the tuning seeds, then run on the report seeds."""
        tuning = self.tune(name)
        seeds = self.settings.report_seeds
        curves = [self.curve(name, tuning.chosen, seed, "report") for seed in seeds]
        selections = {seed: self.selection(tuning.chosen["selection"], seed) for seed in seeds} if name == "carve" else {}
        return ArmResult(name, tuning, curves, selections)


def _measurement(moe: MoEModel, task: AttackTask, keep: int, settings: HeadStartSettings, out: str | Path, kind: str,
                 identity: dict[str, Any], progress: bool) -> _Measurement:
    """Check the inputs, open the run, measure the full model and label the data: what both entry points share."""
    settings.check()
    task.check()
    if moe.tokenizer is None:
        raise InputError(f"{moe.source}: the model has no tokenizer; the head start needs one to label and score the task.")
    run = Run.open(out, kind, {"model_fingerprint": moe.fingerprint(), "task": task.name, "data": task.signature(),
                               "keep": keep, "settings": settings.to_dict(), **identity},
                   labels={"model_fingerprint": "model weights", "settings": "head-start settings"})
    test = task.test.head(settings.curve_test_size)
    full = run.get_or_compute("full_accuracy.json", lambda: evaluate(moe, None, test, batch_size=256).value)
    target = settings.target_share * full
    data = labelled_pool(moe, task.prompts, settings.prompts_needed(), run)
    log.info("[%s keep %d] full accuracy %.3f, target %.3f; %d teacher-labelled prompts", task.name, keep, full, target,
             len(data))
    return _Measurement(moe, task, keep, settings, run, data, target, full, progress)


def tune_attacker(moe: MoEModel, task: AttackTask, keep: int, settings: HeadStartSettings = HeadStartSettings(), *,
                  out: str | Path, progress: bool = False) -> Tuning:
    """The strongest carve configuration for ``task`` at ``keep`` (``Tuning.chosen``), chosen on the tuning seeds as
    :func:`measure_head_start` chooses it, without the scratch arm or the report seeds. Resumes from ``out``."""
    return _measurement(moe, task, keep, settings, out, "attacker tuning", {}, progress).tune("carve")


def scratch_compute_cap(carve_costs: list[RunCost], multiple: float) -> float | None:
    """``multiple x mean C_carve`` (FLOPs): the training compute a bounded scratch run stops at; None when some carve
    run was censored (its cost is then only a lower bound, and so would the cap be)."""
    if not carve_costs or not all(cost.reached for cost in carve_costs):
        return None
    return multiple * sum(cost.flops for cost in carve_costs) / len(carve_costs)


def carve_keep_sets(moe: MoEModel, result: HeadStartResult, keep: int, seed: int) -> dict[int, list[int]]:
    """The experts the head start's chosen carve keeps for ``seed`` (random selections differ by seed)."""
    method = result.carve.chosen["selection"]
    if method != "random" and result.carve.selections:
        return next(iter(result.carve.selections.values())).keep_sets()
    return dict(enumerate(random_keep(moe, keep, derive_seed(seed, "selection"))))


def measure_head_start(
    moe: MoEModel,
    task: AttackTask,
    keep: int,
    settings: HeadStartSettings = HeadStartSettings(),
    *,
    out: str | Path,
    scratch: ArmResult | None = None,
    progress: bool = False,
) -> HeadStartResult:
    """The head start of carving ``moe`` to ``keep`` experts per layer for ``task`` (see the module docstring).

    ``scratch`` reuses a scratch arm measured on another model of the same architecture.
    Everything is saved under ``out`` and an interrupted measurement resumes, only with
    the same model, task and settings.
    """
    measurement = _measurement(moe, task, keep, settings, out, "head start", {"shared_scratch": scratch is not None},
                               progress)
    target, full = measurement.target, measurement.full
    multiple = settings.scratch_compute_multiple if scratch is None else None
    if multiple is None:
        scratch_arm = scratch if scratch is not None else measurement.arm("scratch")
        carve_arm = measurement.arm("carve")
    else:
        carve_arm = measurement.arm("carve")
        measurement.scratch_max_flops = scratch_compute_cap(carve_arm.costs(target), multiple)
        if measurement.scratch_max_flops is None:
            multiple = None
            log.info("[%s keep %d] a carve run did not reach the target: the scratch arm runs to its step cap",
                     task.name, keep)
        scratch_arm = measurement.arm("scratch")
    scratch_costs, carve_costs = scratch_arm.costs(target), carve_arm.costs(target)
    result = HeadStartResult(
        task=task.name, keep=keep, model_fingerprint=moe.fingerprint(), full_accuracy=full, target=target,
        scratch=scratch_arm, carve=carve_arm,
        head_start={unit: head_start(scratch_costs, carve_costs, unit, resamples=settings.resamples) for unit in UNITS},
        scratch_shared=scratch is not None,
        parameters={"full_active": moe.parameter_counts().active_per_token,
                    "carved_total": carved_architecture(moe, keep).parameter_counts().total},
        scratch_compute_multiple=multiple,
    )
    log.info("%s", result.describe())
    return result
