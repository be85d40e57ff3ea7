"""The one training loop every fine-tune uses (demo model, re-alignment, defenses).

``train`` runs AdamW on ``lm_loss`` (token cross-entropy on the labelled tokens) plus
the model's router load-balancing loss and an optional ``extra_loss``, with linear
warm-up, cosine decay and gradient clipping. With a ``checkpoint`` directory (a
:class:`moeguard.runs.Run`) it saves its state every ``checkpoint_every`` steps as
safetensors + JSON (the trained parameters, the optimizer state, the RNG state, the
losses so far) and an interrupted run resumes from there with the same result as an
uninterrupted one; a checkpoint made with other settings is refused, and one of a
run that diverged is discarded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeguard.data.batching import IGNORE_INDEX, model_inputs, to_device
from moeguard.errors import InputError, TrainingDivergedError
from moeguard.eval.evaluate import causal_lm, device_of
from moeguard.runs import Run

log = logging.getLogger("moeguard.training")

ExtraLoss = Callable[[Any, dict[str, torch.Tensor], Any], torch.Tensor]
# Optional batch entry: what the batch's summed token loss is divided by instead of its own
# labelled-token count (data parallelism: a share of the whole batch's count, see realign.processes).
LOSS_NORMALISER = "loss_normaliser"
# Called after every ``evaluate_every`` optimizer steps with the number of steps done (the model in eval
# mode); returning True ends training there.
Evaluate = Callable[[int], bool | None]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, normaliser: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens.

    ``mean_{(b, t): labels[b, t+1] != -100} -log softmax(logits[b, t])[labels[b, t+1]]``
    (``logits[b, t]`` predicts token ``t + 1``); with ``normaliser`` the sum of those
    terms divided by ``normaliser`` instead of by their count.
    """
    flat_logits, flat_labels = logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    if normaliser is None:
        return nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    return nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum") / normaliser


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`token_cross_entropy` of ``model`` (an ``MoEModel`` or causal LM) on ``batch``."""
    lm = causal_lm(model)
    batch = to_device(batch, device_of(lm))
    return token_cross_entropy(lm(**model_inputs(batch)).logits, batch["labels"])


def learning_rate(step: int, *, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_ratio * lr``.

    ``lr * (step + 1) / warmup`` for ``step < warmup``, else
    ``lr * (min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2)`` with
    ``p = (step - warmup) / max(1, steps - warmup)``.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    """What a training run did. ``final_loss`` is the mean cross-entropy of the last steps;
    times include the part done before a resume."""

    steps: int
    tokens: int
    target_tokens: int
    wall_seconds: float
    cpu_seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


def _decay_groups(parameters: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    # Matrices (and expert stacks) decay; norms, biases and other vectors do not.
    decay = [p for p in parameters if p.ndim >= 2]
    keep = [p for p in parameters if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


TRAINER_STATE = "trainer.json"


def optimizer_state_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict()`` as ``(tensors, json)``: every tensor under ``optimizer.<param>.<key>``."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_tensors`."""
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in saved["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _parameters_signature(named: Mapping[str, nn.Parameter]) -> str:
    """A hash of the trained parameters' names, shapes and dtypes (which model part a checkpoint belongs to)."""
    text = "\n".join(f"{name}|{tuple(p.shape)}|{p.dtype}" for name, p in named.items())
    return hashlib.sha256(text.encode()).hexdigest()


class _Checkpoint:
    """The training state of one run in its :class:`~moeguard.runs.Run` directory."""

    def __init__(self, run: Run, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.run, self.named, self.optimizer = run, named, optimizer

    def load(self) -> dict[str, Any] | None:
        """Restore parameters, optimizer and RNG state; the step, losses, counts and times saved, or None."""
        saved = self.run.load_json(TRAINER_STATE)
        tensors = self.run.load_tensors(saved["tensors"]) if saved is not None else None
        if tensors is None:
            return None
        with torch.no_grad():
            for name, param in self.named.items():
                param.copy_(tensors[f"param.{name}"].to(device=param.device, dtype=param.dtype))
        # load_state_dict moves the moment estimates to their parameter's device and keeps "step" where it belongs.
        self.optimizer.load_state_dict(optimizer_state_from_tensors(tensors, saved["optimizer"]))
        torch.set_rng_state(tensors["rng.cpu"])
        return saved

    def save(self, step: int, losses: list[float], counts: list[int], elapsed: list[float]) -> None:
        tensors, plain = optimizer_state_to_tensors(self.optimizer.state_dict())
        tensors.update({f"param.{name}": param for name, param in self.named.items()})
        tensors["rng.cpu"] = torch.get_rng_state()
        # The tensors of each step in their own file, written first: the state file always names tensors that are
        # complete on disk, whenever the run is interrupted.
        name = f"trainer-{step:08d}.safetensors"
        self.run.save_tensors(name, tensors)
        self.run.save_json(TRAINER_STATE, {"step": step, "losses": losses, "counts": counts, "elapsed": elapsed,
                                           "optimizer": plain, "tensors": name})
        for older in self.run.path.glob("trainer-*.safetensors"):
            if older.name != name:
                older.unlink(missing_ok=True)


def _diverged(message: str, checkpoint: _Checkpoint | None, lr: float) -> TrainingDivergedError:
    if checkpoint is not None:
        checkpoint.run.remove()  # a diverged state would only diverge again: a rerun starts afresh
    return TrainingDivergedError(f"{message}; training diverged, lower the learning rate (lr={lr}).")


def _evaluated(lm: nn.Module, evaluate: Evaluate, steps_done: int) -> bool:
    """Run ``evaluate`` in eval mode without gradients; True when it asks training to stop."""
    lm.eval()
    try:
        with torch.no_grad():
            return bool(evaluate(steps_done))
    finally:
        lm.train()


def _progress_bar(steps: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc="training", unit="step", disable=None if enabled else True, dynamic_ncols=True)


def train(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    parameters: Iterable[nn.Parameter] | None = None,
    weight_decay: float = 0.0,
    warmup: int = 0,
    min_lr_ratio: float = 0.1,
    max_grad_norm: float | None = 1.0,
    router_aux_loss_coef: float = 0.0,
    extra_loss: ExtraLoss | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 200,
    checkpoint_settings: Mapping[str, Any] | None = None,
    evaluate: Evaluate | None = None,
    evaluate_every: int = 0,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps on ``batches`` (one batch per step).

    ``parameters`` limits what is trained (default: every parameter that requires a
    gradient); the others get no gradient during the run and are left untouched.
    The loss is ``lm_loss + router_aux_loss_coef * aux_loss + extra_loss(model, batch,
    outputs)``, where ``aux_loss`` is the load-balancing loss the model returns with
    ``output_router_logits=True`` (the outputs carry the hidden states when ``extra_loss``
    has a true ``needs_hidden_states``). Fewer steps are run if ``batches`` runs out.
    The model is left in eval mode.

    ``checkpoint`` is the directory of the run's saved state (see the module
    docstring). It is keyed by the optimisation settings, the trained parameters'
    names and shapes, and ``checkpoint_settings``: what the caller knows identifies
    the run (its model, data and options). A non-finite loss, or non-finite weights
    at a checkpoint, raise :class:`TrainingDivergedError` and discard the saved state.

    ``evaluate(step)`` is called after every ``evaluate_every`` steps (steps done so
    far, the model in eval mode, no gradient) and ends training there when it returns
    True (the result then counts the steps done). A resumed run calls it again for the
    steps after its checkpoint only, so measurements are the caller's to keep.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}.")
    if not lr > 0:
        raise InputError(f"lr must be positive, got {lr!r}.")
    lm = causal_lm(model)
    device = device_of(lm)
    trainable = [p for p in (parameters if parameters is not None else lm.parameters()) if p.requires_grad]
    if not trainable:
        raise InputError("nothing to train: none of the given parameters requires a gradient.")
    if evaluate is not None and (not isinstance(evaluate_every, int) or evaluate_every < 1):
        raise InputError(f"evaluate_every must be a positive integer with evaluate, got {evaluate_every!r}.",
                         arguments=("evaluate_every",))
    chosen = {id(p) for p in trainable}
    frozen = [p for p in lm.parameters() if p.requires_grad and id(p) not in chosen]
    optimizer = torch.optim.AdamW(_decay_groups(trainable, weight_decay), lr=lr, betas=(0.9, 0.95))
    names = {id(p): name for name, p in lm.named_parameters()}
    named = {names.get(id(p), f"unnamed.{i}"): p for i, p in enumerate(trainable)}
    saved_state: _Checkpoint | None = None
    if checkpoint is not None:
        settings = {
            "optimisation": {"steps": steps, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
                             "min_lr_ratio": min_lr_ratio, "max_grad_norm": max_grad_norm,
                             "router_aux_loss_coef": router_aux_loss_coef, "seed": seed},
            "parameters": _parameters_signature(named),
            **(checkpoint_settings or {}),
        }
        run = Run.open(checkpoint, "training run", settings,
                       labels={"optimisation": "optimisation settings", "parameters": "trained parameters"})
        saved_state = _Checkpoint(run, named, optimizer)

    torch.manual_seed(seed)
    start_step, losses, counts, earlier = 0, [], [0, 0], [0.0, 0.0]  # earlier: wall and CPU seconds before a resume
    state = saved_state.load() if saved_state is not None else None
    if state is not None:
        start_step, losses, counts, earlier = state["step"], state["losses"], state["counts"], state["elapsed"]
        log.info("resuming training from step %d (%s)", start_step, checkpoint)
    iterator: Iterator[dict[str, torch.Tensor]] = iter(batches)
    for _ in range(start_step):  # the batches of the finished steps, so the data order is unchanged
        next(iterator, None)

    wall, cpu = time.perf_counter(), time.process_time()
    for p in frozen:
        p.requires_grad_(False)
    lm.train()
    bar = _progress_bar(steps, start_step, progress)
    step = start_step
    try:
        for step in range(start_step, steps):
            batch = next(iterator, None)
            if batch is None:
                log.warning("the batches ran out after %d of %d steps", step, steps)
                break
            batch = to_device(batch, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps=steps, lr=lr, warmup=warmup, min_ratio=min_lr_ratio)
            aux = {"output_router_logits": True} if router_aux_loss_coef else {}
            if getattr(extra_loss, "needs_hidden_states", False):
                aux["output_hidden_states"] = True
            outputs = lm(**model_inputs(batch), **aux)
            ce = token_cross_entropy(outputs.logits, batch["labels"], batch.get(LOSS_NORMALISER))
            loss = ce
            if router_aux_loss_coef:
                if getattr(outputs, "aux_loss", None) is None:
                    raise InputError(
                        f"{type(lm).__name__} returns no router load-balancing loss (aux_loss); "
                        "train it with router_aux_loss_coef=0."
                    )
                loss = loss + router_aux_loss_coef * outputs.aux_loss
            if extra_loss is not None:
                loss = loss + extra_loss(model, batch, outputs)
            if not torch.isfinite(loss):
                raise _diverged(f"the training loss became {loss.item()} at step {step}", saved_state, lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            losses.append(ce.item())
            counts[0] += int(batch["attention_mask"].sum())
            counts[1] += int((batch["labels"] != IGNORE_INDEX).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if bar.disable and progress and (step + 1) % max(1, steps // 10) == 0:
                log.info("step %d/%d  loss %.4f", step + 1, steps, losses[-1])
            if evaluate is not None and (step + 1) % evaluate_every == 0 and _evaluated(lm, evaluate, step + 1):
                step += 1
                break
            if saved_state is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                if not all(bool(torch.isfinite(p).all()) for p in trainable):
                    raise _diverged(f"the weights became non-finite at step {step}", saved_state, lr)
                elapsed = [earlier[0] + time.perf_counter() - wall, earlier[1] + time.process_time() - cpu]
                saved_state.save(step + 1, losses, counts, elapsed)
        else:
            step = steps
    finally:
        bar.close()
        lm.eval()
        for p in frozen:
            p.requires_grad_(True)
    if saved_state is not None:
        saved_state.run.remove()
    tail = losses[-min(len(losses), 20) :]
    result = TrainResult(
        steps=step,
        tokens=counts[0],
        target_tokens=counts[1],
        wall_seconds=earlier[0] + time.perf_counter() - wall,
        cpu_seconds=earlier[1] + time.process_time() - cpu,
        final_loss=sum(tail) / len(tail) if tail else math.nan,
        losses=losses,
        resumed_from=start_step,
    )
    log.info("trained %d steps in %.1fs (final loss %.4f)", result.steps, result.wall_seconds, result.final_loss)
    return result
