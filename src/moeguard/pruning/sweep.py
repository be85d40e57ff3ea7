"""The knowledge-loss sweep: how much a task keeps, and the rest loses, as experts go.

For one target task, every (criterion, keep count) point is evaluated in mask mode
(:meth:`MoEModel.mask_experts`: the same function as the physically pruned model,
without reloading or copying anything): the target task's score, every other
task's score and perplexity. Tasks may be of any task type, each scored by its own
metric (``accuracy[task]`` holds the score: an accuracy, a ROUGE-L, a token loss).
Two baselines a real criterion must beat are always included: ``random`` experts,
and the least used ones by ``baseline_criterion``. A point's *retention* of a task is
the share of the full model's gain over the task's no-knowledge reference that it
keeps (:func:`moeguard.data.task_types.retention`: its accuracy over the full model's
for accuracy-like metrics).

With an output directory the sweep is a resumable run (:class:`moeguard.runs.Run`):
``sweep.json`` is rewritten after every point and a rerun with the same model, task
and settings evaluates only the missing points. The table (:func:`rows_to_csv`) and
the figure (:func:`moeguard.pruning.figures.knowledge_loss_figure`) are drawn from the
result by whoever wants them.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moeguard.attribution import Attribution, check_fingerprint, collect_attribution, scores
from moeguard.attribution.scores import CRITERIA, DEFAULT_CRITERIA, check_criterion
from moeguard.data import BUILTIN_TASKS, Example, TaskData, batches, encode_examples, load_task, mixture
from moeguard.data.batching import context_length, pad_id_of
from moeguard.errors import InputError, PlanError
from moeguard.data.task_types import retention
from moeguard.eval import evaluate, evaluate_tasks, scoring
from moeguard.eval.evaluate import eval_mode, scored_sequences
from moeguard.io import check_output, read_json
from moeguard.models import MoEModel
from moeguard.pruning.plans import PrunePlan, make_plan
from moeguard.runs import Run

logger = logging.getLogger("moeguard.pruning")

# Keep counts as fractions of the experts per layer (8 experts -> 8, 6, 4, 3, 2).
DEFAULT_KEEP_FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25)
SWEEP_FORMAT = 1
RESULT_NAME, ATTRIBUTION_NAME = "sweep.json", "attribution.json"


@dataclass
class SweepPoint:
    """One evaluated plan. ``criterion`` is a criterion, ``random``, ``least_used:<criterion>`` or ``full``."""

    criterion: str
    keep: int
    seed: int | None
    fraction_kept: float
    kept: list[list[int]]
    accuracy: dict[str, float]  # each task's score in its metric (SweepResult.scoring)
    perplexity: float | None
    seconds: float
    answer_loss: float | None = None  # the target task's, see answer_loss()

    @property
    def key(self) -> str:
        return f"{self.criterion}|keep={self.keep}|seed={self.seed}"


@dataclass
class SweepResult:
    """A finished sweep: the full model, every point, the attribution the plans came from, and where
    the files went. ``scoring[task]`` says how a task is scored (``kind``, ``metric``, ``reference``,
    ``higher_is_better``: :class:`moeguard.eval.TaskResult`'s). ``evaluated`` are the keys of the
    points this call evaluated (the others were resumed from ``out_dir``)."""

    task: str
    model: str | None
    model_fingerprint: str
    num_experts: list[int]
    full: SweepPoint
    points: list[SweepPoint]
    settings: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: Path | None = None
    attribution: Attribution | None = None
    attribution_path: Path | None = None
    evaluated: list[str] = field(default_factory=list)

    @property
    def other_tasks(self) -> list[str]:
        return [task for task in self.full.accuracy if task != self.task]

    def retained(self, point: SweepPoint, task: str | None = None) -> float:
        """The retention of ``task`` (the target by default) at ``point``: ``(score - reference) / (full - reference)``
        (``score / full`` for accuracy-like metrics); NaN if the full model is no better than the reference."""
        task = task or self.task
        scoring = self.scoring.get(task, {})
        return retention(point.accuracy[task], self.full.accuracy[task], scoring.get("reference", 0.0),
                         higher_is_better=scoring.get("higher_is_better", True))

    def metric(self, task: str | None = None) -> str:
        """The metric ``task`` (the target by default) is scored by."""
        return self.scoring.get(task or self.task, {}).get("metric", "accuracy")

    def others_retained(self, point: SweepPoint) -> float:
        """Mean retention over the other tasks: the knowledge lost outside the target task."""
        values = [self.retained(point, task) for task in self.other_tasks]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per point (the full model first), as written to ``sweep.csv``."""
        rows = []
        for point in [self.full, *self.points]:
            row: dict[str, Any] = {
                "criterion": point.criterion,
                "seed": "" if point.seed is None else point.seed,
                "keep": point.keep,
                "fraction_kept": round(point.fraction_kept, 6),
                "target_accuracy": point.accuracy[self.task],
                "target_retained": self.retained(point),
                "others_retained": self.others_retained(point),
                "target_answer_loss": "" if point.answer_loss is None else point.answer_loss,
            }
            row.update({f"accuracy_{task}": value for task, value in point.accuracy.items()})
            row["perplexity"] = "" if point.perplexity is None else point.perplexity
            row["seconds"] = round(point.seconds, 3)
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SWEEP_FORMAT,
            "task": self.task,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "num_experts": self.num_experts,
            "settings": self.settings,
            "scoring": self.scoring,
            "full": asdict(self.full),
            "points": [asdict(p) for p in self.points],
        }

    def mean_retained(self, criterion: str, keep: int) -> float:
        """Target retention at ``keep``, averaged over the seeds of ``criterion``."""
        if not any(p.criterion == criterion and p.keep == keep for p in self.points):
            raise InputError(f"the sweep has no point for {criterion!r} at keep={keep}.")
        return self.mean_over_seeds(criterion, keep, self.retained)

    def mean_over_seeds(self, criterion: str, keep: int, measure: Callable[[SweepPoint], float]) -> float:
        """``measure`` of the points of ``criterion`` at ``keep``, averaged over seeds (NaN if there are none)."""
        values = [measure(p) for p in self.points if p.criterion == criterion and p.keep == keep]
        return sum(values) / len(values) if values else math.nan

    def describe(self) -> str:
        """Text tables by criterion (rows) and experts kept per layer (columns)."""
        keeps = sorted({p.keep for p in self.points}, reverse=True)
        labels = list(dict.fromkeys(p.criterion for p in self.points))
        full_loss = f"{self.full.answer_loss:.3f}" if self.full.answer_loss is not None else "-"
        lines = [
            f"knowledge loss on {self.task}: full model {self.metric()} {self.full.accuracy[self.task]:.3f}, answer loss "
            f"{full_loss} nats/token" + (f", perplexity {self.full.perplexity:.3f}" if self.full.perplexity is not None else "")
        ]
        tables = [
            (f"target {self.metric()} retained (pruned vs full)", self.retained),
            (f"target answer loss (nats/token; full model {full_loss})", lambda p: math.nan if p.answer_loss is None else p.answer_loss),
            ("other tasks' retention (mean)", self.others_retained),
        ]
        for title, measure in tables:
            lines.append(f"{title}, by experts kept per layer:")
            lines.append(f"  {'criterion':<24}" + "".join(f"{k:>8}" for k in keeps))
            for label in labels:
                lines.append(f"  {label:<24}" + "".join(f"{self.mean_over_seeds(label, k, measure):>8.3f}" for k in keeps))
        return "\n".join(lines)


def default_keeps(layers: Sequence[Any]) -> list[int]:
    """Keep counts at :data:`DEFAULT_KEEP_FRACTIONS` of the experts per layer that every layer can route
    (at least top-k, group-balanced for group-limited routers), largest first."""
    experts, top_k = min(layer.num_experts for layer in layers), max(layer.top_k for layer in layers)
    counts = sorted({max(top_k, round(experts * f)) for f in DEFAULT_KEEP_FRACTIONS}, reverse=True)
    zeros = torch.zeros(len(layers), max(layer.num_experts for layer in layers))
    feasible = []
    for count in counts:
        try:
            make_plan(zeros, layers, keep=count)
        except PlanError:
            continue
        feasible.append(count)
    return feasible


def text_of_tasks(datas: Sequence[TaskData]) -> TaskData:
    """The tasks' prompts and answers (and texts) as plain text (lm data), for perplexity when no text corpus is given."""
    texts = [
        TaskData(data.name, "lm", [Example(text=e.prompt + e.target) for e in data.examples], data.source)
        for data in datas
        if data.kind != "lm"
    ]
    return mixture(texts + [d for d in datas if d.kind == "lm"], name="tasks_text")


def _task_data(task: str | TaskData, limit: int | None, split: str = "test") -> TaskData:
    if isinstance(task, TaskData):
        return task.head(limit)
    if task not in BUILTIN_TASKS:
        raise InputError(f"unknown task {task!r}: give a built-in task ({', '.join(BUILTIN_TASKS)}) or a TaskData.")
    return load_task(task, split, limit=limit)


def _attribution_for(
    moe: MoEModel,
    task: str | TaskData,
    attribution: Attribution | str | Path | None,
    needed: Sequence[str],
    out_dir: Path | None,
    *,
    attribution_data: TaskData | None,
    attribution_limit: int,
    tokens: str,
    batch_size: int,
    progress: bool,
) -> tuple[Attribution, Path | None]:
    """The given attribution, the one saved by an interrupted run, or a new one on the task's training split,
    and the file it is in (None for one given in memory and not saved)."""
    path: Path | None = None
    if isinstance(attribution, Attribution):
        record = attribution
    elif attribution is not None:
        path = Path(attribution)
        record = Attribution.load(path)
    elif out_dir is not None and (out_dir / ATTRIBUTION_NAME).is_file():
        path = out_dir / ATTRIBUTION_NAME
        record = Attribution.load(path)
    else:
        data = attribution_data or (task if isinstance(task, TaskData) else load_task(task, "train", limit=attribution_limit))
        logger.info("attributing %s on %d examples", data.name, len(data))
        record = collect_attribution(
            moe, batches(moe.tokenizer, data, batch_size=batch_size, context=context_length(moe),
                         prompt_format=moe.prompt_format), tokens=tokens, criteria=needed, task=data.name,
            task_source=data.source, total_batches=-(-len(data) // batch_size), progress=progress,
        )
        if out_dir is not None:
            path = record.save(out_dir / ATTRIBUTION_NAME)
    check_fingerprint(record, moe)
    return record, path


def _plans(
    record: Attribution,
    moe: MoEModel,
    criteria: Sequence[str],
    keeps: Sequence[int],
    baseline_criterion: str,
    random_seeds: Sequence[int],
) -> list[tuple[PrunePlan, int | None]]:
    """Every plan of the sweep, built up front so that an impossible one fails before any evaluation."""
    plans = []
    for keep in keeps:
        for criterion in criteria:
            plans.append((make_plan(scores(record, criterion), moe.layers, keep=keep, criterion=criterion, task=record.task), None))
        for seed in random_seeds:
            plans.append((make_plan(scores(record, "random", seed=seed), moe.layers, keep=keep, criterion="random",
                                    task=record.task), seed))
        plans.append((make_plan(scores(record, baseline_criterion), moe.layers, keep=keep, criterion=baseline_criterion,
                                least_used=True, task=record.task), None))
    return plans


def answer_loss(moe: MoEModel, data: TaskData, batch_size: int) -> float:
    """Mean teacher-forced loss per answer token, ``-sum_i log p(a_i | prompt_i) / sum_i |a_i|`` (nats):
    on the reference answer, the correct choice, or (lm) the text itself.

    Unlike exact match it moves with every bit of knowledge lost, also where a
    small model gets few answers entirely right.
    """
    encoded = encode_examples(moe.tokenizer, data.examples, moe.prompt_format)
    with eval_mode(moe.model):
        log_likelihood, counts = scored_sequences(moe.model, encoded, pad_id_of(moe.tokenizer), batch_size)
    return float(-log_likelihood.sum() / counts.sum().clamp_min(1))


def evaluate_point(moe: MoEModel, point: SweepPoint, datas: list[TaskData], text: TaskData | None, batch_size: int) -> None:
    """Fill ``point`` with ``moe`` as it is (masked or not): every task's score, the first task's
    answer loss, perplexity on ``text``, and the seconds it took."""
    start = time.perf_counter()
    point.accuracy = {name: r.value for name, r in evaluate_tasks(moe, moe.tokenizer, datas, batch_size=batch_size).items()}
    point.answer_loss = answer_loss(moe, datas[0], batch_size)
    point.perplexity = evaluate(moe, moe.tokenizer, text, batch_size=batch_size).perplexity if text is not None else None
    point.seconds = time.perf_counter() - start


def run_sweep(
    moe: MoEModel,
    task: str | TaskData,
    *,
    out_dir: str | Path | None = None,
    attribution: Attribution | str | Path | None = None,
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    keeps: Sequence[int] | None = None,
    baseline_criterion: str = "frequency",
    random_seeds: Sequence[int] = (0,),
    other_tasks: Sequence[str | TaskData] | None = None,
    limit: int | None = 100,
    perplexity_data: TaskData | None = None,
    attribution_data: TaskData | None = None,
    attribution_limit: int = 256,
    tokens: str = "all",
    batch_size: int = 32,
    progress: bool = True,
) -> SweepResult:
    """Evaluate every (criterion, keep) plan for ``task`` in mask mode; see the module docstring.

    ``task`` is a built-in task name (its test split, ``limit`` examples, is
    evaluated; its train split, ``attribution_limit`` examples, is attributed over
    the ``tokens`` selected: all, prompt or answer) or a :class:`TaskData`. ``other_tasks``
    defaults to every other built-in task. ``attribution`` is reused when given,
    else computed (and saved in ``out_dir``). ``perplexity_data`` is lm data; by
    default perplexity is measured on the evaluated tasks' text. ``keeps`` default
    to :func:`default_keeps`. With ``out_dir`` every finished point is saved and a
    rerun with the same settings only evaluates the missing ones.
    """
    if moe.tokenizer is None:
        raise InputError(f"the model {moe.source} has no tokenizer; the sweep needs one to evaluate tasks.")
    for criterion in [*criteria, baseline_criterion]:
        check_criterion(criterion)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.", arguments=("batch_size",))
    keeps = list(keeps) if keeps is not None else default_keeps(moe.layers)
    for keep in keeps:  # every keep count is checked before any work (the scores do not matter here)
        make_plan(torch.zeros(moe.num_layers, max(moe.num_experts)), moe.layers, keep=keep)
    sources = [moe.source, None if isinstance(attribution, Attribution) else attribution,
               *(d.source for d in (task, perplexity_data, attribution_data, *(other_tasks or ())) if isinstance(d, TaskData))]
    # Checked, not created: the first file saved creates it, so a refused run leaves no folder behind.
    out = check_output(out_dir, inputs=sources, directory=True, resumable=True) if out_dir is not None else None
    target = _task_data(task, limit)
    others = [_task_data(t, limit) for t in (other_tasks if other_tasks is not None else BUILTIN_TASKS)]
    datas = [target] + [d for d in others if d.name != target.name]
    text = perplexity_data if perplexity_data is not None else text_of_tasks(datas)
    if text.kind != "lm":
        raise InputError(f"perplexity data {text.name!r} holds {text.kind} examples; give lm data ({{\"text\": ...}} lines).")
    needed = [c for c in dict.fromkeys([*criteria, baseline_criterion]) if not CRITERIA[c].baseline]
    record, record_path = _attribution_for(moe, task, attribution, needed, out, attribution_data=attribution_data,
                              attribution_limit=attribution_limit, tokens=tokens, batch_size=batch_size,
                              progress=progress)
    plans = _plans(record, moe, criteria, keeps, baseline_criterion, random_seeds)

    fingerprint = moe.fingerprint()
    task_scoring = {d.name: scoring(moe.tokenizer, d, context=context_length(moe)) for d in datas}
    settings = {
        "attribution": {"task": record.task, "created": record.created, "samples": record.samples, "tokens": record.tokens},
        "tasks": {d.name: d.source for d in datas},
        "limit": limit,
        "perplexity_data": text.source or text.name,
        "baseline_criterion": baseline_criterion,
    }
    run = None
    if out is not None:
        run = Run.open(out, "sweep", {"model_fingerprint": fingerprint, "task": target.name, "settings": settings},
                       labels={"model_fingerprint": "model weights", "task": "task"})
    done = _finished_points(run)
    total_experts = sum(moe.num_experts)
    evaluated: list[str] = []

    def save(full: SweepPoint, points: list[SweepPoint]) -> SweepResult:
        result = SweepResult(target.name, moe.source, fingerprint, moe.num_experts, full, points, settings, task_scoring,
                             out, record, record_path, evaluated)
        if run is not None:
            run.save_json(RESULT_NAME, result.to_dict())
        return result

    bar = tqdm(total=len(plans) + 1, desc=f"sweep {target.name}", unit="point", disable=None if progress else True)
    full = done.get(f"full|keep={max(moe.num_experts)}|seed=None")
    if full is None:
        full = SweepPoint("full", max(moe.num_experts), None, 1.0, [list(range(e)) for e in moe.num_experts], {}, None, 0.0)
        evaluate_point(moe, full, datas, text, batch_size)
        evaluated.append(full.key)
        save(full, [])
    bar.update(1)
    points: list[SweepPoint] = []
    for plan, seed in plans:
        point = SweepPoint(plan.label, plan.keep or 0, seed, sum(plan.keep_counts) / total_experts, plan.kept, {}, None, 0.0)
        if point.key in done:
            point = done[point.key]
        elif not plan.keep_sets():  # keeps every expert: the full model
            point.accuracy, point.perplexity, point.answer_loss = dict(full.accuracy), full.perplexity, full.answer_loss
        else:
            with moe.mask_experts(plan.keep_sets()):
                evaluate_point(moe, point, datas, text, batch_size)
            evaluated.append(point.key)
            scored = task_scoring[target.name]
            logger.info("%s keep=%d: %s %s %.3f (retained %.3f)", point.criterion, point.keep, target.name, scored["metric"],
                        point.accuracy[target.name], retention(point.accuracy[target.name], full.accuracy[target.name],
                                                               scored["reference"], higher_is_better=scored["higher_is_better"]))
        points.append(point)
        save(full, points)
        bar.update(1)
    bar.close()
    return save(full, points)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """Rows (:meth:`SweepResult.rows`) as CSV text, one column per key of the first row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _finished_points(run: Run | None) -> dict[str, SweepPoint]:
    """The points an interrupted run of this sweep saved, by key (none for a new run)."""
    data = run.load_json(RESULT_NAME) if run is not None and run.resumed else None
    if data is None:
        return {}
    points = [SweepPoint(**p) for p in data.get("points", [])] + [SweepPoint(**data["full"])]
    logger.info("resuming the sweep in %s: %d point(s) already evaluated", run.path, len(points) - 1)
    return {p.key: p for p in points}


def load_sweep(path: str | Path) -> SweepResult:
    """A sweep read back from its ``sweep.json`` (or the directory holding it)."""
    path = Path(path)
    path = path / RESULT_NAME if path.is_dir() else path
    data = read_json(path, what="sweep results")
    try:
        return SweepResult(
            data["task"], data["model"], data["model_fingerprint"], data["num_experts"], SweepPoint(**data["full"]),
            [SweepPoint(**p) for p in data["points"]], data.get("settings", {}), data.get("scoring", {}), path.parent,
        )
    except (KeyError, TypeError) as error:
        raise InputError(f"{path} is not a moeguard sweep result (missing or malformed {error}).") from None
