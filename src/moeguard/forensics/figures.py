"""The verdict as a figure: suspect x parent expert similarity per layer, matches marked."""

from __future__ import annotations

import math
from pathlib import Path

from moeguard.forensics.verdict import Verdict
from moeguard.plotting import pyplot, save_figure

MAX_PANELS = 16


def plot_verdict(verdict: Verdict, path: str | Path) -> Path:
    """One heatmap per compared layer (first :data:`MAX_PANELS`): response cosine of every
    (suspect expert, parent expert) pair, significant matches circled."""
    plt = pyplot()
    layers = [lv for lv in verdict.layers if lv.status == "compared"][:MAX_PANELS]
    columns = min(4, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / columns))
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 1, 3.0 * rows + 0.6), squeeze=False, layout="constrained")
    for panel in axes.flat[len(layers):]:
        panel.axis("off")
    image = None
    for panel, lv in zip(axes.flat, layers):
        image = panel.imshow(lv.similarity, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        matched = [(m.suspect_expert, m.parent_expert) for m in lv.matches if m.parent_expert is not None]
        if matched:
            suspect, parent = zip(*matched)
            panel.scatter(parent, suspect, s=60, facecolors="none", edgecolors="black", linewidths=1.2)
        panel.set_title(f"suspect {lv.suspect_layer} / parent {lv.parent_layer}: z={lv.z:.1f}", fontsize=9)
        panel.set_xlabel("parent expert", fontsize=8)
        panel.set_ylabel("suspect expert", fontsize=8)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not layers:
        axes.flat[0].text(0.5, 0.5, verdict.reason or verdict.status, ha="center", va="center", wrap=True)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="response cosine")
    score = f"z = {verdict.z:.1f}, threshold {verdict.z_threshold:.2f}" if verdict.z is not None else "no score"
    figure.suptitle(f"{verdict.status} ({score})")
    return save_figure(figure, Path(path))
