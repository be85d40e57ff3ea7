"""The audit's own figures: the headline per task, and the defended model against the undefended one."""

from __future__ import annotations

from pathlib import Path

from moeguard.audit.results import ModelAudit
from moeguard.attack.headstart import BOUND_MARKS
from moeguard.plotting import pyplot, save_figure


def _fractions(audit: ModelAudit) -> tuple[list[str], list[float], list[float]]:
    names = [name for name, task in audit.tasks.items() if task.skipped is None]
    return (names, [100 * audit.tasks[n].fraction_without for n in names], [100 * audit.tasks[n].fraction_with for n in names])


def headline_figure(audit: ModelAudit, target: float, path: str | Path, defended: ModelAudit | None = None) -> Path:
    """Per task: the share of experts an attacker must keep, without and with re-alignment
    (and, given ``defended``, the same on the defended model beside it). Lower is cheaper to steal."""
    plt = pyplot()
    names, without, with_realign = _fractions(audit)
    series = [("pruning alone", without, "#9ecae1"), ("pruning + re-alignment", with_realign, "#08519c")]
    if defended is not None:
        guarded = {n: t for n, t in defended.tasks.items() if t.skipped is None}
        series += [
            ("defended: pruning alone", [100 * guarded[n].fraction_without if n in guarded else float("nan") for n in names], "#fdae6b"),
            ("defended: + re-alignment", [100 * guarded[n].fraction_with if n in guarded else float("nan") for n in names], "#a63603"),
        ]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.2))
    width = 0.8 / len(series)
    for index, (label, values, colour) in enumerate(series):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(names))]
        bars = axis.bar(positions, values, width, label=label, color=colour)
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylim(0, 112)
    axis.set_ylabel("experts the attacker keeps (% of all)")
    axis.set_title(f"Smallest share of experts that keeps {target:.0%} of each task's score (lower = cheaper to carve out)",
                   fontsize=9)
    axis.legend(fontsize=8, loc="upper left", ncols=2)
    axis.grid(axis="y", alpha=0.3)
    return save_figure(figure, Path(path))


def defense_figure(comparisons: dict, path: str | Path) -> Path:
    """Labels the attacker needs per task, undefended vs defended, at the undefended attack's keep count."""
    plt = pyplot()
    rows = [c for c in comparisons.values() if c.undefended_labels is not None and c.defended_labels is not None]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.0))
    names = [c.task for c in rows]
    plain = axis.bar([i - 0.2 for i in range(len(rows))], [c.undefended_labels for c in rows], 0.4, label="undefended", color="#08519c")
    guarded = axis.bar([i + 0.2 for i in range(len(rows))], [c.defended_labels for c in rows], 0.4, label="defended", color="#a63603")
    axis.bar_label(plain, fontsize=7, padding=1)
    axis.bar_label(guarded, labels=[f"{c.defended_labels}{'+' if c.censored else ''}" for c in rows], fontsize=7, padding=1)
    axis.set_xticks(range(len(rows)), names)
    axis.set_ylabel("labels to re-align to the target")
    axis.set_title("Attack cost with and without the defense ('+': not reached within the budget, a lower bound)", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return save_figure(figure, Path(path))


def headstart_figure(audit: ModelAudit, path: str | Path, defended: ModelAudit | None = None) -> Path:
    """Per task: the carver's head start H (compute from scratch / compute to carve and re-align, with its interval),
    on the audited model and, given ``defended``, on the defended one. Above 1 the stolen weights save compute."""
    plt = pyplot()
    names = [name for name, task in audit.tasks.items() if task.headstart]
    series = [("audited", audit, "#08519c")] + ([("defended", defended, "#a63603")] if defended is not None else [])
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.0))
    width = 0.8 / len(series)
    for index, (label, model, colour) in enumerate(series):
        for position, name in enumerate(names):
            task = model.tasks.get(name)
            if task is None or not task.headstart:
                continue
            h = task.headstart["head_start"]["flops"]
            value = float(h["value"])
            low, high = (float(v) for v in h["interval"])
            x = position + (index - (len(series) - 1) / 2) * width
            axis.bar([x], [value], width, color=colour, label=label if position == 0 else None)
            axis.errorbar([x], [value], yerr=[[max(0.0, value - low)], [max(0.0, high - value)]], color="k", capsize=3)
            mark = BOUND_MARKS[h["bound"]].strip()
            cap = f"\ncap {task.headstart['scratch_compute_multiple']:g}x" if task.headstart.get("stopped_by_compute") else ""
            axis.annotate(f"{mark}{value:.1f}{cap}", (x, value), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                          textcoords="offset points")
    axis.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
    axis.axhline(2.0, color="tab:green", linewidth=0.8, linestyle="--", label="H = 2")
    axis.set_yscale("log")
    low, high = axis.get_ylim()
    axis.set_ylim(min(low, 0.8), high * 1.5)  # room above the bars for their labels
    from matplotlib.ticker import FuncFormatter

    for set_formatter in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
        set_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("head start H (FLOPs)")
    axis.set_title("Compute to train the carved architecture from scratch / to carve and re-align\n('>=': a lower "
                   "bound, scratch stopped short of the target at its step cap, or at its compute cap: 'cap Mx')",
                   fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return save_figure(figure, Path(path))
