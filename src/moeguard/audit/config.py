"""What an audit is asked to do: the model, the tasks, and how hard the simulated attacker tries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moeguard.attack.measure import HeadStartSettings
from moeguard.attribution.scores import CRITERIA, check_criterion
from moeguard.data.files import DatasetSource
from moeguard.errors import InputError
from moeguard.eval import METRICS
from moeguard.fields import setting
from moeguard.models.options import LoadOptions
from moeguard.realign.acquisition import ACQUISITIONS
from moeguard.realign.result import RealignConfig
from moeguard.zoo.cache import DEMO_SOURCE

DEMO_MODEL = DEMO_SOURCE
# What --quick changes: fewer examples, one criterion, one re-alignment keep count, a small label budget.
QUICK_REALIGN = RealignConfig(budget=24, rounds=3, steps_per_round=12)
QUICK = dict(quick=True, criteria=("frequency",), max_realign_keeps=1, forensics=False, test_size=40, other_size=12,
             pool_size=96, attribution_examples=48, headstart=False)
# The audit's head start: one configuration per arm (no tuning), one seed, short caps; defense-eval measures it in full.
# The scratch arm stops at twice the carve's compute: the audit asks whether the stolen weights save more than the
# 2x a defense aims to hold the head start to (H <= 2), and a scratch run stopped there shows H >= 2.
AUDIT_HEADSTART = HeadStartSettings(
    selections=("attribution",), carve_lrs=(3e-3,), scratch_lrs=(3e-3,), losses=("logits",), try_router_reinit=False,
    try_canonicalise=False, carve_steps=200, scratch_steps=300, scratch_compute_multiple=2.0, student_batch=16,
    evaluate_every=50, tuning_seeds=(), report_seeds=(0,), curve_test_size=64, selection_examples=64,
)


@dataclass
class AuditConfig:
    """One audit. ``model`` is a directory, a hub id or ``"demo"`` (the built-in demo model).

    Tasks are built-in task names (``tasks``; default every built-in task, of every task
    type) or tasks of your own, of any task type: JSONL files (``data``) and a ``datasets``
    source (``dataset``), each one task split into an attacker's pool and a held-out test
    set, generated answers scored as the file's header, or ``metric`` / ``answer_pattern``,
    say. ``compare`` names a defended model audited the same way, side by side.

    The attacker: attribution by ``criteria`` (default: frequency and REAP, plus the
    causal ablation criterion where it is affordable, see
    :func:`moeguard.audit.run.attack_criteria`) over ``attribution_examples`` pool
    examples, a mask-mode sweep over ``keeps`` (default: 100/75/50/37.5/25% of the
    experts), then re-alignment (``realign``: budget, rounds, acquisition, scope, learning
    rate, seed, target retention) of the best plan at the keep counts where pruning alone
    loses more than ``1 - realign.target_retention`` of the task, against
    ``baseline_acquisition``. The search goes to smaller keep counts while re-alignment
    still reaches the target, at most ``max_realign_keeps`` of them. With ``forensics``
    the attacker's smallest plan is carved out of a copy (pruned, experts shuffled) and
    ``moeguard detect`` must recognise it and recover its kept experts.
    ``realign.seed`` seeds everything (the data, the seed sets, the random baselines) and
    ``realign.eval_batch_size`` is the batch of every evaluation.
    """

    model: str = setting(DEMO_MODEL, "model directory or hub id ('demo': the built-in demo model)")
    tasks: list[str] | None = setting(None, "built-in tasks, or 'all' (default: every built-in task)")
    data: list[str] = field(default_factory=list, metadata={
        "help": "JSONL task file (prompt/answer, choice or text lines, and an optional metric header; repeat for several "
                "tasks); a held-out share is the test set, the rest the attacker's pool"})
    dataset: DatasetSource = field(default_factory=DatasetSource, metadata={"help": "a task from a datasets source"})
    lm_eval_tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-evaluation-harness tasks to attack (their evaluation documents, zero-shot; needs the lm-eval extra)"})
    lm_eval_include: str | None = setting(None, "a directory of extra harness task YAML files")
    metric: str | None = setting(None, "how generated answers of data files and the dataset are scored (default: a file's "
                                 "header, else exact_match)", choices=METRICS)
    answer_pattern: str | None = setting(None, "regular expression that extracts the answer from a generation")
    compare: str | None = setting(None, "a defended version of the model, audited the same way side by side")
    out: str = setting("audit", "output directory")
    quick: bool = setting(False, "a smaller, faster audit (about 3 minutes on the demo model)")
    realign: RealignConfig = field(default_factory=RealignConfig, metadata={"help": "the attacker's re-alignment"})
    baseline_acquisition: str = setting("random", "acquisition function active learning is compared against",
                                        choices=ACQUISITIONS)
    criteria: tuple[str, ...] | None = setting(None, "attribution criteria to attack with (default: frequency,reap, plus "
                                               "ablation for models with at most 256 routed experts)", choices=CRITERIA)
    keeps: list[int] | None = setting(None, "experts per layer to sweep (default: 100/75/50/37.5/25% of them)")
    max_realign_keeps: int = setting(3, "keep counts re-aligned at most, from the largest that needs it down")
    forensics: bool = setting(True, "carve the attacker's model and check that `moeguard detect` recognises it")
    headstart: bool = setting(True, "measure the carver's head start over training from scratch at the attacker's keep count")
    headstart_attack: HeadStartSettings = field(default_factory=lambda: AUDIT_HEADSTART, metadata={
        "help": "the audit's head start (a reduced one: defense-eval tunes both arms)"})
    test_size: int = setting(100, "test examples per task")
    # Every sweep point and re-alignment round scores each other task: with the nine built-in tasks, 15 each give the
    # other tasks' mean retention 120 examples, more than the task's own test set, at half the cost of 30 each.
    other_size: int = setting(15, "test examples per other task (what pruning and re-alignment cost elsewhere)")
    pool_size: int = setting(256, "pool examples per built-in task (the attacker's data)")
    attribution_examples: int = setting(128, "pool examples the attribution runs on")
    test_fraction: float = setting(0.2, "share of a data file held out as its test set")
    loading: LoadOptions = field(default_factory=LoadOptions, metadata={"help": "how the models are loaded"})

    @classmethod
    def quick_preset(cls, **overrides: Any) -> "AuditConfig":
        """A small audit for a first look (about 3 minutes on the demo model, 2 CPU cores): fewer
        examples, one criterion, one re-alignment keep count, a small label budget."""
        return cls(**{**QUICK, "realign": QUICK_REALIGN, **overrides})

    @property
    def target(self) -> float:
        """The share of each task's accuracy the attacker must keep (``realign.target_retention``)."""
        return self.realign.target_retention

    @property
    def seed(self) -> int:
        return self.realign.seed

    def check(self) -> None:
        """Refuse what cannot run, before any model is loaded."""
        if self.tasks is not None and self.user_tasks:
            raise InputError("give built-in tasks (`tasks`) or tasks of your own (`data`, `hf_dataset`, `lm_eval_tasks`), "
                             "not both.", arguments=("tasks", "data", "hf_dataset", "lm_eval_tasks"))
        if self.tasks is not None and not self.tasks:
            raise InputError("no task given; name at least one built-in task (`tasks`) or give `data`.",
                             arguments=("tasks", "data"))
        for path in self.data:
            if not Path(path).is_file():
                raise InputError(f"data={path}: no such file (expected a JSONL file of prompt/answer, choice or text examples).",
                                 arguments=("data",))
        if self.criteria is not None:
            if not self.criteria:
                raise InputError("`criteria` is empty; name at least one attribution criterion (e.g. frequency).",
                                 arguments=("criteria",))
            for criterion in self.criteria:
                if check_criterion(criterion).baseline:
                    raise InputError(f"{criterion} is the sweep's baseline, not an attack criterion; name a real criterion.")
        for name in ("max_realign_keeps", "test_size", "pool_size", "attribution_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}.", arguments=(name,))
        if self.other_size < 0:
            raise InputError(f"`other_size` must be 0 or more, got {self.other_size!r}.", arguments=("other_size",))
        realign = self.realign
        if isinstance(realign.budget, int) and isinstance(realign.rounds, int) and realign.budget < realign.rounds:
            raise InputError(
                f"budget={realign.budget} is too small for {realign.rounds} re-alignment rounds (each round labels at least "
                f"one example); give budget={realign.rounds} or more.", arguments=("budget",),
            )
        # Acquisitions, scope, steps, batch sizes, lr and target: as every re-alignment run checks them
        # (the pool is checked against the budget once the tasks are loaded).
        for acquisition in (realign.acquisition, self.baseline_acquisition):
            self.realign_config(acquisition).check(pool_size=realign.budget)
        if self.keeps is not None and (not self.keeps or any(k < 1 for k in self.keeps)):
            raise InputError(f"`keeps` must list positive expert counts, got {self.keeps!r}.", arguments=("keeps",))
        if self.headstart:
            self.headstart_settings().check()
        if self.compare is not None and self.compare == self.model:
            raise InputError(f"compare={self.compare} names the audited model itself; give the defended model.",
                             arguments=("compare",))

    def headstart_settings(self) -> HeadStartSettings:
        """The head start's settings, at the audit's target."""
        return replace(self.headstart_attack, target_share=self.target)

    def realign_config(self, acquisition: str) -> RealignConfig:
        """The settings of one re-alignment run of this audit's attacker, with ``acquisition``."""
        return replace(self.realign, acquisition=acquisition)

    @property
    def user_tasks(self) -> bool:
        """Whether the audit attacks tasks of the user's own (files or a dataset) rather than built-in ones."""
        return bool(self.data or self.dataset.hf_dataset or self.lm_eval_tasks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["criteria"] = list(self.criteria) if self.criteria is not None else None
        return data
