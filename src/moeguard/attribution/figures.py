"""Heatmaps of attribution scores (MoE layer x expert) and of task overlap, as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from moeguard.attribution.record import Attribution
from moeguard.attribution.scores import CRITERIA, ranking_criteria, scores
from moeguard.attribution.summary import overlap
from moeguard.plotting import file_stem, pyplot, save_figure

def score_heatmap(values: torch.Tensor, title: str, path: str | Path, *, diverging: bool = False) -> Path:
    """Draw ``values [layers, experts]`` as a heatmap; non-finite cells (padding) stay blank.

    ``diverging`` centres the colour scale on 0 (for scores that can be negative).
    """
    plt = pyplot()
    data = values.to(torch.float64).clone()
    data[~torch.isfinite(data)] = float("nan")
    layers, experts = data.shape
    figure, axes = plt.subplots(figsize=(min(16, 2 + 0.25 * experts), min(12, 1.5 + 0.35 * layers)))
    if diverging:
        limit = float(data.nan_to_num(0).abs().max()) or 1.0
        image = axes.imshow(data.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    else:
        image = axes.imshow(data.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    return save_figure(figure, Path(path))


def save_heatmaps(attribution: Attribution, out_dir: str | Path, criteria: Sequence[str] | None = None) -> list[Path]:
    """One heatmap per criterion (default: every collected one but the baselines) as ``{task}_{criterion}.png``."""
    names = ranking_criteria(attribution) if criteria is None else list(criteria)
    task = attribution.task or "data"
    paths = []
    for criterion in names:
        title = f"{task} ({attribution.tokens} tokens, {attribution.samples} samples): {CRITERIA[criterion].help}"
        path = Path(out_dir) / f"{file_stem(task)}_{criterion}.png"
        paths.append(score_heatmap(scores(attribution, criterion), title, path, diverging=CRITERIA[criterion].signed))
    return paths


def overlap_heatmap(matrix: torch.Tensor, tasks: Sequence[str], title: str, path: str | Path) -> Path:
    """Draw a ``[T, T]`` task overlap matrix (e.g. mean Jaccard over layers) with its values written in."""
    plt = pyplot()
    n = len(tasks)
    figure, axes = plt.subplots(figsize=(2 + 0.8 * n, 1.5 + 0.8 * n))
    image = axes.imshow(matrix.numpy(), cmap="magma", vmin=0, vmax=1)
    axes.set_xticks(range(n), tasks, rotation=45, ha="right")
    axes.set_yticks(range(n), tasks)
    for i in range(n):
        for j in range(n):
            value = float(matrix[i, j])
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    return save_figure(figure, Path(path))


def attribution_figures(attribution: Attribution, compared: Sequence[Attribution], out_dir: str | Path) -> list[Path]:
    """:func:`save_heatmaps` of ``attribution`` and, with ``compared`` attributions of other tasks, the
    ``overlap.png`` of their top sets (Jaccard, mean over layers)."""
    paths = save_heatmaps(attribution, out_dir)
    if compared:
        tasks = [a.task or "data" for a in [attribution, *compared]]
        matrix = overlap([attribution, *compared], "frequency").mean(-1)
        paths.append(overlap_heatmap(matrix, tasks, "top-set overlap (Jaccard, mean over layers)", Path(out_dir) / "overlap.png"))
    return paths
