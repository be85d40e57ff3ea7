"""What an audit is asked to do: the model, the tasks, and how hard the simulated attacker tries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeguard.attribution.scores import check_criterion
from moeguard.errors import InputError
from moeguard.realign.result import RealignConfig
from moeguard.zoo.cache import DEMO_SOURCE

DEMO_MODEL = DEMO_SOURCE


@dataclass
class AuditConfig:
    """One audit. ``model`` is a directory, a hub id or ``"demo"`` (the built-in demo model).

    Tasks are built-in task names (``tasks``; default every built-in task) or JSONL
    files (``data``: each file is one task, split into an attacker's pool and a held-out
    test set). ``compare`` names a defended model audited the same way, side by side.

    The attacker: attribution by ``criteria`` (default: frequency and REAP, plus the
    causal ablation criterion where it is affordable, see
    :func:`moeguard.audit.run.attack_criteria`) over ``attribution_examples`` pool
    examples, a mask-mode sweep over ``keeps`` (default: 100/75/50/37.5/25% of the
    experts), then re-alignment of the best plan at the keep counts where pruning alone
    loses more than ``1 - target_retention`` of the task, with ``acquisition`` against
    ``baseline_acquisition`` and a budget of ``budget`` labels in ``rounds`` rounds of
    ``steps_per_round`` steps. The search goes to smaller keep counts while re-alignment
    still reaches the target, at most ``max_realign_keeps`` of them. With ``forensics``
    the attacker's smallest plan is carved out of a copy (pruned, experts shuffled) and
    ``moeguard detect`` must recognise it and recover its kept experts.
    """

    model: str = DEMO_MODEL
    tasks: list[str] | None = None
    data: list[str] = field(default_factory=list)
    compare: str | None = None
    out: str = "audit"
    quick: bool = False
    budget: int = 64
    rounds: int = 4
    steps_per_round: int = 25
    batch_size: int = 8
    lr: float = 1e-3
    scope: str = "all"
    acquisition: str = "entropy"
    baseline_acquisition: str = "random"
    criteria: tuple[str, ...] | None = None
    keeps: list[int] | None = None
    target_retention: float = 0.9
    max_realign_keeps: int = 3
    forensics: bool = True
    test_size: int = 100
    other_size: int = 30
    pool_size: int = 256
    attribution_examples: int = 128
    test_fraction: float = 0.2
    eval_batch_size: int = 64
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def quick_preset(cls, **overrides: Any) -> "AuditConfig":
        """A small audit for a first look (about 3 minutes on the demo model, 2 CPU cores): fewer
        examples, one criterion, one re-alignment keep count, a small label budget."""
        settings: dict[str, Any] = dict(
            quick=True, budget=24, rounds=3, steps_per_round=12, criteria=("frequency",), max_realign_keeps=1, forensics=False,
            test_size=40, other_size=12, pool_size=96, attribution_examples=48,
        )
        settings.update(overrides)
        return cls(**settings)

    def check(self) -> None:
        """Refuse what cannot run, before any model is loaded."""
        if self.tasks is not None and self.data:
            raise InputError("give built-in tasks (--task) or data files (--data), not both.")
        if self.tasks is not None and not self.tasks:
            raise InputError("no task given; name at least one built-in task or use --data.")
        for path in self.data:
            if not Path(path).is_file():
                raise InputError(f"--data {path}: no such file (expected a JSONL file of prompt/answer or choice examples).")
        if self.criteria is not None:
            if not self.criteria:
                raise InputError("criteria is empty; name at least one attribution criterion (e.g. frequency).")
            for criterion in self.criteria:
                if check_criterion(criterion).baseline:
                    raise InputError(f"{criterion} is the sweep's baseline, not an attack criterion; name a real criterion.")
        for name in ("budget", "rounds", "max_realign_keeps", "test_size", "pool_size", "attribution_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}.")
        if self.other_size < 0:
            raise InputError(f"other-size must be 0 or more, got {self.other_size!r}.")
        if self.budget < self.rounds:
            raise InputError(
                f"--budget {self.budget} is too small for {self.rounds} re-alignment rounds (each round labels at least "
                f"one example); give --budget {self.rounds} or more."
            )
        # Acquisitions, scope, steps, batch sizes, lr and target: as every re-alignment run checks them
        # (the pool is checked against the budget once the tasks are loaded).
        for acquisition in (self.acquisition, self.baseline_acquisition):
            self.realign_config(acquisition).check(pool_size=self.budget)
        if self.keeps is not None and (not self.keeps or any(k < 1 for k in self.keeps)):
            raise InputError(f"--keep must list positive expert counts, got {self.keeps!r}.")
        if self.compare is not None and self.compare == self.model:
            raise InputError(f"--compare names the audited model itself ({self.model}); give the defended model.")

    def realign_config(self, acquisition: str) -> RealignConfig:
        """The settings of one re-alignment run of this audit's attacker."""
        return RealignConfig(
            budget=self.budget, rounds=self.rounds, acquisition=acquisition, scope=self.scope, lr=self.lr,
            steps_per_round=self.steps_per_round, batch_size=self.batch_size, seed=self.seed,
            eval_batch_size=self.eval_batch_size, target_retention=self.target_retention,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["criteria"] = list(self.criteria) if self.criteria is not None else None
        return data
