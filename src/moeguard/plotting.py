"""Figures as files: matplotlib without a display, PNGs written atomically.

Every figure moeguard draws (heatmaps, knowledge-loss and recovery curves, the audit
and defense-evaluation figures, the forensic verdict) goes through these helpers, so
that the backend and the file format are chosen in one place.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from moeguard.io import atomic_write_bytes


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (120 dpi, tight bounding box) atomically to ``path`` and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(figure)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def file_stem(text: str) -> str:
    """A file-name-safe version of a name (a task name in a figure's file name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"
