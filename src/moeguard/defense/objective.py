"""The hardening objective: the regularisers wired into the one training loop.

:class:`DefenseObjective` is an ``extra_loss`` for :func:`moeguard.training.train`.
While attached it records, in the training forward pass, every router's logits and
every experts call (inputs, selected experts, routing weights) *with* their autograd
graph, and turns them into the weighted sum of the selected terms:

``L = L(full) + a * dispersion + b * contribution + c * subset_failure + d * attacker``

- dispersion: :func:`~moeguard.defense.regularizers.routing_dispersion` of
  ``softmax(router logits)`` per layer (for sigmoid-scored routers a monotone
  surrogate of the selection scores);
- contribution: :func:`~moeguard.defense.regularizers.contribution_dispersion` of
  ``w ||y||`` per layer;
- subset_failure: masked forward passes under sampled expert subsets (random, and
  a task's top experts by the running attribution), hinge at ``L(full) + margin``;
- attacker: the simulated prune-and-fine-tune attacker of
  :mod:`moeguard.defense.attacker`, hinge at the same level.

Terms with weight 0 cost nothing. The running attribution is an exponential moving
average of each task's routing frequencies, per layer, from the training batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from moeguard.defense.attacker import ATTACKER_TRAINABLES, simulated_attack
from moeguard.defense.regularizers import contribution_dispersion, routing_dispersion, subset_failure
from moeguard.errors import InputError, PlanError
from moeguard.models import MoEModel, normalize_keep_sets
from moeguard.models.routing import routing_arguments
from moeguard.pruning.plans import LayerLimits, uniform_keep
from moeguard.training import lm_loss, token_cross_entropy

log = logging.getLogger("moeguard.defense")

TERMS = ("dispersion", "contribution", "subset_failure", "attacker")


@dataclass
class DefenseConfig:
    """Which terms to train with, their weights, and how subsets and attackers are drawn.

    ``keep_counts`` are the subset sizes (experts kept per layer) sampled for subset
    failure and the simulated attacker; counts a layer cannot route with are
    skipped. ``margin`` (nats per answer token) sets ``gamma = L(full) + margin``.
    """

    dispersion: float = 0.0
    contribution: float = 0.0
    subset_failure: float = 0.0
    attacker: float = 0.0
    margin: float = 2.0
    keep_counts: tuple[int, ...] = (2, 4, 6)
    random_subsets: int = 1
    attribution_subsets: int = 1
    attribution_decay: float = 0.9
    attacker_steps: int = 3
    attacker_lr: float = 1e-3
    attacker_trainables: str = "all"

    def __post_init__(self) -> None:
        for name in TERMS + ("margin",):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise InputError(f"defense {name} must be a number >= 0, got {value!r}.")
        if self.attacker_trainables not in ATTACKER_TRAINABLES:
            raise InputError(
                f"attacker_trainables must be one of {', '.join(ATTACKER_TRAINABLES)}, got {self.attacker_trainables!r}."
            )
        if not 0 <= self.attribution_decay < 1:
            raise InputError(f"attribution_decay must be in [0, 1), got {self.attribution_decay!r}.")
        if self.attacker_steps < 1 or not self.attacker_lr > 0:
            raise InputError("the simulated attacker needs attacker_steps >= 1 and attacker_lr > 0.")
        if not self.keep_counts or any(not isinstance(k, int) or k < 1 for k in self.keep_counts):
            raise InputError(f"keep_counts must be positive integers, got {self.keep_counts!r}.")

    @property
    def active_terms(self) -> list[str]:
        return [name for name in TERMS if getattr(self, name) > 0]

    def scaled(self, strength: float) -> "DefenseConfig":
        """The same configuration with every term weight multiplied by ``strength``."""
        return replace(self, **{name: getattr(self, name) * strength for name in TERMS})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "keep_counts": list(self.keep_counts)}


@dataclass(frozen=True)
class DefenseMethod:
    """A named defense: the objective's term weights (before ``strength`` scales them) and what it does."""

    name: str
    help: str
    config: DefenseConfig


# The defenses by name: entangled expert training and the simulated-attacker (non-fine-tunable)
# training of the selective fine-tuning protocol. Adding a defense is one entry here.
METHODS: dict[str, DefenseMethod] = {m.name: m for m in (
    DefenseMethod("entangle", "routing dispersion + contribution dispersion + subset failure",
                  DefenseConfig(dispersion=1.0, contribution=1.0, subset_failure=1.0)),
    DefenseMethod("dispersion", "routing dispersion alone", DefenseConfig(dispersion=1.0)),
    DefenseMethod("subset", "subset failure alone", DefenseConfig(subset_failure=1.0)),
    DefenseMethod("attacker", "the simulated prune-and-fine-tune attacker", DefenseConfig(attacker=1.0)),
    DefenseMethod("entangle+attacker", "entangle and the simulated attacker together",
                  DefenseConfig(dispersion=1.0, contribution=1.0, subset_failure=1.0, attacker=1.0)),
)}


def defense_config(method: str, *, strength: float = 1.0, **overrides: Any) -> DefenseConfig:
    """The configuration of a named method, scaled by ``strength``, with field overrides."""
    if method not in METHODS:
        raise InputError(f"unknown defense method {method!r}; methods: {', '.join(METHODS)}.")
    if not strength > 0:
        raise InputError(f"strength must be positive, got {strength!r}.")
    return replace(METHODS[method].config.scaled(strength), **overrides)


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The examples ``rows`` of a batch (every tensor indexed on its first axis)."""
    return {key: value.index_select(0, rows.to(value.device)) if torch.is_tensor(value) else value for key, value in batch.items()}


@dataclass
class _Recorded:
    logits: list[torch.Tensor | None]
    hidden: list[torch.Tensor | None]
    index: list[torch.Tensor | None]
    weights: list[torch.Tensor | None]


@dataclass
class TermLog:
    """Running means of each term's value over the steps so far."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def add(self, values: dict[str, float]) -> None:
        self.steps += 1
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def means(self) -> dict[str, float]:
        return {name: total / max(1, self.steps) for name, total in self.sums.items()}


class DefenseObjective:
    """``extra_loss(model, batch, outputs)`` for :func:`moeguard.training.train` (see the module docstring).

    ``task_of_example[i]`` is the task (``0..num_tasks-1``) of example ``i`` of the
    training data (``batch["example_index"]`` indexes it). Use inside
    :meth:`attached`, which installs the recording hooks.
    """

    def __init__(
        self,
        moe: MoEModel,
        config: DefenseConfig,
        task_of_example: torch.Tensor,
        num_tasks: int,
        *,
        seed: int = 0,
    ) -> None:
        if not config.active_terms:
            raise InputError(f"the defense has no active term; give at least one of {', '.join(TERMS)} a weight > 0.")
        self.moe = moe
        self.config = config
        self.task_of_example = task_of_example.long().cpu()
        self.num_tasks = num_tasks
        self.generator = torch.Generator().manual_seed(seed)
        self.limits = [LayerLimits.of(layer) for layer in moe.layers]
        self.keep_counts = self._feasible_keep_counts(config.keep_counts)
        width = max(moe.num_experts)
        self.attribution = torch.zeros(num_tasks, moe.num_layers, width, dtype=torch.float64)
        self.seen = torch.zeros(num_tasks, dtype=torch.bool)
        self.log = TermLog()
        self._recorded = self._empty()
        self._recording = False
        self._handles: list[Any] = []

    # ------------------------------------------------------------ set-up
    def _feasible_keep_counts(self, counts: tuple[int, ...]) -> list[int]:
        feasible = []
        for count in counts:
            try:
                kept = uniform_keep(torch.zeros(len(self.limits), max(self.moe.num_experts)), self.limits, count)
                normalize_keep_sets(self.moe.layers, dict(enumerate(kept)), physical=False)
            except PlanError:
                continue
            if count < min(self.moe.num_experts):
                feasible.append(count)
        if (self.config.subset_failure or self.config.attacker) and not feasible:
            raise InputError(
                f"none of the keep counts {list(counts)} is a valid proper subset for this model "
                f"(experts per layer {self.moe.num_experts}, top-k {self.moe.top_k}); choose counts between the top-k "
                "and the expert count (a multiple of the group count for group-limited routers)."
            )
        return feasible

    def _empty(self) -> _Recorded:
        n = self.moe.num_layers
        return _Recorded([None] * n, [None] * n, [None] * n, [None] * n)

    def attach(self) -> None:
        """Install the hooks that record routing in the training forward pass."""
        if self._handles:
            return
        for layer in self.moe.layers:
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer.index)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(layer.index), with_kwargs=True))
        self._recording = True

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._recording = False
        self._recorded = self._empty()

    @contextmanager
    def attached(self) -> Iterator["DefenseObjective"]:
        """The hooks installed for the length of the block."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def _router_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if self._recording:
                logits = output[0] if isinstance(output, tuple) else output
                self._recorded.logits[index] = logits

        return hook

    def _experts_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self._recording:
                hidden, top_index, top_weights = routing_arguments(args, kwargs)
                self._recorded.hidden[index] = hidden
                self._recorded.index[index] = top_index
                self._recorded.weights[index] = top_weights

        return hook

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No recording (for the extra forward passes the terms make themselves)."""
        previous, self._recording = self._recording, False
        try:
            yield
        finally:
            self._recording = previous

    # ------------------------------------------------------------ the loss
    def __call__(self, model: Any, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        recorded, self._recorded = self._recorded, self._empty()
        if "example_index" not in batch:
            raise InputError(
                "the defense needs batch['example_index'] to tell the tasks apart; build batches with "
                "moeguard.data.batches over the mixture the objective was made for."
            )
        if any(x is None for x in recorded.index):
            raise InputError(
                "the defense saw no routing in this forward pass; use the objective inside DefenseObjective.attached()."
            )
        example_task = self.task_of_example.to(batch["example_index"].device)[batch["example_index"]]
        tokens = batch["attention_mask"].reshape(-1).bool()
        token_task = example_task.unsqueeze(1).expand_as(batch["attention_mask"]).reshape(-1)[tokens]
        self._update_attribution(recorded, tokens, token_task)
        config = self.config
        device = outputs.logits.device
        total = torch.zeros((), device=device)
        values: dict[str, float] = {}
        with self.paused():
            if config.dispersion:
                term = self._dispersion(recorded, tokens, token_task)
                total, values["dispersion"] = total + config.dispersion * term, term.item()
            if config.contribution:
                term = self._contribution(recorded, tokens, token_task)
                total, values["contribution"] = total + config.contribution * term, term.item()
            if config.subset_failure:
                term = self._subset_failure(batch, outputs, example_task)
                total, values["subset_failure"] = total + config.subset_failure * term, term.item()
            if config.attacker:
                task, rows = self._pick_task(example_task)
                sub = select_rows(batch, rows)
                gamma = token_cross_entropy(outputs.logits.index_select(0, rows), sub["labels"]).detach() + config.margin
                keep = self._top_keep_sets(task, self._draw_keep_count())
                attack = simulated_attack(
                    self.moe, sub, keep, trainables=config.attacker_trainables, steps=config.attacker_steps,
                    lr=config.attacker_lr, gamma=gamma,
                )
                total, values["attacker"] = total + config.attacker * attack.surrogate, attack.penalty
                values["attacked_loss"] = attack.attacked_loss
        self.log.add(values)
        return total

    def _update_attribution(self, recorded: _Recorded, tokens: torch.Tensor, token_task: torch.Tensor) -> None:
        decay = self.config.attribution_decay
        for layer, top_index in enumerate(recorded.index):
            chosen = top_index.detach()[tokens].cpu()
            experts = self.moe.layers[layer].num_experts
            for task in token_task.unique().tolist():
                counts = torch.bincount(chosen[token_task.cpu() == task].reshape(-1), minlength=experts).double()
                share = counts / counts.sum().clamp_min(1)
                row = self.attribution[task, layer, :experts]
                row.copy_(share if not self.seen[task] else decay * row + (1 - decay) * share)
        self.seen[token_task.unique().cpu()] = True

    def _dispersion(self, recorded: _Recorded, tokens: torch.Tensor, token_task: torch.Tensor) -> torch.Tensor:
        terms = [
            routing_dispersion(logits[tokens].float().softmax(-1), token_task, self.num_tasks)
            for logits in recorded.logits
            if logits is not None
        ]
        if not terms:
            raise InputError(
                f"{self.moe.model_type}: its routers return no logits, so routing dispersion cannot be computed; "
                "use the contribution and subset_failure terms instead."
            )
        return torch.stack(terms).mean()

    def _contribution(self, recorded: _Recorded, tokens: torch.Tensor, token_task: torch.Tensor) -> torch.Tensor:
        terms = []
        for layer in self.moe.layers:
            hidden = recorded.hidden[layer.index][tokens]
            index = recorded.index[layer.index][tokens]
            weights = recorded.weights[layer.index][tokens]
            outputs = self.moe.expert_outputs(layer.index, hidden, index)
            norms = torch.linalg.vector_norm(outputs.float(), dim=-1)
            terms.append(
                contribution_dispersion(index, weights.float(), norms, token_task, self.num_tasks, layer.num_experts)
            )
        return torch.stack(terms).mean()

    def _draw_keep_count(self) -> int:
        return self.keep_counts[int(torch.randint(len(self.keep_counts), (1,), generator=self.generator))]

    def _random_keep_sets(self, count: int) -> dict[int, list[int]]:
        scores = torch.rand(len(self.limits), max(self.moe.num_experts), generator=self.generator)
        return dict(enumerate(uniform_keep(scores, self.limits, count)))

    def _top_keep_sets(self, task: int, count: int) -> dict[int, list[int]]:
        return dict(enumerate(uniform_keep(self.attribution[task].float(), self.limits, count)))

    def _pick_task(self, example_task: torch.Tensor) -> tuple[int, torch.Tensor]:
        """A task of the batch (drawn at random) and the rows of its examples."""
        present = example_task.unique().cpu()
        task = int(present[torch.randint(len(present), (1,), generator=self.generator)])
        return task, (example_task == task).nonzero().squeeze(1)

    def _subset_failure(self, batch: dict[str, torch.Tensor], outputs: Any, example_task: torch.Tensor) -> torch.Tensor:
        full = token_cross_entropy(outputs.logits, batch["labels"]).detach()
        masked: list[torch.Tensor] = []
        gammas: list[torch.Tensor] = []
        for _ in range(self.config.random_subsets):
            with self.moe.mask_experts(self._random_keep_sets(self._draw_keep_count())):
                masked.append(lm_loss(self.moe, batch))
            gammas.append(full + self.config.margin)
        for _ in range(self.config.attribution_subsets):
            task, rows = self._pick_task(example_task)
            sub = select_rows(batch, rows)
            with self.moe.mask_experts(self._top_keep_sets(task, self._draw_keep_count())):
                masked.append(lm_loss(self.moe, sub))
            sub_full = token_cross_entropy(outputs.logits.index_select(0, rows), sub["labels"]).detach()
            gammas.append(sub_full + self.config.margin)
        return subset_failure(torch.stack(masked), torch.stack(gammas))


class DefenseLoss:
    """The defense as an ``extra_loss`` for a training run that builds its own model.

    The objective binds to the model it first sees and installs its hooks then; that
    first step trains on the task loss alone (its forward pass ran unrecorded). Used
    to train the demo model defended from scratch (``moeguard zoo train --defense``).
    """

    def __init__(self, config: DefenseConfig, task_of_example: torch.Tensor, num_tasks: int, *, seed: int = 0) -> None:
        if not config.active_terms:
            raise InputError(f"the defense has no active term; give at least one of {', '.join(TERMS)} a weight > 0.")
        self.config = config
        self.task_of_example = task_of_example
        self.num_tasks = num_tasks
        self.seed = seed
        self.objective: DefenseObjective | None = None

    def settings(self) -> dict[str, Any]:
        """What this loss is (recorded with a training run's checkpoint)."""
        return {"defense": self.config.to_dict(), "tasks": self.num_tasks, "seed": self.seed}

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        if self.objective is None:
            if not isinstance(model, MoEModel):
                raise InputError("the defense needs the MoEModel being trained (train(moe, ...)), not a bare causal LM.")
            self.objective = DefenseObjective(model, self.config, self.task_of_example, self.num_tasks, seed=self.seed)
            self.objective.attach()
            log.info("defense terms (%s) start at the next step", ", ".join(self.config.active_terms))
            return outputs.logits.new_zeros(())
        return self.objective(model, batch, outputs)
