"""The knowledge-loss figure of a sweep: task retention vs fraction of experts kept."""

from __future__ import annotations

import math
from pathlib import Path

from moeguard.plotting import pyplot, save_figure
from moeguard.pruning.sweep import SweepResult

BASELINE_STYLES = {
    "random": dict(color="0.45", linestyle="--", marker="x"),
    "least_used": dict(color="black", linestyle=":", marker="v"),
}


def _curve(result: SweepResult, label: str, measure) -> tuple[list[float], list[float], list[float], list[float]]:
    """x, mean y, min y, max y of one label's points (several seeds average), by fraction kept."""
    by_fraction: dict[float, list[float]] = {1.0: [measure(result.full)]}  # every curve starts at the full model
    for point in result.points:
        if point.criterion == label:
            by_fraction.setdefault(point.fraction_kept, []).append(measure(point))
    xs = sorted(by_fraction)
    values = [[v for v in by_fraction[x] if not math.isnan(v)] or [math.nan] for x in xs]
    return xs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def knowledge_loss_figure(result: SweepResult, path: str | Path) -> Path:
    """Three panels: the target task's retention, the other tasks' mean retention, and the
    target task's answer loss (grey line: the full model). Retention is the share of the full
    model's score kept (of its gain over the unigram reference, for a language-modelling loss).

    One line per criterion; the random (mean over seeds, min-max band) and
    least-used baselines are drawn grey and black, dashed and dotted.
    """
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    panels = [
        (axes[0], lambda p: result.retained(p), f"target task: {result.task} ({result.metric()})",
         "retained (pruned vs full model)"),
        (axes[1], result.others_retained, f"other tasks (mean of {len(result.other_tasks)})",
         "retained (pruned vs full model)"),
        (axes[2], lambda p: math.nan if p.answer_loss is None else p.answer_loss, f"target task: {result.task}",
         "answer loss (nats per token)"),
    ]
    labels = list(dict.fromkeys(p.criterion for p in result.points))
    for axis, measure, title, ylabel in panels:
        for label in labels:
            xs, mean, low, high = _curve(result, label, measure)
            style = BASELINE_STYLES.get(label.split(":")[0], dict(linestyle="-", marker="o"))
            axis.plot(xs, mean, label=label.replace("least_used:", "least used by "), linewidth=1.6, **style)
            if low != high:
                axis.fill_between(xs, low, high, color=style.get("color", "C0"), alpha=0.15, linewidth=0)
        full = measure(result.full)
        if math.isnan(full):
            axis.text(0.5, 0.5, "undefined: the full model is\nno better than no knowledge", ha="center", va="center",
                      transform=axis.transAxes, color="0.4")
            axis.set_xlim(1.0, 0.0)
            axis.set_ylim(0.0, 1.05)
        else:
            axis.axhline(full, color="0.7", linewidth=0.8)
        axis.set_title(title)
        axis.set_ylabel(ylabel)
        axis.set_xlabel("fraction of routed experts kept")
        if not axis.xaxis_inverted():
            axis.invert_xaxis()
        axis.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    full = result.full.accuracy[result.task]
    name = Path(result.model).name if result.model else "model"
    figure.suptitle(f"Knowledge loss under expert pruning: {name}, full-model {result.metric()} on {result.task} {full:.2f}",
                    fontsize=10)
    return save_figure(figure, Path(path))
