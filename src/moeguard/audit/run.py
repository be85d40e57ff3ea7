"""The audit pipeline: evaluate -> attribute -> sweep -> re-align -> (compare) -> report.

Every stage's result lives under ``<out>/.cache/<model fingerprint>/`` in an entry
named by a hash of the stage's inputs (the model's weights fingerprint, the data, the
settings) and of the code version (a :class:`moeguard.runs.RunCache`), and each stage
resumes from what is there: an attribution is reused whole, a sweep continues from its
last evaluated point, a re-alignment from its last round. A rerun of the same audit
therefore recomputes nothing (``ModelAudit.work`` counts it); a changed setting
recomputes only the stages it feeds, and new code recomputes everything.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from moeguard.attack import AttackTask, HeadStartResult, measure_head_start
from moeguard.attack.teacher import TEACHER_KINDS
from moeguard.attribution import Attribution, collect_attribution, scores
from moeguard.attribution.figures import score_heatmap
from moeguard.attribution.scores import CRITERIA, DEFAULT_CRITERIA
from moeguard.attribution.summary import Specialisation, specialisation
from moeguard.audit.config import DEMO_MODEL, AuditConfig
from moeguard.audit.headline import BestPlan, best_plans, pruned_parameter_counts, realign_candidates, smallest_retaining
from moeguard.audit.results import Compressed, DefenseComparison, ModelAudit, RealignRun, TaskAudit
from moeguard.audit.tasks import AuditTask, builtin_audit_tasks, user_audit_tasks
from moeguard.data import TaskData, batches, data_signature
from moeguard.data.batching import context_length
from moeguard.data.task_types import retention
from moeguard.defense.costs import cost_multiplier
from moeguard.errors import InputError, ModelError
from moeguard.eval import evaluate
from moeguard.io import check_output
from moeguard.models import MoEModel, loading
from moeguard.plotting import file_stem
from moeguard.pruning.figures import knowledge_loss_figure
from moeguard.pruning.sweep import SweepResult, run_sweep
from moeguard.realign import RealignResult, realign
from moeguard.realign.figures import recovery_figure
from moeguard.realign.pool import check_acquisition_for
from moeguard.runs import RunCache
from moeguard.zoo.cache import local_model_path, resolve_model_source

if TYPE_CHECKING:
    from moeguard.audit.report import AuditReport

log = logging.getLogger("moeguard.audit")

# Ablation costs one masked pass per routed expert; by default it joins the attack up to this many.
ABLATION_MAX_EXPERTS = 256
FIGURES_DIR = "figures"


@contextmanager
def stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time a stage (summed over tasks) into ``seconds[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def stage_logs_quiet() -> Iterator[None]:
    """The stages' own per-step and per-round log lines off (the audit logs one line per finished stage);
    left as they are when moeguard logs at DEBUG (``-v``)."""
    names = ("moeguard.training", "moeguard.realign", "moeguard.pruning", "moeguard.attribution", "moeguard.forensics")
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    if not logging.getLogger("moeguard").isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)


def audit_tasks(config: AuditConfig) -> list[AuditTask]:
    """The configured tasks with their data, loaded and checked (fast; before any model is touched)."""
    if config.user_tasks:
        tasks = user_audit_tasks(config.data, config.dataset, test_fraction=config.test_fraction, test_size=config.test_size,
                                 seed=config.seed, metric=config.metric, answer_pattern=config.answer_pattern,
                                 lm_eval_tasks=config.lm_eval_tasks, lm_eval_include=config.lm_eval_include)
    else:
        tasks = builtin_audit_tasks(config.tasks, pool_size=config.pool_size, test_size=config.test_size, seed=config.seed)
    for task in tasks:
        config.realign.check(len(task.pool))
        for acquisition in (config.realign.acquisition, config.baseline_acquisition):
            check_acquisition_for(acquisition, task.pool.kind, task.name)
    return tasks


def check_model_source(source: str, argument: str) -> None:
    """Refuse a model that cannot exist (a missing path, a directory that is not a model) before any long work;
    ``argument`` names the setting it came from (model or compare)."""
    if source == DEMO_MODEL:
        return
    try:
        loading.check_model_source(source)
    except ModelError as error:
        raise InputError(f"{argument}={source}: {error}", arguments=(argument,)) from None


def load_audited(source: str, config: AuditConfig) -> MoEModel:
    moe = config.loading.load(source)
    if moe.tokenizer is None:
        raise InputError(f"the model {source} has no tokenizer saved with it; the audit needs one to build and score tasks.")
    return moe


def expert_indexed_parameters(moe: MoEModel) -> list[int]:
    """Per MoE layer, the parameters of every expert-indexed tensor (router rows and biases, fused experts)."""
    return [sum(t.get().numel() for t in layer.expert_tensors if not t.is_buffer) for layer in moe.layers]


def compressed_size(moe: MoEModel, keep_counts: list[int]) -> Compressed:
    full = moe.parameter_counts()
    after = pruned_parameter_counts(full, expert_indexed_parameters(moe), moe.num_experts, moe.top_k, keep_counts)
    return Compressed(after.total, after.active_per_token, full.total, full.active_per_token)


def attack_criteria(config: AuditConfig, moe: MoEModel) -> tuple[str, ...]:
    """The configured criteria, or frequency and REAP plus ablation (the causal criterion, which an adaptive
    attacker uses against a defense) when the model has at most :data:`ABLATION_MAX_EXPERTS` routed experts
    and no group-limited router (masking one expert at a time must be routable)."""
    if config.criteria is not None:
        return tuple(config.criteria)
    affordable = sum(moe.num_experts) <= ABLATION_MAX_EXPERTS
    routable = all(layer.group_routing is None for layer in moe.layers)
    return ("frequency", "reap") + (("ablation",) if affordable and routable else ())


class ModelAuditor:
    """Runs every stage for one model; ``role`` is "model" (audited) or "compare" (the defended one)."""

    def __init__(self, moe: MoEModel, role: str, config: AuditConfig, out: Path, progress: bool) -> None:
        self.moe, self.role, self.config, self.progress = moe, role, config, progress
        self.fingerprint = moe.fingerprint()
        self.criteria = attack_criteria(config, moe)
        self.cache_dir = out / ".cache" / self.fingerprint[:16]
        self.cache = RunCache(self.cache_dir)
        self.figures = out / FIGURES_DIR
        self.prefix = "" if role == "model" else "defended_"
        self.seconds: dict[str, float] = {}
        self.realigned: dict[str, RealignResult] = {}  # by history path: full results for the figures

    def directory(self, stage: str, **inputs: Any) -> Path:
        """Where ``stage`` keeps its own run for these inputs (of this model)."""
        return self.cache.directory_for(stage, {"fingerprint": self.fingerprint, **inputs})

    # ------------------------------------------------------------------ stages
    def evaluate(self, tasks: list[AuditTask]) -> dict[str, dict[str, Any]]:
        inputs = {"fingerprint": self.fingerprint, "tasks": {t.name: t.signature() for t in tasks}}

        def compute() -> dict[str, Any]:
            bar = tqdm(tasks, desc="evaluate", unit="task", disable=None if self.progress else True)
            return {task.name: evaluate(self.moe, None, task.test, batch_size=self.config.realign.eval_batch_size).to_dict()
                    for task in bar}

        with stage("evaluate", self.seconds):
            result, cached = self.cache.get_or_compute("evaluate", inputs, compute)
        log.info("[%s] evaluate: full-model scores %s%s", self.role,
                 ", ".join(f"{n} {r['metric']} {r['value']:.3f}" for n, r in result.items()), " [cached]" if cached else "")
        return result

    def attribute(self, task: AuditTask) -> tuple[Path, Attribution, Specialisation]:
        """The task's attribution (computed once, then read from the cache), where it is, and its specialisation."""
        data = task.pool.head(self.config.attribution_examples)
        collected = DEFAULT_CRITERIA + (("ablation",) if "ablation" in self.criteria else ())
        directory = self.directory("attribution", task=task.name, data=task.signature(), n=len(data),
                                   criteria=list(collected))
        path = directory / "attribution.json"
        with stage("attribution", self.seconds):
            cached = path.is_file()
            self.cache.count("attribution", reused=int(cached), computed=int(not cached))
            if not cached:
                record = collect_attribution(
                    self.moe, batches(self.moe.tokenizer, data, batch_size=self.config.realign.eval_batch_size,
                                      context=context_length(self.moe), prompt_format=self.moe.prompt_format),
                    criteria=collected, task=task.name, task_source=task.source,
                    total_batches=-(-len(data) // self.config.realign.eval_batch_size), checkpoint=directory / "partial",
                    progress=self.progress,
                )
                record.save(path)
        record = Attribution.load(path)
        summary = specialisation(record, ["frequency"])
        log.info("[%s] attribution %s: %s%s", self.role, task.name, summary.describe(), " [cached]" if cached else "")
        return path, record, summary

    def sweep(self, task: AuditTask, attribution: Path, other_tests: list[TaskData]) -> SweepResult:
        config = self.config
        directory = self.directory(
            "sweep", task=task.name, data=task.signature(), others=data_signature(("other", t) for t in other_tests),
            attribution=attribution.parent.name, criteria=list(self.criteria), keeps=config.keeps,
        )
        with stage("sweep", self.seconds):
            result = run_sweep(
                self.moe, task.test, out_dir=directory, attribution=attribution, criteria=self.criteria,
                keeps=config.keeps, random_seeds=(config.seed,), other_tasks=other_tests, limit=None,
                batch_size=config.realign.eval_batch_size, progress=self.progress,
            )
        self.cache.count("sweep", reused=len(result.points) + 1 - len(result.evaluated), computed=len(result.evaluated))
        return result

    def realign_run(self, task: AuditTask, plan: BestPlan, acquisition: str, other_tests: list[TaskData]) -> RealignRun:
        rc = self.config.realign_config(acquisition)
        data = task.realign_data(other_tests)
        directory = self.directory("realign", task=task.name, data=data.signature(), keep=plan.kept, realign=rc.to_dict())
        with stage("realign", self.seconds):
            result = realign(self.moe, data, rc, keep=plan.keep_sets(), out=directory, resume=True, progress=self.progress)
        self.cache.count("realign", reused=len(result.rounds) - 1 - result.trained_rounds, computed=result.trained_rounds)
        run = RealignRun.of(result, plan.keep, plan.criterion, plan.fraction_kept, str(directory / "history.json"))
        self.realigned[run.history] = result
        return run

    # ------------------------------------------------------------------ one task
    def audit_task(self, task: AuditTask, full: dict[str, Any], others: list[AuditTask], required_keeps: list[int]) -> TaskAudit:
        config = self.config
        audit = TaskAudit(task.name, task.source, full["value"], full["n"], kind=full["kind"], metric=full["metric"],
                          reference=full["reference"], higher_is_better=full["higher_is_better"])
        if math.isnan(retention(full["value"], full["value"], full["reference"], higher_is_better=full["higher_is_better"])):
            audit.skipped = ("the full model answers none of the test examples: there is no task knowledge to carve out"
                             if full["higher_is_better"] else "the full model's loss is no better than the unigram "
                             "entropy of the text: there is no task knowledge to carve out")
            log.warning("[%s] %s: skipped (%s)", self.role, task.name, audit.skipped)
            return audit
        attribution, record, summary = self.attribute(task)
        audit.specialisation = summary.to_dict()
        other_tests = [t.test.head(config.other_size) for t in others] if config.other_size else []
        swept = self.sweep(task, attribution, other_tests)
        audit.sweep = swept.rows()
        plans = best_plans(swept)
        without = smallest_retaining(plans, config.target)
        if without is not None:
            audit.keep_without, audit.criterion_without, audit.fraction_without = without.keep, without.criterion, without.fraction_kept
        log.info("[%s] sweep %s: pruning alone keeps %.0f%% of the task down to %s experts per layer (%s)", self.role,
                 task.name, 100 * config.target,
                 without.keep if without else "none of the swept", without.criterion if without else "no plan retains it")

        runs = self.realign_search(task, plans, without, other_tests, required_keeps)
        audit.realign_runs = runs
        reached = [r for r in runs if r.reached]
        best = min(reached, key=lambda r: (r.fraction_kept, r.labels, r.steps)) if reached else None
        if best is not None and best.fraction_kept < audit.fraction_without:
            audit.keep_with, audit.fraction_with, audit.cost = best.keep, best.fraction_kept, best
        else:
            audit.keep_with, audit.fraction_with = audit.keep_without, audit.fraction_without
        attack_kept = audit.cost.kept if audit.cost is not None else without.kept if without is not None else None
        keep_counts = [len(k) for k in attack_kept] if attack_kept is not None else list(self.moe.num_experts)
        audit.compressed = compressed_size(self.moe, keep_counts)
        if config.forensics and config.loading.device_map:
            # The carved copy would duplicate a model spread over devices; detect a saved prune instead.
            log.warning("[%s] forensics skipped with a device_map: run `moeguard detect` on a pruned checkpoint", self.role)
        elif config.forensics and attack_kept is not None and keep_counts != list(self.moe.num_experts):
            audit.forensics = self.forensics(task, attack_kept)
        if config.headstart and task.test.kind not in TEACHER_KINDS:
            # A text is its own label: there is no teacher answer for the two arms to learn.
            log.info("[%s] head start of %s skipped: %s tasks have no answers to learn from the full model",
                     self.role, task.name, task.test.kind)
        elif config.headstart:
            keep = headstart_keep(audit, runs, max(self.moe.num_experts))
            if keep is not None:
                audit.headstart = self.headstart(task, keep)
        audit.al_vs_random = al_vs_random(runs, config)
        audit.figures = self.task_figures(task, record, swept, runs)
        return audit

    def headstart(self, task: AuditTask, keep: int) -> dict[str, Any]:
        """The carver's head start at ``keep`` experts per layer (the audit's reduced settings), summarised."""
        settings = self.config.headstart_settings()
        attack_task = AttackTask(task.name, task.prompts(settings.prompts_needed()), task.test)
        directory = self.directory("headstart", task=task.name, data=attack_task.signature(), keep=keep,
                                   settings=settings.to_dict())
        with stage("headstart", self.seconds):
            done = (directory / "full_accuracy.json").is_file()
            result = measure_head_start(self.moe, attack_task, keep, settings, out=directory, progress=self.progress)
        self.cache.count("headstart", reused=int(done), computed=int(not done))
        summary = headstart_summary(result)
        log.info("[%s] head start %s keep %d: H = %s (FLOPs)", self.role, task.name, keep, result.head_start["flops"].describe())
        return summary

    def realign_search(self, task: AuditTask, plans: list[BestPlan], without: BestPlan | None,
                       other_tests: list[TaskData], required_keeps: list[int]) -> list[RealignRun]:
        """Re-align the best plan at each keep count below what pruning alone survives, largest first, while
        re-alignment still reaches the target (the baseline acquisition runs beside it at the first one);
        then any ``required_keeps`` not yet tried (the undefended attack's keep count, for a comparison)."""
        config = self.config
        runs: list[RealignRun] = []
        for index, plan in enumerate(realign_candidates(plans, config.target)[: config.max_realign_keeps]):
            run = self.realign_run(task, plan, config.realign.acquisition, other_tests)
            runs.append(run)
            if index == 0 and config.baseline_acquisition != config.realign.acquisition:
                runs.append(self.realign_run(task, plan, config.baseline_acquisition, other_tests))
            log.info("[%s] realign %s keep %d (%s): %s", self.role, task.name, plan.keep, config.realign.acquisition,
                     f"{config.target:.0%} retention at {run.labels} labels, {run.steps} steps" if run.reached
                     else f"not reached within {config.realign.budget} labels (final retention {run.final_retention:.2f})")
            if not any(r.reached for r in runs if r.keep == plan.keep):
                break
        tried = {r.keep for r in runs}
        for keep in required_keeps:
            plan = next((p for p in plans if p.keep == keep), None)
            needs_realignment = without is None or keep < without.keep
            if plan is not None and keep not in tried and needs_realignment:
                runs.append(self.realign_run(task, plan, config.realign.acquisition, other_tests))
        return runs

    def forensics(self, task: AuditTask, kept: list[list[int]]) -> dict[str, Any]:
        """Carve the attacker's model out of a copy (prune to ``kept``, shuffle the experts) and run
        :func:`moeguard.forensics.detect` on it: is it recognised, and are its experts traced back?"""
        from moeguard.forensics import detect
        from moeguard.forensics.derivatives import reindex_experts

        generator = torch.Generator().manual_seed(self.config.seed)
        orders = [[experts[i] for i in torch.randperm(len(experts), generator=generator).tolist()] for experts in kept]
        inputs = {"fingerprint": self.fingerprint, "orders": orders}

        def compute() -> dict[str, Any]:
            # The carved model shares every weight it keeps with the audited one: only the kept experts'
            # slices are new (no second copy of the model in memory).
            suspect = self.moe.weight_sharing_copy()
            reindex_experts(suspect, orders)
            verdict = detect(self.moe, suspect, seed=self.config.seed, progress=self.progress)
            recovered = [layer.order == order for layer, order in zip(verdict.layers, orders)]
            return {
                "suspect": "pruned to the attacker's smallest plan, experts shuffled (router rows with them), not re-aligned",
                "derived": verdict.derived, "z": verdict.z, "p_value": verdict.p_value, "z_threshold": verdict.z_threshold,
                "layers_recovered": sum(recovered), "layers": len(orders), "kept": [sorted(k) for k in kept],
                "recovered": [layer.kept for layer in verdict.layers], "seconds": verdict.seconds,
            }

        with stage("forensics", self.seconds):
            result, cached = self.cache.get_or_compute("forensics", inputs, compute)
        log.info("[%s] forensics %s: the carved model is %s (z %.1f), kept experts traced in %d of %d layers%s", self.role,
                 task.name, "recognised as derived" if result["derived"] else "NOT recognised", result["z"] or 0.0,
                 result["layers_recovered"], result["layers"], " [cached]" if cached else "")
        return result

    def task_figures(self, task: AuditTask, record: Attribution, swept: SweepResult, runs: list[RealignRun]) -> dict[str, str]:
        stem = self.prefix + file_stem(task.name)
        figures = {
            "attribution": score_heatmap(
                scores(record, "frequency"), f"{task.name}: {CRITERIA['frequency'].help} ({record.samples} examples)",
                self.figures / f"attribution_{stem}.png",
            ),
            "knowledge_loss": knowledge_loss_figure(swept, self.figures / f"knowledge_loss_{stem}.png"),
        }
        if runs:
            total = sum(self.moe.num_experts)
            lines = {f"{r.acquisition}, {r.keep}/{max(self.moe.num_experts)} experts ({r.criterion}, {r.fraction_kept * total:.0f}/{total})":
                     [self.realigned[r.history]] for r in runs}
            figures["recovery"] = recovery_figure(lines, self.figures / f"recovery_{stem}.png",
                                                  title=f"Re-alignment of {task.name} (mask mode, scope {self.config.realign.scope})")
        return {name: str(Path(FIGURES_DIR) / path.name) for name, path in figures.items()}

    # ------------------------------------------------------------------ all tasks
    def run(self, tasks: list[AuditTask], required_keeps: dict[str, list[int]] | None = None) -> ModelAudit:
        full = self.evaluate(tasks)
        audits = {}
        for task in tasks:
            others = [t for t in tasks if t.name != task.name]
            audits[task.name] = self.audit_task(task, full[task.name], others, (required_keeps or {}).get(task.name, []))
            headline = audits[task.name]
            if headline.skipped is None:
                cost = headline.cost
                log.info(
                    "[%s] %s: an attacker keeps %.0f%% of the experts without re-alignment, %.0f%% with it%s",
                    self.role, task.name, 100 * headline.fraction_without, 100 * headline.fraction_with,
                    f" ({cost.labels} labels, {cost.steps} steps)" if cost else "",
                )
        counts = self.moe.parameter_counts()
        return ModelAudit(
            role=self.role, source=str(self.moe.source), fingerprint=self.fingerprint, model_type=self.moe.model_type,
            criteria=list(self.criteria),
            num_experts=list(self.moe.num_experts), top_k=list(self.moe.top_k),
            parameters={"total": counts.total, "active_per_token": counts.active_per_token}, tasks=audits,
            stage_seconds=dict(self.seconds), work=self.cache.work(),
        )


def headstart_keep(audit: TaskAudit, runs: list[RealignRun], experts: int) -> int | None:
    """Where the head start is measured: the attacker's smallest successful carve (with or without re-alignment), else
    the largest keep count it tried to re-align (with a free teacher it may get further than with its label budget)."""
    if audit.cost is not None:
        return audit.cost.keep
    if audit.keep_without is not None and audit.keep_without < experts:
        return audit.keep_without
    return runs[0].keep if runs else None


def headstart_summary(result: HeadStartResult) -> dict[str, Any]:
    """What the audit keeps of a head start: H in both units, what bounds it, the steps of each arm, their curves for
    the figure. ``describe`` marks a lower bound ``>=`` and, when the scratch arm stopped at its compute cap,
    ``(cap Mx)``."""
    target = result.target

    def arm(results: Any) -> dict[str, Any]:
        costs = results.costs(target)
        return {"configuration": results.chosen, "reached": sum(c.reached for c in costs), "runs": len(costs),
                "steps": sum(c.steps for c in costs) / len(costs), "flops": sum(c.flops for c in costs) / len(costs),
                "curves": [{"flops": [curve.overhead_flops + p.tokens * curve.flops_per_token for p in curve.points],
                            "accuracy": [p.accuracy for p in curve.points]} for curve in results.curves]}

    describe = result.head_start["flops"].describe()
    if result.stopped_by_compute:
        describe += f" (cap {result.scratch_compute_multiple:g}x)"
    return {"keep": result.keep, "full_accuracy": result.full_accuracy, "target": target,
            "head_start": {unit: h.to_dict() for unit, h in result.head_start.items()},
            "describe": describe, "bound_note": result.bound_note(),
            "scratch_compute_multiple": result.scratch_compute_multiple, "stopped_by_compute": result.stopped_by_compute,
            "scratch": arm(result.scratch), "carve": arm(result.carve)}


def al_vs_random(runs: list[RealignRun], config: AuditConfig) -> dict[str, Any] | None:
    """Labels to the target with active learning and with the baseline at the first re-aligned keep count."""
    if not runs:
        return None
    keep = runs[0].keep
    by_acquisition = {r.acquisition: r for r in runs if r.keep == keep}
    active, baseline = by_acquisition.get(config.realign.acquisition), by_acquisition.get(config.baseline_acquisition)
    if active is None or baseline is None or active is baseline:
        return None
    efficiency = baseline.labels / active.labels if active.reached and baseline.reached else None
    return {
        "keep": keep, "acquisition": config.realign.acquisition, "baseline": config.baseline_acquisition,
        "labels": active.labels, "baseline_labels": baseline.labels,
        "final_retention": active.final_retention, "baseline_final_retention": baseline.final_retention,
        "label_efficiency": efficiency,
    }


def compare_models(model: ModelAudit, defended: ModelAudit) -> dict[str, DefenseComparison]:
    """Per task: the defense's cost multiplier and utility cost.

    The attack is the undefended model's cheapest successful one: its smallest keep count
    and the labels it needed there (0 where pruning alone kept the task). The defended
    model is attacked at that keep count too; its labels (the budget, flagged, when not
    reached) over the undefended labels is the multiplier (inf when the undefended attack
    needed no labels and the defended one does).
    """
    comparisons = {}
    for name, plain in model.tasks.items():
        guarded = defended.tasks.get(name)
        if guarded is None:
            continue
        keep = plain.cost.keep if plain.cost is not None else plain.keep_without
        undefended_labels = plain.cost.labels if plain.cost is not None else 0
        defended_labels, censored, multiplier, note = None, False, None, ""
        if keep is None or keep >= max(model.num_experts):
            keep, undefended_labels = None, None
            note = "no attack on the undefended model kept the task with fewer experts: nothing to compare"
        elif guarded.keep_without is not None and keep >= guarded.keep_without:
            defended_labels = 0
            note = "pruning alone keeps the task on the defended model at this keep count"
        else:
            acquisition = plain.cost.acquisition if plain.cost is not None else None
            run = next((r for r in guarded.realign_runs
                        if r.keep == keep and (acquisition is None or r.acquisition == acquisition)), None)
            if run is None:
                note = "the defended model was not attacked at this keep count"
            else:
                censored = not run.reached
                defended_labels = run.labels if run.reached else run.budget
                if censored:
                    note = f"not reached within {run.budget} labels on the defended model: the multiplier is a lower bound"
        if undefended_labels is not None and defended_labels is not None:
            multiplier = cost_multiplier(float(defended_labels), float(undefended_labels))
        utility_cost = plain.full_accuracy - guarded.full_accuracy
        comparisons[name] = DefenseComparison(
            task=name, keep=keep, undefended_labels=undefended_labels, defended_labels=defended_labels,
            censored=censored, cost_multiplier=multiplier,
            utility_cost=utility_cost if plain.higher_is_better else -utility_cost,
            fraction_without=(plain.fraction_without, guarded.fraction_without),
            fraction_with=(plain.fraction_with, guarded.fraction_with), note=note,
        )
    return comparisons


def versions() -> dict[str, str]:
    import platform

    import transformers

    import moeguard

    return {"moeguard": moeguard.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_audit(config: AuditConfig, *, progress: bool = True) -> "AuditReport":
    """Audit ``config.model`` (and ``config.compare``) and write the report into ``config.out``.

    Bad settings, unknown tasks, unreadable data and missing models are refused
    before any model is loaded or trained.
    """
    from datetime import datetime, timezone

    from moeguard.audit.figures import defense_figure, headline_figure, headstart_figure
    from moeguard.audit.report import AuditReport, write_report

    start = time.perf_counter()
    config.check()
    check_model_source(config.model, "model")
    if config.compare is not None:
        check_model_source(config.compare, "compare")
    inputs = [local_model_path(config.model), local_model_path(config.compare), *config.data]
    out = check_output(config.out, inputs=inputs, directory=True, resumable=True)
    tasks = audit_tasks(config)
    log.info("auditing %s on %d task(s): %s -> %s", config.model, len(tasks), ", ".join(t.name for t in tasks), out)

    model_source = resolve_model_source(config.model, progress=progress)
    with stage_logs_quiet():
        moe = load_audited(model_source, config)
        out.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a refused audit leaves no folder
        audited = ModelAuditor(moe, "model", config, out, progress).run(tasks)
        del moe  # one model in memory at a time: the compared one may be loaded next
        compared, comparisons = None, {}
        if config.compare is not None:
            # The defended model is attacked where the undefended attack succeeded, with or without re-alignment.
            required = {name: [task.cost.keep if task.cost is not None else task.keep_without]
                        for name, task in audited.tasks.items() if task.cost is not None or task.keep_without}
            defended_source = resolve_model_source(config.compare, progress=progress)
            defended = ModelAuditor(load_audited(defended_source, config), "compare", config, out, progress)
            compared = defended.run(tasks, required)
            comparisons = compare_models(audited, compared)
    figures = {"headline": str(Path(FIGURES_DIR) / headline_figure(
        audited, config.target, out / FIGURES_DIR / "headline.png", compared).name)}
    if comparisons:
        figures["defense"] = str(Path(FIGURES_DIR) / defense_figure(comparisons, out / FIGURES_DIR / "defense.png").name)
    if any(task.headstart for task in audited.tasks.values()):
        figures["headstart"] = str(Path(FIGURES_DIR) / headstart_figure(
            audited, out / FIGURES_DIR / "headstart.png", compared).name)
    report = AuditReport(
        config=config.to_dict(), model=audited, compare=compared, defense=comparisons, versions=versions(),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), seconds=time.perf_counter() - start,
        figures=figures, out_dir=out,
    )
    write_report(report, out)
    log.info("report written to %s (%.1f min)", out / "report.html", report.seconds / 60)
    return report
