"""The strongest carve-and-re-align attacker, and the carver's head start over training from scratch.

- :func:`carve_and_realign`: one attack (select experts, carve a copy, re-align it on the
  full model's answers) returning the re-aligned model and its training curve;
- :func:`tune_attacker`: the strongest configuration for a task and keep count, chosen on tuning seeds;
- :func:`measure_head_start`: the attacker tuned on tuning seeds and a fresh model of the
  carved architecture tuned alike, reported on fresh seeds: ``H = C_scratch / C_carve``
  with a bootstrap interval;
- :func:`measure_labels_to_target`: the paper's regime, where the attacker pays for labels;
- :mod:`~moeguard.attack.headstart`: the math (crossing interpolation, censoring, bootstrap).
"""

from moeguard.attack.carver import CARVE_AXES, DEFAULT_CONFIGURATION, AttackTask, Carved, carve_and_realign, labelled_pool
from moeguard.attack.curves import Curve, CurvePoint, CurveSchedule, train_curve
from moeguard.attack.headstart import HeadStart, RunCost, head_start
from moeguard.attack.measure import ArmResult, HeadStartResult, HeadStartSettings, measure_head_start, tune_attacker
from moeguard.attack.selection import SELECTIONS, Selection, select_experts
from moeguard.attack.students import carve, reinit_routers, scratch_student
from moeguard.attack.tuning import Tuning, tune

__all__ = [
    "CARVE_AXES",
    "DEFAULT_CONFIGURATION",
    "SELECTIONS",
    "ArmResult",
    "AttackTask",
    "Carved",
    "Curve",
    "CurvePoint",
    "CurveSchedule",
    "HeadStart",
    "HeadStartResult",
    "HeadStartSettings",
    "RunCost",
    "Selection",
    "Tuning",
    "carve",
    "carve_and_realign",
    "head_start",
    "labelled_pool",
    "measure_head_start",
    "reinit_routers",
    "scratch_student",
    "select_experts",
    "train_curve",
    "tune",
    "tune_attacker",
]
