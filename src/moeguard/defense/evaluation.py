"""The evaluation that decides whether a defense works: every model, same data, same attacker.

For each model (the undefended one first, then the defended ones):

1. utility and knowledge loss: :func:`moeguard.pruning.run_sweep` of each target task
   on the model itself (attribution on the model under attack, every criterion, the
   knowledge-loss keep counts); the full model's accuracy on every task is the utility;
2. the carver's head start at each target task and attack keep count
   (:func:`moeguard.attack.measure_head_start`): the strongest carve-and-re-align
   attacker against a fresh model of the carved architecture, both trained on the
   model's own answers to the same target, tuned on tuning seeds and reported on fresh
   seeds, ``H = C_scratch / C_carve`` with a bootstrap interval. By default the scratch
   arm is measured once, on the undefended model, and read at each defended model's
   target (``scratch_reference``; a fresh model learns from the answers alone, which
   the defenses barely change);
3. labels to the target in the paper's regime (:func:`moeguard.attack.labels.measure_labels_to_target`)
   for the same carve: the label-paying attacker's best acquisition, steps per round
   and learning rate, and the label multiplier against the undefended model;
4. authorised use: a fine-tune of the protocol's permitted groups on a task none of
   the models has seen, and the verifier's verdict on it.

Every unit of work (a sweep point, a training curve, a re-alignment run, the authorised
fine-tune) is saved when it finishes under ``out/runs/<model>/``; a rerun with the same
settings and models skips what is done, so the evaluation can be stopped and continued
at will (other settings, or another model under a name already evaluated, are refused:
:class:`moeguard.runs.Run`). Models are loaded one at a time. The result is returned;
its tables and figures are written by :func:`moeguard.defense.report.write_report`.
"""

from __future__ import annotations

import copy
import gc
import logging
import random
import string
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeguard.attack import AttackTask, HeadStartResult, HeadStartSettings, measure_head_start
from moeguard.attack.headstart import Interval, bootstrap_ratio_interval, censoring_bound, describe_ratio
from moeguard.attack.labels import LABEL_ATTACKER, LabelSettings, LabelsResult, measure_labels_to_target
from moeguard.attack.measure import carve_keep_sets
from moeguard.attack.teacher import TEACHER_KINDS
from moeguard.attribution.scores import CRITERIA, check_criterion
from moeguard.data import BUILTIN_TASKS, Example, TaskData, batches
from moeguard.data.batching import context_length
from moeguard.defense.costs import cost_multiplier
from moeguard.defense.parameter_groups import check_group_names, group_parameters
from moeguard.defense.protocol import make_protocol
from moeguard.defense.verify import verify_fine_tune
from moeguard.errors import InputError
from moeguard.eval import evaluate
from moeguard.fields import setting
from moeguard.io import check_output
from moeguard.models import MoEModel
from moeguard.models.options import LoadOptions
from moeguard.pruning.sweep import SweepResult, run_sweep
from moeguard.realign import RealignConfig, builtin_data
from moeguard.runs import Run
from moeguard.training import train

log = logging.getLogger("moeguard.defense")

EVALUATION_FORMAT = 2


@dataclass
class DefenseEvalSettings:
    """The shared data, attacker and budgets of an evaluation (every model gets exactly these)."""

    target_tasks: tuple[str, ...] = setting(("reverse", "count"), "the attacker's tasks (built-in)", choices=BUILTIN_TASKS)
    tasks: tuple[str, ...] = setting(("addition", "reverse", "sort", "caesar", "upper", "count"),
                                     "tasks whose utility is measured", choices=BUILTIN_TASKS)
    keeps: tuple[int, ...] = setting((6, 4, 2), "keep counts of the knowledge loss")
    attack_keeps: tuple[int, ...] = setting((4, 2), "keep counts the attacker carves to (head start and labels)")
    criteria: tuple[str, ...] = setting(("frequency", "reap", "ablation"), "attribution criteria of the knowledge loss",
                                        choices=CRITERIA)
    headstart: HeadStartSettings = field(default_factory=HeadStartSettings,
                                         metadata={"help": "the head start's attacker and baseline"})
    scratch_reference: bool = setting(True, "measure training from scratch on the first (undefended) model only and "
                                      "read it at every model's target")
    label_regime: bool = setting(True, "also measure labels to the target (the attacker pays for labels)")
    labels: LabelSettings = field(default_factory=LabelSettings, metadata={"help": "the label-paying attacker's grid"})
    attack: RealignConfig = field(default_factory=lambda: LABEL_ATTACKER,
                                  metadata={"help": "each label-paying re-alignment run (its grid axes replaced)"})
    pool_size: int = setting(512, "pool examples of the label-paying attacker")
    test_size: int = setting(100, "test examples per task (utility, knowledge loss, labels)")
    attribution_samples: int = setting(256, "training examples the knowledge-loss attribution is computed on")
    permitted: tuple[str, ...] = setting(("router", "attention"), "groups the authorised fine-tune trains")
    authorised_steps: int = setting(150, "steps of the authorised fine-tune")
    authorised_lr: float = setting(3e-3, "learning rate of the authorised fine-tune")
    authorised_examples: int = setting(2000, "training examples of the authorised fine-tune")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        missing = [task for task in self.target_tasks if task not in self.tasks]
        if not self.target_tasks or missing:
            raise InputError(f"the target tasks {list(self.target_tasks)} must be among the evaluated tasks "
                             f"{list(self.tasks)}.", arguments=("target_tasks", "tasks"))
        if not self.attack_keeps or any(not isinstance(k, int) or k < 1 for k in self.attack_keeps):
            raise InputError(f"`attack_keeps` must list positive keep counts, got {list(self.attack_keeps)}.",
                             arguments=("attack_keeps",))
        if not self.keeps:
            raise InputError("`keeps` needs at least one keep count.", arguments=("keeps",))
        for criterion in self.criteria:
            check_criterion(criterion)
        self.headstart.check()
        self.labels.check(self.headstart.report_seeds)
        self.attack.check(pool_size=self.pool_size)
        check_group_names(self.permitted, what="permitted group")


# ---------------------------------------------------------------- the authorised-use task
AUTHORISED_TASK = "double"


def authorised_task(split: str, size: int, seed: int = 0) -> TaskData:
    """A task outside the built-in suite, so no model has seen it: write every letter twice.

    ``"dbl abc=" -> "aabbcc"``; train and test prompts come from disjoint random
    streams and never share a word.
    """
    rng = random.Random(f"moeguard:{AUTHORISED_TASK}:{split}:{seed}")
    other = random.Random(f"moeguard:{AUTHORISED_TASK}:{'test' if split == 'train' else 'train'}:{seed}")
    excluded = {"".join(other.choice(string.ascii_lowercase) for _ in range(other.randint(3, 6))) for _ in range(size)}
    examples, seen = [], set()
    while len(examples) < size:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word in seen or word in excluded:
            continue
        seen.add(word)
        examples.append(Example(prompt=f"dbl {word}=", answer="".join(c + c for c in word)))
    return TaskData(AUTHORISED_TASK, "generate", examples, f"defense-eval:{AUTHORISED_TASK}:{split}:seed{seed}")


# ---------------------------------------------------------------- results
def attack_key(task: str, keep: int) -> str:
    return f"{task}/keep{keep}"


@dataclass
class ModelEvaluation:
    """Everything measured on one model; ``headstart`` and ``labels`` are keyed by :func:`attack_key`."""

    name: str
    source: str | None
    fingerprint: str
    utility: dict[str, float]  # each task's score in its metric (scoring)
    knowledge: dict[str, dict[str, dict[str, float]]]  # task -> criterion -> {keep: accuracy retained}
    best_knowledge: dict[str, dict[str, float]]  # task -> keep -> accuracy retained by the best criterion
    headstart: dict[str, HeadStartResult] = field(default_factory=dict)
    labels: dict[str, LabelsResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # attack key -> why it was not attacked
    authorised: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    scoring: dict[str, dict[str, Any]] = field(default_factory=dict)  # how each task is scored (SweepResult.scoring)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "fingerprint": self.fingerprint, "utility": self.utility,
            "knowledge": self.knowledge, "best_knowledge": self.best_knowledge,
            "headstart": {key: result.to_dict() for key, result in self.headstart.items()},
            "labels": {key: result.to_dict() for key, result in self.labels.items()},
            "skipped": self.skipped, "authorised": self.authorised, "seconds": self.seconds, "scoring": self.scoring,
        }


@dataclass
class LabelMultiplier:
    """Mean labels to the target on a defended model over those on the undefended one, with a bootstrap interval;
    ``bound`` as for the head start (``lower`` when defended runs did not reach the target)."""

    value: float
    interval: Interval
    bound: str

    def describe(self) -> str:
        return describe_ratio(self.value, self.interval, self.bound, "x")

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "interval": [self.interval.low, self.interval.high], "bound": self.bound}


@dataclass
class DefenseEvaluation:
    """The models side by side; ``models[0]`` is the undefended baseline."""

    settings: dict[str, Any]
    models: list[ModelEvaluation]
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def baseline(self) -> ModelEvaluation:
        return self.models[0]

    def utility_loss(self, model: ModelEvaluation) -> float:
        """The largest score drop of ``model`` against the baseline over the utility tasks scored higher-is-better
        (points, >= 0 means lost; a language-modelling loss is left out)."""
        scored = [t for t in model.utility if self.baseline.scoring.get(t, {}).get("higher_is_better", True)]
        return max((100 * (self.baseline.utility[t] - model.utility[t]) for t in scored), default=0.0)

    def label_multiplier(self, model: ModelEvaluation, key: str) -> LabelMultiplier | None:
        mine, base = model.labels.get(key), self.baseline.labels.get(key)
        if mine is None or base is None or not mine.runs or not base.runs:
            return None
        value = cost_multiplier(sum(mine.labels) / len(mine.labels), sum(base.labels) / len(base.labels))
        # Pruning alone kept the task on the undefended model (no label needed): there is no spread to resample.
        interval = bootstrap_ratio_interval(mine.labels, base.labels) if any(base.labels) else Interval(value, value)
        return LabelMultiplier(value, interval, censoring_bound(mine.censored, base.censored))

    def to_dict(self) -> dict[str, Any]:
        models = []
        for model in self.models:
            data = model.to_dict()
            data["utility_loss_points"] = self.utility_loss(model)
            data["label_multipliers"] = {key: m.to_dict() for key in model.labels
                                         if (m := self.label_multiplier(model, key)) is not None}
            models.append(data)
        return {"format": EVALUATION_FORMAT, "settings": self.settings, "models": models, "figures": self.figures}


# ---------------------------------------------------------------- one model
def _sweep(moe: MoEModel, task: str, settings: DefenseEvalSettings, out: Path, progress: bool) -> SweepResult:
    from moeguard.data import load_task

    return run_sweep(
        moe, task, out_dir=out / "sweep" / task, criteria=settings.criteria, keeps=list(settings.keeps),
        other_tasks=[t for t in settings.tasks if t != task], limit=settings.test_size,
        attribution_data=load_task(task, "train", limit=settings.attribution_samples), progress=progress,
    )


def _knowledge(sweep: SweepResult, settings: DefenseEvalSettings) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    knowledge = {
        criterion: {str(keep): sweep.mean_retained(criterion, keep) for keep in settings.keeps} for criterion in settings.criteria
    }
    best = {str(keep): max(knowledge[c][str(keep)] for c in settings.criteria) for keep in settings.keeps}
    return knowledge, best


def _labels_to_target(moe: MoEModel, task: str, keep: int, headstart: HeadStartResult, settings: DefenseEvalSettings,
                      out: Path) -> LabelsResult:
    data = builtin_data(task, pool_size=settings.pool_size, test_size=settings.test_size, other_tasks=[])
    return measure_labels_to_target(
        moe, data, lambda seed: carve_keep_sets(moe, headstart, keep, seed), settings.labels,
        report_seeds=settings.headstart.report_seeds, out=out,
        base=settings.attack, strategy=settings.headstart.tuning, target_retention=settings.headstart.target_share,
    )


def _authorised_use(moe: MoEModel, settings: DefenseEvalSettings) -> dict[str, Any]:
    """Fine-tune only the permitted groups on a task no model has seen; check the protocol passes it."""
    train_data = authorised_task("train", settings.authorised_examples)
    test_data = authorised_task("test", settings.test_size)
    tuned = copy.deepcopy(moe)
    protocol = make_protocol(moe, settings.permitted)
    before = evaluate(tuned, tuned.tokenizer, test_data).value
    stream = batches(tuned.tokenizer, train_data, batch_size=settings.attack.batch_size, shuffle=True, seed=0, epochs=None,
                     context=context_length(tuned), prompt_format=tuned.prompt_format)
    trained = train(tuned, stream, steps=settings.authorised_steps, lr=settings.authorised_lr,
                    parameters=group_parameters(tuned, settings.permitted), progress=False)
    after = evaluate(tuned, tuned.tokenizer, test_data).value
    report = verify_fine_tune(tuned, protocol, moe)
    result = {
        "task": AUTHORISED_TASK,
        "permitted": list(settings.permitted),
        "accuracy_before": before,
        "accuracy_after": after,
        "final_loss": trained.final_loss,
        "compliant": report.compliant,
        "violations": [v.message for v in report.violations],
    }
    return result


def evaluate_model(
    name: str, moe: MoEModel, settings: DefenseEvalSettings, out: str | Path, *,
    scratch: Mapping[str, HeadStartResult] | None = None, progress: bool = True,
) -> ModelEvaluation:
    """Run every measurement of the module docstring on one model (resuming from ``out``, a run of this model).

    ``scratch`` maps :func:`attack_key` to the head start measured on the reference model,
    whose scratch arm is then reused.
    """
    if moe.tokenizer is None:
        raise InputError(f"model {name} ({moe.source}) has no tokenizer; the evaluation needs one.")
    fingerprint = moe.fingerprint()
    run = Run.open(out, "defense evaluation of one model", {"name": name, "model_fingerprint": fingerprint},
                   labels={"model_fingerprint": "model weights"})
    out = run.path
    start = time.perf_counter()
    utility: dict[str, float] = {}
    scoring: dict[str, dict[str, Any]] = {}
    knowledge, best_knowledge = {}, {}
    for task in settings.target_tasks:
        log.info("[%s] utility and knowledge loss (sweep of %s)", name, task)
        sweep = _sweep(moe, task, settings, out, progress)
        utility.update({t: sweep.full.accuracy[t] for t in settings.tasks if t not in utility})
        scoring.update({t: sweep.scoring[t] for t in settings.tasks if t not in scoring})
        knowledge[task], best_knowledge[task] = _knowledge(sweep, settings)
    evaluation = ModelEvaluation(name, moe.source, fingerprint, {t: utility[t] for t in settings.tasks}, knowledge,
                                 best_knowledge, scoring={t: scoring[t] for t in settings.tasks})
    for task in settings.target_tasks:
        kind = scoring[task].get("kind", "generate")
        attack_task = AttackTask.builtin(task, prompts=settings.headstart.prompts_needed(),
                                         test_size=settings.headstart.curve_test_size) if kind in TEACHER_KINDS else None
        for keep in settings.attack_keeps:
            key = attack_key(task, keep)
            if attack_task is None:
                # A text is its own label: both arms would train on the same texts with or without the full model.
                evaluation.skipped[key] = f"{kind} task: no answers to learn from the full model"
            elif evaluation.utility[task] <= 0:
                evaluation.skipped[key] = "the full model answers none of the test examples: nothing to carve out"
            if key in evaluation.skipped:
                log.warning("[%s] %s: %s", name, key, evaluation.skipped[key])
                continue
            reference = scratch.get(key) if scratch else None
            log.info("[%s] head start of %s at keep %d", name, task, keep)
            result = measure_head_start(moe, attack_task, keep, settings.headstart, out=out / "headstart" / f"{task}-keep{keep}",
                                        scratch=reference.scratch if reference is not None else None, progress=progress)
            evaluation.headstart[key] = result
            if settings.label_regime:
                log.info("[%s] labels to the target of %s at keep %d", name, task, keep)
                evaluation.labels[key] = _labels_to_target(moe, task, keep, result, settings,
                                                            out / "labels" / f"{task}-keep{keep}")
    log.info("[%s] authorised fine-tune of %s on a new task", name, ", ".join(settings.permitted))
    evaluation.authorised = run.get_or_compute("authorised.json", lambda: _authorised_use(moe, settings))
    evaluation.seconds = time.perf_counter() - start
    return evaluation


def evaluate_defenses(
    models: Mapping[str, MoEModel | str | Path],
    settings: DefenseEvalSettings,
    out: str | Path,
    *,
    loading: LoadOptions = LoadOptions(),
    progress: bool = True,
) -> DefenseEvaluation:
    """Evaluate every model (the first one is the undefended baseline), resuming from ``out``.

    A model given by path or hub id is loaded with ``loading`` when its turn comes and
    released after it, so one model is in memory at a time.
    """
    settings.check()
    if len(models) < 2:
        raise InputError("give the undefended model and at least one defended model to compare.")
    names = {name: _safe(name) for name in models}
    sources = [model.source if isinstance(model, MoEModel) else str(model) for model in models.values()]
    check_output(out, inputs=sources, directory=True, resumable=True)
    run = Run.open(out, "defense evaluation", {"settings": settings.to_dict()})
    evaluations: list[ModelEvaluation] = []
    for name, model in models.items():
        moe = model if isinstance(model, MoEModel) else loading.load(model)
        reference = evaluations[0].headstart if evaluations and settings.scratch_reference else None
        evaluations.append(evaluate_model(name, moe, settings, run.path / "runs" / names[name], scratch=reference,
                                          progress=progress))
        del moe
        gc.collect()
    return DefenseEvaluation(settings.to_dict(), evaluations)


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_+." else "_" for c in name)
    if not cleaned or cleaned != name:
        raise InputError(f"model name {name!r} must be letters, digits, '-', '_', '+' or '.' (it names a directory).")
    return cleaned
