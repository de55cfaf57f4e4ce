"""One way to make and save a matplotlib figure, so every PNG of the report looks alike.

Figures are standalone Agg ``Figure`` objects (never pyplot), drawn under matplotlib's default
style so neither the caller's pyplot state nor a local matplotlibrc changes them, and saved
without the version stamp so the same data gives the same PNG bytes. Files are written
atomically (``pipeline.io.write_bytes``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.io import write_bytes

if TYPE_CHECKING:  # matplotlib is imported only to draw: the CLI imports the report's modules
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100


@contextlib.contextmanager
def figure(width: float, height: float) -> Iterator[Figure]:
    """A fresh Agg figure of ``width`` x ``height`` inches under the default style."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        yield fig


def save(fig: Figure, path: Path | str) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically, reproducible bytes); returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def blank(axes: Axes) -> None:
    """An axes that only shows an image: no ticks, no frame."""
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)
