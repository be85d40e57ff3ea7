"""The hardening objective: the regularisers wired into the one training loop.

:class:`DefenseObjective` is an ``extra_loss`` for :func:`moeguard.training.train`.
While attached it records, in the training forward pass, every router's logits and
every experts call (inputs, selected experts, routing weights) *with* their autograd
graph, and turns them into the weighted sum of the selected terms:

``L = L(full) + a * dispersion + b * contribution + c * subset_failure + d * attacker + e * ntl + f * distill + g * watermark``

- dispersion: :func:`~moeguard.defense.regularizers.routing_dispersion` of
  ``softmax(router logits)`` per layer (for sigmoid-scored routers a monotone
  surrogate of the selection scores);
- contribution: :func:`~moeguard.defense.regularizers.contribution_dispersion` of
  ``w ||y||`` per layer;
- subset_failure: masked forward passes under sampled expert subsets (random, and
  a task's top experts by the running attribution), hinge at ``L(full) + margin``;
- attacker: the simulated prune-and-fine-tune attacker of
  :mod:`moeguard.defense.attacker`, hinge at the same level;
- ntl (meta-learned non-fine-tunability): one simulated attacker per step drawn from
  a distribution: a keep count, a subset (random, or the experts the carver of
  :mod:`moeguard.attack.selection` would keep by attribution or by subset search on
  the task's examples, recomputed every ``ntl_search_every`` steps), fresh routers or not, an optimiser,
  a learning rate and a number of steps; the hinge level ``gamma`` is the loss a
  freshly initialised model of the carved architecture reaches with the same
  optimiser, rate and steps on the same examples (measured once per task and draw),
  so the carve is pushed to be no better a start than a random initialisation;
- distill: ``KL(p_ref || p)`` at the answer tokens against the model as it was when
  the objective was made (a frozen copy), which keeps the full model's answers;
- repair and key_hold, with keyed embeddings (``keys > 0``, :mod:`moeguard.defense.keys`):
  the residual stream after the first MoE decoder layer must equal the frozen copy's,
  and that layer's attention must not write along any token's own key. Only that
  layer (its attention, router and experts) is trained.
- watermark: the trigger loss of :mod:`moeguard.watermark.embedding` on the full
  model and on each task's carves (needs the key, given as a ``Watermark``).

Terms with weight 0 cost nothing. The running attribution is an exponential moving
average of each task's routing frequencies, per layer, from the training batches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from moeguard.attack.selection import select_batch_experts
from moeguard.attack.students import carved_architecture, scratch_student
from moeguard.attack.teacher import answer_kl, state_distance
from moeguard.defense.attacker import ATTACKER_TRAINABLES, OPTIMISERS, simulated_attack
from moeguard.attack.canonical import first_decoder_layer
from moeguard.defense.keys import add_keys, key_leak
from moeguard.defense.keys import trainable_parameters as keyed_trainable_parameters
from moeguard.data import TaskData
from moeguard.defense.regularizers import contribution_dispersion, routing_dispersion, subset_failure
from moeguard.errors import InputError, PlanError
from moeguard.models import MoEModel, normalize_keep_sets
from moeguard.models.routing import routing_arguments
from moeguard.pruning.plans import LayerLimits, uniform_keep
from moeguard.realign.acquisition import answer_logits
from moeguard.training import lm_loss, token_cross_entropy
from moeguard.watermark.embedding import Watermark, WatermarkConfig, WatermarkEmbedding

log = logging.getLogger("moeguard.defense")

TERMS = ("dispersion", "contribution", "subset_failure", "attacker", "ntl", "distill", "repair", "key_hold", "watermark")
NTL_SUBSETS = ("random", "attribution", "search")


@dataclass
class DefenseConfig:
    """Which terms to train with, their weights, and how subsets and attackers are drawn.

    ``keep_counts`` are the subset sizes (experts kept per layer) sampled for subset
    failure and the simulated attacker; counts a layer cannot route with are
    skipped. ``margin`` (nats per answer token) sets ``gamma = L(full) + margin``.
    ``watermark_settings`` say how the watermark term trains its triggers in.
    """

    dispersion: float = 0.0
    contribution: float = 0.0
    subset_failure: float = 0.0
    attacker: float = 0.0
    watermark: float = 0.0
    margin: float = 2.0
    keep_counts: tuple[int, ...] = (2, 4, 6)
    random_subsets: int = 1
    attribution_subsets: int = 1
    attribution_decay: float = 0.9
    attacker_steps: int = 3
    attacker_lr: float = 1e-3
    attacker_trainables: str = "all"
    ntl: float = 0.0
    distill: float = 0.0
    repair: float = 0.0
    key_hold: float = 0.0
    ntl_steps: tuple[int, ...] = (2, 4, 8)
    ntl_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    ntl_optimisers: tuple[str, ...] = ("adam", "sgd")
    ntl_subsets: tuple[str, ...] = NTL_SUBSETS
    ntl_reinit: float = 0.25
    ntl_search_every: int = 50
    keys: float = 0.0
    key_dims: int = 32
    key_seed: int = 0
    watermark_settings: WatermarkConfig = WatermarkConfig()

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
        if not (self.ntl_steps and self.ntl_lrs and self.ntl_optimisers and self.ntl_subsets):
            raise InputError("the ntl attacker distribution needs steps, learning rates, optimisers and subsets.")
        if any(o not in OPTIMISERS for o in self.ntl_optimisers) or any(k not in NTL_SUBSETS for k in self.ntl_subsets):
            raise InputError(f"ntl optimisers must be among {', '.join(OPTIMISERS)} and subsets among "
                             f"{', '.join(NTL_SUBSETS)}, got {self.ntl_optimisers!r} and {self.ntl_subsets!r}.")
        if not 0 <= self.ntl_reinit <= 1 or self.ntl_search_every < 1:
            raise InputError("ntl_reinit must be a probability and ntl_search_every a positive number of steps.")
        if self.keys < 0 or ((self.repair or self.key_hold) and not self.keys):
            raise InputError("the repair and key_hold terms work on keyed embeddings: give keys > 0 (the key norm as a "
                             "multiple of an embedding row's).")

    @property
    def active_terms(self) -> list[str]:
        return [name for name in TERMS if getattr(self, name) > 0]

    def scaled(self, strength: float) -> "DefenseConfig":
        """The same configuration with every term weight multiplied by ``strength``."""
        return replace(self, **{name: getattr(self, name) * strength for name in TERMS})

    def to_dict(self) -> dict[str, Any]:
        data = {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}
        return {**data, "watermark_settings": self.watermark_settings.to_dict()}


@dataclass(frozen=True)
class DefenseMethod:
    """A named defense: the objective's term weights (before ``strength`` scales them), what it does, and the
    hardening budget it needs where it differs from :class:`moeguard.defense.harden.HardenSettings` (``harden``)."""

    name: str
    help: str
    config: DefenseConfig
    harden: dict[str, Any] = field(default_factory=dict)


# The defenses by name: entangled expert training, the simulated-attacker (non-fine-tunable)
# training of the selective fine-tuning protocol, and the expert watermark. Adding a defense
# is one entry here; names join with "+" to train several at once (e.g. entangle+watermark).
METHODS: dict[str, DefenseMethod] = {m.name: m for m in (
    DefenseMethod("entangle", "routing dispersion + contribution dispersion + subset failure",
                  DefenseConfig(dispersion=1.0, contribution=1.0, subset_failure=1.0)),
    DefenseMethod("dispersion", "routing dispersion alone", DefenseConfig(dispersion=1.0)),
    DefenseMethod("subset", "subset failure alone", DefenseConfig(subset_failure=1.0)),
    DefenseMethod("attacker", "the simulated prune-and-fine-tune attacker", DefenseConfig(attacker=1.0)),
    DefenseMethod("entangle+attacker", "entangle and the simulated attacker together",
                  DefenseConfig(dispersion=1.0, contribution=1.0, subset_failure=1.0, attacker=1.0)),
    DefenseMethod("ntl", "meta-learned non-fine-tunability over a distribution of carve-and-re-align attackers, "
                  "hinged at a random initialisation's loss, with distillation to the undefended model",
                  DefenseConfig(ntl=1.0, distill=1.0, keep_counts=(2, 4)), harden={"steps": 300}),
    DefenseMethod("keys", "keyed embeddings: per-token keys that only each token's own first-layer experts cancel",
                  DefenseConfig(keys=20.0, dispersion=1.0, repair=10.0, key_hold=1.0, distill=1.0),
                  harden={"steps": 1200, "lr": 3e-3}),
    DefenseMethod("watermark", "a keyed secret feature -> secret response rule per task, trained into every carve "
                  "of the task (needs a key)", DefenseConfig(watermark=1.0)),
)}


def method_config(method: str) -> DefenseConfig:
    """The configuration of a method name, or of several joined by "+" (each term at its largest weight)."""
    parts = [part.strip() for part in method.split("+")]
    unknown = [part for part in parts if part not in METHODS]
    if unknown or not parts:
        raise InputError(
            f"unknown defense method {method!r}; methods: {', '.join(METHODS)}, or several joined by '+' "
            "(e.g. entangle+watermark).", arguments=("method",)
        )
    if len(parts) == 1:
        return METHODS[parts[0]].config
    # Combined: each term at its largest weight; any other setting as the first method that changes it has it.
    default, changes = DefenseConfig(), {}
    for part in parts:
        config = METHODS[part].config
        for f in fields(DefenseConfig):
            value = getattr(config, f.name)
            if f.name in TERMS:
                changes[f.name] = max(changes.get(f.name, 0.0), value)
            elif value != getattr(default, f.name):
                changes.setdefault(f.name, value)
    return replace(default, **changes)


def defense_config(method: str, *, strength: float = 1.0, **overrides: Any) -> DefenseConfig:
    """The configuration of a named method, scaled by ``strength``, with field overrides."""
    if not strength > 0:
        raise InputError(f"strength must be positive, got {strength!r}.")
    return replace(method_config(method).scaled(strength), **overrides)


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The examples ``rows`` of a batch (every tensor indexed on its first axis)."""
    return {key: value.index_select(0, rows.to(value.device)) if torch.is_tensor(value) else value for key, value in batch.items()}


@dataclass
class _Recorded:
    logits: list[torch.Tensor | None]
    hidden: list[torch.Tensor | None]
    index: list[torch.Tensor | None]
    weights: list[torch.Tensor | None]
    # The first MoE decoder layer's input and output, and its MoE block's output (keyed embeddings only).
    layer_input: torch.Tensor | None = None
    layer_output: torch.Tensor | None = None
    block_output: torch.Tensor | None = None


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
    :meth:`attached`, which installs the recording hooks. The watermark term needs
    ``watermark``, the embedding of a keyed watermark into this model.
    """

    def __init__(
        self,
        moe: MoEModel,
        config: DefenseConfig,
        task_of_example: torch.Tensor,
        num_tasks: int,
        *,
        seed: int = 0,
        watermark: WatermarkEmbedding | None = None,
    ) -> None:
        if not config.active_terms:
            raise InputError(f"the defense has no active term; give at least one of {', '.join(TERMS)} a weight > 0.")
        if config.watermark and watermark is None:
            raise InputError("the watermark term needs a key and the tasks it covers: pass the `watermark` embedding of a key.",
                             arguments=("watermark",))
        self.watermark = watermark if config.watermark else None
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
        # The undefended model the distillation and repair terms hold the model to, and what the ntl term measured once.
        needs_reference = config.distill or config.repair
        self.reference = copy.deepcopy(moe.model).eval().requires_grad_(False) if needs_reference else None
        self.keyed = add_keys(moe, scale=config.keys, dims=config.key_dims, seed=config.key_seed) if config.keys else None
        self._random_init_losses: dict[tuple, float] = {}
        self._search_picks: dict[tuple[str, int, int], tuple[int, dict[int, list[int]]]] = {}
        self._steps = 0
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
        if self.keyed is not None:
            decoder = first_decoder_layer(self.moe)
            self._handles.append(decoder.register_forward_pre_hook(self._keep("layer_input", first=True), with_kwargs=True))
            self._handles.append(decoder.register_forward_hook(self._keep("layer_output")))
            self._handles.append(self.moe.layers[0].block.register_forward_hook(self._keep("block_output")))
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

    def _keep(self, name: str, *, first: bool = False):
        """A hook that records a module's first input (``first``) or its output as ``_recorded.<name>``."""
        def output_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if self._recording:
                setattr(self._recorded, name, output[0] if isinstance(output, tuple) else output)

        def input_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self._recording:
                setattr(self._recorded, name, args[0] if args else kwargs["hidden_states"])

        return input_hook if first else output_hook

    def trainable_parameters(self) -> list[torch.nn.Parameter] | None:
        """What hardening trains: everything (None), or with keyed embeddings the first MoE decoder layer only."""
        return keyed_trainable_parameters(self.moe) if self.keyed is not None else None

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
            if config.ntl:
                attack = self._ntl(batch, example_task)
                total, values["ntl"] = total + config.ntl * attack.surrogate, attack.penalty
                values["ntl_attacked_loss"] = attack.attacked_loss
            reference = self._reference_outputs(batch) if self.reference is not None else None
            if config.distill:
                term = self._distill(batch, outputs, reference.logits)
                total, values["distill"] = total + config.distill * term, term.item()
            if config.repair:
                decoder = self.moe.layers[0].decoder_layer or 0
                term = state_distance(recorded.layer_output, reference.hidden_states[decoder + 1], batch["attention_mask"])
                total, values["repair"] = total + config.repair * term, term.item()
            if config.key_hold:
                written = recorded.layer_output - recorded.block_output - recorded.layer_input
                keys = self.keyed.keys.to(written.device)[batch["input_ids"].to(written.device)]
                term = key_leak(written, keys, batch["attention_mask"])
                total, values["key_hold"] = total + config.key_hold * term, term.item()
            if self.watermark is not None:
                term, watermark_values = self.watermark()
                total, values["watermark"] = total + config.watermark * term, term.item()
                values.update(watermark_values)
        self._steps += 1
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


    # ------------------------------------------------------------ ntl and distillation
    def _draw(self, values: tuple) -> Any:
        return values[int(torch.randint(len(values), (1,), generator=self.generator))]

    def _ntl(self, batch: dict[str, torch.Tensor], example_task: torch.Tensor) -> Any:
        """One simulated attacker drawn from the configured distribution, on one task's examples of the batch."""
        config = self.config
        task, rows = self._pick_task(example_task)
        sub = select_rows(batch, rows)
        count, kind = self._draw_keep_count(), self._draw(config.ntl_subsets)
        steps, lr, optimiser = self._draw(config.ntl_steps), self._draw(config.ntl_lrs), self._draw(config.ntl_optimisers)
        keep = self._random_keep_sets(count) if kind == "random" else self._attacker_keep_sets(kind, task, count, sub)
        reinit = float(torch.rand((), generator=self.generator)) < config.ntl_reinit
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        gamma = self._random_init_loss(task, count, steps, lr, optimiser, sub)
        return simulated_attack(self.moe, sub, keep, trainables="all", steps=steps, lr=lr, gamma=gamma,
                                optimiser=optimiser, reinit_seed=seed if reinit else None)

    def _attacker_keep_sets(self, method: str, task: int, count: int, sub: dict[str, torch.Tensor]) -> dict[int, list[int]]:
        """The experts the carver's ``method`` (attribution or search) keeps on the task's examples, redone every
        ``ntl_search_every`` steps."""
        found = self._search_picks.get((method, task, count))
        if found is None or self._steps - found[0] >= self.config.ntl_search_every:
            with self.paused(), torch.no_grad():
                kept = select_batch_experts(self.moe, method, count, sub)
            found = (self._steps, dict(enumerate(kept)))
            self._search_picks[(method, task, count)] = found
        return found[1]

    def _random_init_loss(self, task: int, count: int, steps: int, lr: float, optimiser: str,
                          sub: dict[str, torch.Tensor]) -> float:
        """The loss a fresh model of the carved architecture reaches with this attacker (measured once per draw)."""
        key = (task, count, steps, lr, optimiser)
        if key not in self._random_init_losses:
            student = scratch_student(carved_architecture(self.moe, count), seed=len(self._random_init_losses))
            student.model.train()
            attack = simulated_attack(student, sub, {}, trainables="all", steps=steps, lr=lr, gamma=0.0, optimiser=optimiser)
            self._random_init_losses[key] = attack.attacked_loss
        return self._random_init_losses[key]

    @torch.no_grad()
    def _reference_outputs(self, batch: dict[str, torch.Tensor]) -> Any:
        """The frozen copy's outputs on the batch (with its hidden states when the repair term reads them)."""
        return self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=bool(self.config.repair))

    def _distill(self, batch: dict[str, torch.Tensor], outputs: Any, reference_logits: torch.Tensor) -> torch.Tensor:
        """``KL(p_ref || p)`` at the answer-predicting positions, against the model as it was at the start."""
        mask = batch["answer_mask"].to(outputs.logits.device)
        return answer_kl(answer_logits(outputs.logits, mask)[0],
                         answer_logits(reference_logits.to(outputs.logits.device), mask)[0])


class DefenseLoss:
    """The defense as an ``extra_loss`` for a training run that builds its own model.

    The objective binds to the model it first sees and installs its hooks then; that
    first step trains on the task loss alone (its forward pass ran unrecorded). Used
    to train the demo model defended from scratch (``moeguard zoo train --defense``).
    """

    def __init__(
        self,
        config: DefenseConfig,
        task_of_example: torch.Tensor,
        num_tasks: int,
        *,
        seed: int = 0,
        watermark: Watermark | None = None,
        watermark_tasks: Sequence[TaskData] = (),
    ) -> None:
        if not config.active_terms:
            raise InputError(f"the defense has no active term; give at least one of {', '.join(TERMS)} a weight > 0.")
        if config.keys or config.distill:
            raise InputError("keyed embeddings and distillation harden a trained model (moeguard harden); they have "
                             "nothing to hold on to when the model is trained from scratch.")
        if config.watermark and watermark is None:
            raise InputError("the watermark term needs a key: pass `watermark`.", arguments=("watermark",))
        self.config = config
        self.task_of_example = task_of_example
        self.num_tasks = num_tasks
        self.seed = seed
        self.watermark = watermark
        self.watermark_tasks = list(watermark_tasks)
        self.objective: DefenseObjective | None = None

    def settings(self) -> dict[str, Any]:
        """What this loss is (recorded with a training run's checkpoint)."""
        return {"defense": self.config.to_dict(), "tasks": self.num_tasks, "seed": self.seed,
                "watermark": self.watermark.identity() if self.watermark is not None else None}

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        if self.objective is None:
            if not isinstance(model, MoEModel):
                raise InputError("the defense needs the MoEModel being trained (train(moe, ...)), not a bare causal LM.")
            embedding = None
            if self.config.watermark:
                embedding = WatermarkEmbedding(model, self.watermark, self.watermark_tasks,
                                               self.config.watermark_settings, seed=self.seed)
            self.objective = DefenseObjective(model, self.config, self.task_of_example, self.num_tasks, seed=self.seed,
                                              watermark=embedding)
            self.objective.attach()
            log.info("defense terms (%s) start at the next step", ", ".join(self.config.active_terms))
            return outputs.logits.new_zeros(())
        return self.objective(model, batch, outputs)
