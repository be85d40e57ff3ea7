"""The strongest carve-and-re-align attacker as function calls.

An attack configuration has five axes (:data:`CARVE_AXES`): how the experts are
chosen (``selection``: subset search, attribution on the model under attack, or
random), the learning rate, the distillation loss (``answers``: the teacher's answers;
``logits``: its answer-token distribution as well; ``hidden``: and every decoder
layer's output), whether the routers are re-initialised before training, and
whether the carve is canonicalised first (:mod:`moeguard.attack.canonical`: the
attacker who reads the defense's code; a no-op on a model without blind coordinates). The data are the full
model's own answers (:mod:`moeguard.attack.teacher`): labels cost the carver nothing.

:func:`carve_and_realign` runs one configuration: select, carve a physical copy,
optionally re-initialise its routers, train it on the teacher's data until the test
accuracy reaches the target (or for ``max_steps``), and return the re-aligned model
with its training curve and what the selection cost. :func:`labelled_pool` gives the
teacher-labelled data, :class:`AttackTask` the prompts and the test set.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.attack.canonical import fold_blind_coordinates
from moeguard.attack.curves import CURVE_FILE, Curve, CurveSchedule, check_loss, train_curve
from moeguard.attack.headstart import forward_flops
from moeguard.attack.selection import SELECTIONS, Selection, select_experts
from moeguard.attack.students import carve, reinit_routers
from moeguard.attack.teacher import check_teachable, labelled, teacher_answers
from moeguard.data import TaskData, data_signature, load_task
from moeguard.errors import InputError
from moeguard.models import MoEModel, load_moe
from moeguard.realign.state import derive_seed
from moeguard.runs import Run

log = logging.getLogger("moeguard.attack")

CARVE_AXES = ("selection", "lr", "loss", "router_reinit", "canonicalise")
# The configuration a caller without a tuned one starts from (the first value of each default grid axis).
DEFAULT_CONFIGURATION = {"selection": "search", "lr": 3e-3, "loss": "logits", "router_reinit": False, "canonicalise": False}
LABEL_CHUNK = 4096  # teacher answers are saved in chunks of this many prompts, so a larger pool reuses them


@dataclass
class AttackTask:
    """What the carver wants: a task's prompts (its answers are never read for training) and a test set."""

    name: str
    prompts: TaskData
    test: TaskData

    @classmethod
    def builtin(cls, name: str, *, prompts: int, test_size: int) -> "AttackTask":
        """A built-in task: ``prompts`` fresh prompts of its pool split (disjoint from the test split)."""
        return cls(name, load_task(name, "pool", limit=prompts), load_task(name, "test", limit=test_size))

    def signature(self) -> str:
        return data_signature((("prompts", self.prompts), ("test", self.test)))

    def check(self) -> None:
        check_teachable(self.prompts)
        check_teachable(self.test)


def labelled_pool(teacher: MoEModel, prompts: TaskData, size: int, run: Run | None = None) -> TaskData:
    """The first ``size`` prompts (all of them when fewer) with the teacher's answers, saved in ``run`` by chunks."""
    size = min(size, len(prompts))
    answers: list[Any] = []
    for start in range(0, size, LABEL_CHUNK):
        chunk = prompts.subset(range(start, min(start + LABEL_CHUNK, len(prompts))))
        compute = lambda chunk=chunk: teacher_answers(teacher, chunk)  # noqa: E731
        answers += run.get_or_compute(f"teacher/{start:08d}.json", compute) if run is not None else compute()
    source = f"answers of {teacher.fingerprint()[:12]} to {prompts.source or prompts.name}"
    return labelled(prompts.head(size), answers[:size], source)


def check_configuration(configuration: dict[str, Any]) -> None:
    missing = [axis for axis in CARVE_AXES if axis not in configuration and axis != "canonicalise"]
    if missing:
        raise InputError(f"an attack configuration needs {', '.join(missing)}.", arguments=tuple(missing))
    if configuration["selection"] not in SELECTIONS:
        raise InputError(f"unknown expert selection {configuration['selection']!r}; choose one of {', '.join(SELECTIONS)}.",
                         arguments=("selection",))
    check_loss(configuration["loss"])
    if not configuration["lr"] > 0:
        raise InputError(f"the learning rate must be positive, got {configuration['lr']!r}.", arguments=("lr",))


MODEL_DIR = "model"


@dataclass
class Carved:
    """One finished attack: the re-aligned carved model, its curve and how its experts were chosen.

    ``model`` is None when a finished run was read back from its directory without
    the model (``save_model=False``).
    """

    model: MoEModel | None
    curve: Curve
    selection: Selection


def carve_and_realign(
    moe: MoEModel,
    data: TaskData,
    test: TaskData,
    keep: int,
    configuration: dict[str, Any],
    *,
    seed: int = 0,
    target: float | None = None,
    max_steps: int = 1000,
    schedule: CurveSchedule = CurveSchedule(),
    scope: str = "all",
    search_data: TaskData | None = None,
    selection: Selection | None = None,
    out: str | Path | None = None,
    save_model: bool = False,
    progress: bool = False,
) -> Carved:
    """Carve ``moe`` to ``keep`` experts per layer and re-align the copy on ``data`` (see the module docstring).

    ``data`` are teacher-labelled examples (:func:`labelled_pool`); ``target`` is the
    test accuracy to stop at (None: train ``max_steps``). ``search_data`` (default:
    the first 64 examples of ``data``) are what the selection measures; a given
    ``selection`` is used as it is. ``moe`` is left unchanged. With ``out`` the run
    resumes from its saved state.
    """
    check_configuration(configuration)
    if selection is None:
        selection = select_experts(moe, configuration["selection"], keep, search_data=search_data or data.head(64),
                                   seed=derive_seed(seed, "selection"))
    student = carve(moe, selection.keep_sets())
    folded = 0
    if configuration.get("canonicalise"):
        folded = fold_blind_coordinates(moe, student, search_data or data.head(64))
    if configuration["router_reinit"]:
        reinit_routers(student, derive_seed(seed, "routers"))
    overhead = (forward_flops(moe.parameter_counts().active_per_token, selection.forward_tokens + folded)
                + forward_flops(student.parameter_counts().active_per_token, folded))
    saved = Path(out) / MODEL_DIR if out is not None and save_model else None
    finished = out is not None and (Path(out) / CURVE_FILE).is_file()
    curve = train_curve(
        student, moe, data, test, target=math.inf if target is None else target, lr=configuration["lr"],
        loss=configuration["loss"], seed=seed, max_steps=max_steps, schedule=schedule, scope=scope, arm="carve",
        configuration=_label(configuration), overhead_flops=overhead, out=out, progress=progress,
    )
    if not finished:
        if saved is not None:
            student.save(saved, overwrite=True)
        return Carved(student, curve, selection)
    return Carved(load_moe(saved) if saved is not None and saved.is_dir() else None, curve, selection)


def _label(configuration: dict[str, Any]) -> str:
    from moeguard.attack.tuning import configuration_label

    return configuration_label(configuration)
