"""Recovery curves: one panel per measured quantity, never an empty one."""

from __future__ import annotations

import math

from PIL import Image

from moeguard.realign import RealignResult, RoundRecord
from moeguard.realign.figures import recovery_figure


def _result(other: float) -> RealignResult:
    rounds = [RoundRecord(round=i, labels=8 * i, steps=10 * i, tokens=100 * i, wall_seconds=0.0, accuracy=0.2 * i,
                          retention=0.2 * i, recovery=0.2 * i, other_accuracy={}, other_retention=other) for i in range(4)]
    return RealignResult(task="reverse", mode="mask", config={"acquisition": "entropy", "target_retention": 0.9},
                         model_fingerprint="f", kept=[[0, 1]], unpruned_accuracy=1.0, unpruned_other={}, rounds=rounds,
                         labelled=[], frozen_verified=True, pool_size=64)


def test_the_other_tasks_panel_is_drawn_only_when_other_tasks_were_measured(tmp_path):
    both = recovery_figure({"entropy": [_result(0.5)], "random": [_result(0.4)]}, tmp_path / "both.png")
    alone = recovery_figure({"entropy": [_result(math.nan)]}, tmp_path / "alone.png")
    wide, narrow = Image.open(both).size[0], Image.open(alone).size[0]
    assert narrow < 0.7 * wide
