"""Recovery curves: the task retained vs labels used, one line per acquisition function."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from moeguard.plotting import pyplot, save_figure
from moeguard.realign.result import RealignResult

RANDOM_STYLE = dict(color="0.35", linestyle="--", marker="x")


def _mean_band(runs: Sequence[RealignResult], measure) -> tuple[list[int], list[float], list[float], list[float]]:
    """Labels, and the mean, min and max of ``measure(round)`` over runs, round by round."""
    length = min(len(run.rounds) for run in runs)
    labels = [runs[0].rounds[i].labels for i in range(length)]
    columns = [[measure(run.rounds[i]) for run in runs] for i in range(length)]
    columns = [[v for v in column if not math.isnan(v)] or [math.nan] for column in columns]
    return labels, [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def recovery_figure(results: Mapping[str, Sequence[RealignResult]], path: str | Path, *, title: str | None = None) -> Path:
    """Two panels vs labels used: the target task's retention, and the other tasks' mean retention
    (the second only when other tasks were measured).

    ``results`` maps a label (an acquisition function) to runs that differ only by
    seed; each line is their mean with a min-max band. The dotted line marks the
    target retention (90% by default); label 0 is the pruned model before training.
    """
    plt = pyplot()
    first = next(iter(results.values()))[0]
    # Without other tasks every run's other retention is NaN: draw the target panel alone.
    has_others = any(not math.isnan(r.other_retention) for runs in results.values() for run in runs for r in run.rounds)
    figure, axes = plt.subplots(1, 2 if has_others else 1, figsize=(11 if has_others else 6, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    target = first.config.get("target_retention", 0.9)
    panels = [(axes[0], lambda r: r.retention, f"target task: {first.task} ({first.metric})")]
    if has_others:
        panels.append((axes[1], lambda r: r.other_retention, "other tasks (mean retention)"))
    for axis, measure, panel_title in panels:
        for label, runs in results.items():
            labels, mean, low, high = _mean_band(runs, measure)
            style = RANDOM_STYLE if label.split(",")[0] == "random" else dict(linestyle="-", marker="o")
            seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
            (line,) = axis.plot(labels, mean, label=f"{label}{seeds}", linewidth=1.6, **style)
            if low != high:
                axis.fill_between(labels, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        axis.axhline(1.0, color="0.7", linewidth=0.8)
        axis.axhline(target, color="0.5", linewidth=0.8, linestyle=":")
        axis.set_title(panel_title)
        # a language-modelling task's "labels" are the texts chosen for training
        axis.set_xlabel("labelled examples" if first.higher_is_better else "texts trained on")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("retained (vs unpruned model)")
    axes[0].legend(loc="lower right", fontsize=8)
    figure.suptitle(
        title or f"Re-alignment of {first.task}: unpruned {first.metric} {first.unpruned_accuracy:.2f}, "
        f"pruned {first.pruned_accuracy:.2f}",
        fontsize=10,
    )
    return save_figure(figure, Path(path))
