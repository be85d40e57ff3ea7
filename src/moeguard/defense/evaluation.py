"""The evaluation that decides whether a defense works: every model, same data, same budgets.

For each model (the undefended one first, then the defended ones) and the
attacker's target task:

1. utility and knowledge loss: :func:`moeguard.pruning.run_sweep` on the model
   itself (attribution on the defended model, every criterion, keep 6/4/2 of 8);
   the full model's accuracy on every task is the utility;
2. attack cost: :func:`moeguard.realign.realign` in mask mode over the attacker
   grid (criteria x trainable scopes x learning rates x seeds), experts chosen by
   the criterion's attribution *on the model under attack*; labels and steps to
   the target retention (:mod:`moeguard.defense.costs`);
3. adaptive attacks: sequence-level distillation of the pruned student from the
   full model's own answers (no human labels), and re-initialising the routers
   before re-alignment, both with the attacker's best grid configuration;
4. authorised use: a fine-tune of the protocol's permitted groups on a task none
   of the models has seen, and the verifier's verdict on it.

Every unit of work (a sweep point, an attack run, an adaptive attack, the
authorised fine-tune) is saved when it finishes under ``out/runs/<model>/``; a
rerun with the same settings and models skips what is done, so the evaluation can be
stopped and continued at will (other settings, or another model under a name already
evaluated, are refused: :class:`moeguard.runs.Run`). One log line is printed per
attack run. Models are loaded one at a time. The result is returned; its tables and
figures are written by :func:`moeguard.defense.report.write_report`.
"""

from __future__ import annotations

import copy
import gc
import logging
import random
import string
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moeguard.attribution import Attribution, scores
from moeguard.attribution.scores import CRITERIA, check_criterion
from moeguard.data import Example, TaskData, batches
from moeguard.data.batching import context_length
from moeguard.defense.costs import AttackRun, GridCost, configuration_label, cost_multiplier, grid_cost
from moeguard.defense.parameter_groups import check_group_names, group_parameters
from moeguard.defense.protocol import make_protocol
from moeguard.defense.verify import verify_fine_tune
from moeguard.errors import InputError
from moeguard.eval import evaluate
from moeguard.fields import setting
from moeguard.io import check_output
from moeguard.models import MoEModel
from moeguard.models.options import LoadOptions
from moeguard.pruning.plans import make_plan
from moeguard.pruning.sweep import SweepResult, run_sweep
from moeguard.realign import RealignConfig, RealignData, RealignResult, builtin_data, realign
from moeguard.realign.metrics import labels_to_reach, retention
from moeguard.realign.scopes import TRAIN_SCOPES, check_scope
from moeguard.runs import Run
from moeguard.training import train

log = logging.getLogger("moeguard.defense")

EVALUATION_FORMAT = 1


# The attacker of the defense evaluation: a larger budget in more, shorter rounds than the one
# default (so costs resolve to 32 labels), batch 16, and random acquisition, which isolates what
# the grid varies (attribution, scope, learning rate) and costs nothing per round. The grid's
# scopes, learning rates and seeds replace ``scope``, ``lr`` and ``seed``.
ATTACKER = RealignConfig(budget=256, rounds=8, steps_per_round=15, batch_size=16, acquisition="random")


@dataclass
class DefenseEvalSettings:
    """The shared data and budgets of an evaluation (every model gets exactly these)."""

    target_task: str = setting("reverse", "the attacker's task (built-in)")
    tasks: tuple[str, ...] = setting(("addition", "reverse", "sort", "caesar", "upper", "count"),
                                     "tasks whose utility is measured")
    keeps: tuple[int, ...] = setting((6, 4, 2), "keep counts of the knowledge loss")
    attack_keeps: tuple[int, ...] = setting((4, 2), "keep counts the attacker prunes to and re-aligns (each a full grid)")
    criteria: tuple[str, ...] = setting(("frequency", "reap", "ablation"), "attribution criteria of the attacker grid",
                                        choices=CRITERIA)
    scopes: tuple[str, ...] = setting(("router", "experts", "all"), "what the attacker fine-tunes", choices=TRAIN_SCOPES)
    lrs: tuple[float, ...] = setting((1e-4, 3e-4, 1e-3, 3e-3), "learning rates of the attacker grid")
    seeds: tuple[int, ...] = setting((0, 1, 2), "attack seeds")
    attack: RealignConfig = field(default_factory=lambda: ATTACKER, metadata={"help": "each attack run's re-alignment"})
    pool_size: int = setting(512, "pool examples of the target task")
    test_size: int = setting(100, "test examples per task")
    attribution_samples: int = setting(256, "training examples the attribution is computed on")
    adaptive_seeds: tuple[int, ...] = setting((0,), "seeds of the adaptive attacks")
    permitted: tuple[str, ...] = setting(("router", "attention"), "groups the authorised fine-tune trains")
    authorised_steps: int = setting(150, "steps of the authorised fine-tune")
    authorised_lr: float = setting(3e-3, "learning rate of the authorised fine-tune")
    authorised_examples: int = setting(2000, "training examples of the authorised fine-tune")

    @property
    def target_retention(self) -> float:
        return self.attack.target_retention

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        if self.target_task not in self.tasks:
            raise InputError(f"the target task {self.target_task!r} must be one of the evaluated tasks {list(self.tasks)}.")
        outside = [k for k in self.attack_keeps if k not in self.keeps]
        if not self.attack_keeps or outside:
            raise InputError(f"attack keep counts {list(self.attack_keeps)} must be among the knowledge-loss keep counts "
                             f"{list(self.keeps)}.")
        if not (self.criteria and self.scopes and self.lrs and self.seeds):
            raise InputError("the attacker grid needs at least one criterion, scope, learning rate and seed.")
        for criterion in self.criteria:
            check_criterion(criterion)
        for scope in self.scopes:
            check_scope(scope)
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
@dataclass
class KeepAttacks:
    """The attacks on a model pruned to ``keep`` experts per layer.

    ``best_runs`` are the re-alignment runs of the attacker's best configuration (one
    per seed; ``best_histories`` their history files); ``adaptive`` the adaptive
    attacks run with that configuration.
    """

    keep: int
    runs: list[AttackRun]
    labels: GridCost
    steps: GridCost
    adaptive: dict[str, dict[str, Any]] = field(default_factory=dict)
    best_histories: list[str] = field(default_factory=list)
    best_runs: list[RealignResult] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["best_runs"]
        for unit in ("labels", "steps"):
            best = getattr(self, unit).best
            data[unit]["best"] = configuration_label(best) if best else None
        return data


@dataclass
class ModelEvaluation:
    """Everything measured on one model; ``attacks`` maps the keep count (as text) to its attacks."""

    name: str
    source: str | None
    fingerprint: str
    utility: dict[str, float]  # each task's score in its metric (scoring)
    knowledge: dict[str, dict[str, float]]  # criterion -> {keep: target retained}
    best_knowledge: dict[str, float]  # keep -> accuracy retained by the attacker's best criterion
    attacks: dict[str, KeepAttacks]
    authorised: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    scoring: dict[str, dict[str, Any]] = field(default_factory=dict)  # how each task is scored (SweepResult.scoring)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attacks"] = {keep: attacks.to_dict() for keep, attacks in self.attacks.items()}
        return data


@dataclass
class DefenseEvaluation:
    """The models side by side; ``models[0]`` is the undefended baseline."""

    settings: dict[str, Any]
    models: list[ModelEvaluation]
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def baseline(self) -> ModelEvaluation:
        return self.models[0]

    def multipliers(self, model: ModelEvaluation, keep: str) -> dict[str, float]:
        """Cost multipliers at ``keep`` against the baseline: worst case and mean, in labels and steps."""
        mine, base = model.attacks[keep], self.baseline.attacks[keep]
        return {
            f"{unit}_{kind}": cost_multiplier(getattr(getattr(mine, unit), field_), getattr(getattr(base, unit), field_))
            for unit in ("labels", "steps")
            for kind, field_ in (("worst_case", "best_cost"), ("mean", "mean_cost"))
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": EVALUATION_FORMAT,
            "settings": self.settings,
            "models": [
                {**m.to_dict(), "multipliers": {keep: self.multipliers(m, keep) for keep in m.attacks}} for m in self.models
            ],
            "figures": self.figures,
        }


# ---------------------------------------------------------------- one model
def _sweep(moe: MoEModel, settings: DefenseEvalSettings, out: Path, progress: bool) -> SweepResult:
    from moeguard.data import load_task

    return run_sweep(
        moe,
        settings.target_task,
        out_dir=out / "sweep",
        criteria=settings.criteria,
        keeps=list(settings.keeps),
        other_tasks=list(settings.tasks),
        limit=settings.test_size,
        attribution_data=load_task(settings.target_task, "train", limit=settings.attribution_samples),
        progress=progress,
    )


def _knowledge(sweep: SweepResult, settings: DefenseEvalSettings) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    knowledge = {
        criterion: {str(keep): sweep.mean_retained(criterion, keep) for keep in settings.keeps} for criterion in settings.criteria
    }
    best = {str(keep): max(knowledge[c][str(keep)] for c in settings.criteria) for keep in settings.keeps}
    return knowledge, best


def _realign_config(settings: DefenseEvalSettings, scope: str, lr: float, seed: int) -> RealignConfig:
    """One attack run's settings: the evaluation's attacker at a point of the grid."""
    return replace(settings.attack, scope=scope, lr=lr, seed=seed)


def _attack_run(result: RealignResult, reference: float, criterion: str, scope: str, lr: float, seed: int, target: float) -> AttackRun:
    """What a re-alignment run cost, with retention measured against ``reference`` (the model under attack,
    unpruned and untouched: for the router re-init attack that is not the model re-aligned)."""
    retentions = [retention(r.accuracy, reference, result.reference_score, higher_is_better=result.higher_is_better)
                  for r in result.rounds]
    threshold = labels_to_reach([r.labels for r in result.rounds], [r.steps for r in result.rounds], retentions, target)
    return AttackRun(
        criterion, scope, lr, seed, threshold.labels, threshold.steps, result.final.labels, result.final.steps,
        retentions[-1],
    )


def _run_realign(moe: MoEModel, data: RealignData, config: RealignConfig, keep: dict[int, list[int]], out: Path) -> RealignResult:
    return realign(moe, data, config, keep=keep, out=out, resume=True, progress=False)


def _attack_dir(out: Path, criterion: str, scope: str, lr: float, seed: int) -> Path:
    return out / "attacks" / f"{criterion}-{scope}-lr{lr:g}-seed{seed}"


def adaptive_dir(out: Path, attack: str, configuration: tuple[str, str, float]) -> Path:
    """Where an adaptive attack run with the grid's best ``configuration`` is cached.

    Named by the configuration, so that a cache reused by an evaluation whose best
    configuration differs (another grid over the same runs) starts a new run instead
    of refusing to resume one made with other options.
    """
    criterion, scope, lr = configuration
    return out / "adaptive" / attack / f"{criterion}-{scope}-lr{lr:g}"


def _keep_sets(moe: MoEModel, attribution: Attribution, criterion: str, keep: int) -> dict[int, list[int]]:
    return make_plan(scores(attribution, criterion), moe.layers, keep=keep, criterion=criterion).keep_sets()


def _attack_grid(
    name: str, moe: MoEModel, attribution: Attribution, keep: int, reference: float, settings: DefenseEvalSettings, out: Path
) -> tuple[list[AttackRun], dict[tuple[str, str, float, int], RealignResult]]:
    data = builtin_data(settings.target_task, pool_size=settings.pool_size, test_size=settings.test_size, other_tasks=[])
    plans = {c: _keep_sets(moe, attribution, c, keep) for c in settings.criteria}
    grid = [(c, s, lr, seed) for c in settings.criteria for s in settings.scopes for lr in settings.lrs for seed in settings.seeds]
    runs, results = [], {}
    for number, (criterion, scope, lr, seed) in enumerate(grid, start=1):
        start = time.perf_counter()
        result = _run_realign(moe, data, _realign_config(settings, scope, lr, seed), plans[criterion],
                              _attack_dir(out, criterion, scope, lr, seed))
        results[(criterion, scope, lr, seed)] = result
        run = _attack_run(result, reference, criterion, scope, lr, seed, settings.target_retention)
        runs.append(run)
        cost = f"{run.labels} labels, {run.steps} steps" if run.reached else f"not reached (> {run.budget_labels} labels)"
        log.info("[%s] keep %d: attack %d/%d %s/%s/lr=%g/seed %d: %s; final retention %.3f (%.0fs)", name, keep, number,
                 len(grid), criterion, scope, lr, seed, cost, run.final_retention, time.perf_counter() - start)
    return runs, results


def teacher_labelled(moe: MoEModel, pool: TaskData, answers: list[str]) -> TaskData:
    """``pool`` answered by the model's own ``answers`` (its greedy answers, or its picked choices), scored as
    the pool is; a language-modelling pool is returned as it is (a text is its own label)."""
    if pool.kind == "lm":
        return pool
    if pool.kind == "choice":
        examples = [Example(prompt=e.prompt, choices=e.choices, label=e.choices.index(a)) for e, a in zip(pool, answers)]
    else:
        examples = [Example(prompt=e.prompt, answer=a) for e, a in zip(pool, answers)]
    return TaskData(pool.name, pool.kind, examples, f"teacher answers of {moe.source}", metric=pool.metric,
                    answer_pattern=pool.answer_pattern)


def _distillation(
    moe: MoEModel, keep: dict[int, list[int]], scope: str, lr: float, reference: float, settings: DefenseEvalSettings,
    run: Run, out: Path,
) -> dict[str, Any]:
    """The pruned student learns the full model's own answers on the pool (greedy answers, picked choices): no
    human label is used. On language-modelling text this is the grid's own attack (text needs no labels)."""
    base = builtin_data(settings.target_task, pool_size=settings.pool_size, test_size=settings.test_size, other_tasks=[])
    # The teacher's answers do not depend on the configuration: one saved unit per keep count.
    teacher = (out.parent / "teacher_pool.json").relative_to(run.path).as_posix()
    answers = [] if base.pool.kind == "lm" else run.get_or_compute(
        teacher, lambda: evaluate(moe, moe.tokenizer, base.pool).predictions)
    pool = teacher_labelled(moe, base.pool, answers)
    runs = []
    for seed in settings.adaptive_seeds:
        result = _run_realign(moe, RealignData(pool, base.test), _realign_config(settings, scope, lr, seed), keep,
                              out / f"seed{seed}")
        runs.append(_attack_run(result, reference, "distillation", scope, lr, seed, settings.target_retention))
    return _adaptive_summary(runs, teacher_queries=len(answers))


def _router_reinit(
    moe: MoEModel, keep: dict[int, list[int]], lr: float, reference: float, settings: DefenseEvalSettings, out: Path
) -> dict[str, Any]:
    """Throw the (possibly entangled) routers away: fresh random router weights, then re-align everything."""
    data = builtin_data(settings.target_task, pool_size=settings.pool_size, test_size=settings.test_size, other_tasks=[])
    student = copy.deepcopy(moe)
    std = getattr(student.config.get_text_config(), "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in student.layers:
            for param in layer.router_parameters():
                noise = torch.randn(param.shape, generator=generator) * std if param.ndim > 1 else torch.zeros(param.shape)
                param.copy_(noise.to(param.dtype))
    runs = []
    for seed in settings.adaptive_seeds:
        result = _run_realign(student, data, _realign_config(settings, "all", lr, seed), keep, out / f"seed{seed}")
        runs.append(_attack_run(result, reference, "router_reinit", "all", lr, seed, settings.target_retention))
    return _adaptive_summary(runs)


def _adaptive_summary(runs: list[AttackRun], **extra: Any) -> dict[str, Any]:
    labels, steps = grid_cost(runs, "labels"), grid_cost(runs, "steps")
    return {
        "steps_to_target": steps.best_cost,
        "labels_to_target": labels.best_cost,
        "reached": labels.reached,
        "runs": len(runs),
        "final_retention": sum(r.final_retention for r in runs) / len(runs),
        **extra,
    }


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


def _attacks_at(
    name: str, moe: MoEModel, attribution: Attribution, keep: int, reference: float, settings: DefenseEvalSettings,
    run: Run, out: Path,
) -> KeepAttacks:
    """The grid at one keep count, then the adaptive attacks with its best configuration."""
    runs, results = _attack_grid(name, moe, attribution, keep, reference, settings, out)
    labels, steps = grid_cost(runs, "labels"), grid_cost(runs, "steps")
    criterion, scope, lr = labels.best
    keep_sets = _keep_sets(moe, attribution, criterion, keep)
    log.info("[%s] keep %d: adaptive attacks with the best configuration %s", name, keep, configuration_label(labels.best))
    adaptive = {
        "distillation": _distillation(moe, keep_sets, scope, lr, reference, settings, run,
                                      adaptive_dir(out, "distillation", labels.best)),
        "router_reinit": _router_reinit(moe, keep_sets, lr, reference, settings,
                                        adaptive_dir(out, "router_reinit", (criterion, "all", lr))),
    }
    best = [results[(criterion, scope, lr, seed)] for seed in settings.seeds]
    return KeepAttacks(keep, runs, labels, steps, adaptive, [r.history_path for r in best if r.history_path], best)


def evaluate_model(
    name: str, moe: MoEModel, settings: DefenseEvalSettings, out: str | Path, *, progress: bool = True
) -> ModelEvaluation:
    """Run every measurement of the module docstring on one model (resuming from ``out``, a run of this model)."""
    if moe.tokenizer is None:
        raise InputError(f"model {name} ({moe.source}) has no tokenizer; the evaluation needs one.")
    fingerprint = moe.fingerprint()
    run = Run.open(out, "defense evaluation of one model", {"name": name, "model_fingerprint": fingerprint},
                   labels={"model_fingerprint": "model weights"})
    out = run.path
    start = time.perf_counter()
    log.info("[%s] utility and knowledge loss (sweep of %s)", name, settings.target_task)
    sweep = _sweep(moe, settings, out, progress)
    knowledge, best_knowledge = _knowledge(sweep, settings)
    reference = sweep.full.accuracy[settings.target_task]  # the realign test set is the sweep's test set
    attacks = {str(keep): _attacks_at(name, moe, sweep.attribution, keep, reference, settings, run, out / f"keep{keep}")
               for keep in settings.attack_keeps}
    log.info("[%s] authorised fine-tune of %s on a new task", name, ", ".join(settings.permitted))
    authorised = run.get_or_compute("authorised.json", lambda: _authorised_use(moe, settings))
    return ModelEvaluation(
        name=name,
        source=moe.source,
        fingerprint=fingerprint,
        utility={task: sweep.full.accuracy[task] for task in settings.tasks},
        knowledge=knowledge,
        best_knowledge=best_knowledge,
        attacks=attacks,
        authorised=authorised,
        seconds=time.perf_counter() - start,
        scoring={task: sweep.scoring[task] for task in settings.tasks},
    )


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
    evaluations = []
    for name, model in models.items():
        moe = model if isinstance(model, MoEModel) else loading.load(model)
        evaluations.append(evaluate_model(name, moe, settings, run.path / "runs" / names[name], progress=progress))
        del moe
        gc.collect()
    return DefenseEvaluation(settings.to_dict(), evaluations)


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_+." else "_" for c in name)
    if not cleaned or cleaned != name:
        raise InputError(f"model name {name!r} must be letters, digits, '-', '_', '+' or '.' (it names a directory).")
    return cleaned
