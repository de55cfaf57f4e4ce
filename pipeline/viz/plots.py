"""The study's figures that are plots of numbers the other stages wrote: training curves,
confusion matrices, and grids of images (samples per class, VAE samples and reconstructions).

Each function reads nothing and decides nothing: it draws what it is given and saves a PNG with
:mod:`pipeline.viz.figures`, so the stage module stays a list of "read this, draw that".
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.viz import figures


def read_curve(path: Path) -> dict[str, np.ndarray]:
    """A curves CSV (``epoch,...``) as columns of floats; empty cells (no such monitor) are NaN."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    return {
        key: np.array([float(row[key]) if row[key] not in ("", None) else np.nan for row in rows])
        for key in rows[0]
    }


def pretrain_curves_figure(curves: Mapping[str, dict[str, np.ndarray]], path: Path) -> Path:
    """One panel per method: training loss (left axis) and the validation monitors (right).

    Small multiples rather than one crowded plot, because the methods' losses live on unrelated
    scales (NT-Xent in nats, reconstruction errors in squared pixels, the ELBO in hundreds).
    """
    names = [name for name, curve in curves.items() if curve]
    columns = min(4, max(1, len(names)))
    rows = math.ceil(len(names) / columns)
    with figures.figure(3.4 * columns, 2.6 * rows) as fig:
        for i, name in enumerate(names):
            curve = curves[name]
            axes = fig.add_subplot(rows, columns, i + 1)
            epochs = curve["epoch"]
            if np.isfinite(curve.get("train_loss", np.array([np.nan]))).any():
                axes.plot(
                    epochs, curve["train_loss"], color="tab:gray", marker=".", label="train loss"
                )
            axes.set_xlabel("epoch")
            axes.set_ylabel("train loss", color="tab:gray")
            right = axes.twinx()
            monitors = (
                ("val_knn_acc", "tab:blue", "val kNN acc"),
                ("val_probe_acc", "tab:orange", "val probe acc"),
            )
            for key, color, label in monitors:
                values = curve.get(key)
                if values is not None and np.isfinite(values).any():
                    right.plot(epochs, values, color=color, marker="o", label=label)
            right.set_ylim(0, 1)
            right.set_ylabel("accuracy")
            axes.set_title(name)
            if i == 0:
                handles = axes.get_legend_handles_labels()
                more = right.get_legend_handles_labels()
                right.legend(
                    handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="lower right"
                )
        fig.tight_layout()
        return figures.save(fig, path)


def monitors_figure(
    curve: Mapping[str, np.ndarray], columns: Sequence[str], path: Path, title: str
) -> Path:
    """A method's own per-epoch monitors (the GAN's D and G losses, D(x), D(G(z)), sample
    diversity): losses on the left axis, the quantities in [0, 1] on the right."""
    epochs = curve["epoch"]
    with figures.figure(5.0, 3.0) as fig:
        axes = fig.add_subplot(1, 1, 1)
        right = axes.twinx()
        colors = _colors(len(columns))
        for column, color in zip(columns, colors, strict=True):
            target = axes if "loss" in column else right
            target.plot(epochs, curve[column], marker=".", color=color, label=column)
        axes.set_xlabel("epoch")
        axes.set_ylabel("loss")
        right.set_ylabel("D output / diversity")
        handles = axes.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        right.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="best")
        axes.set_title(title)
        fig.tight_layout()
        return figures.save(fig, path)


def finetune_curves_figure(
    curves: Mapping[str, Mapping[str, dict[str, np.ndarray]]], path: Path
) -> Path:
    """One panel per label fraction; one validation-accuracy line per init x mode.

    ``curves[fraction]["<init>-<mode>"]`` holds the columns of ``metrics/finetune/<cell>.csv``;
    a model keeps its colour in every panel. A kNN cell has a single point (no epochs) and is
    drawn as a marker at epoch 1.
    """
    fractions = list(curves)
    models = sorted({model for cells in curves.values() for model in cells})
    colors = dict(zip(models, _colors(len(models)), strict=True))
    with figures.figure(4.6 * len(fractions), 3.8) as fig:
        for i, fraction in enumerate(fractions):
            axes = fig.add_subplot(1, len(fractions), i + 1)
            for model, curve in sorted(curves[fraction].items()):
                style = "-" if len(curve["epoch"]) > 1 else ""
                axes.plot(
                    curve["epoch"],
                    curve["val_acc"],
                    style,
                    marker="o",
                    markersize=3,
                    color=colors[model],
                    label=model,
                )
            axes.set_title(_budget_title(fraction))
            axes.set_xlabel("epoch")
            axes.set_ylabel("validation accuracy")
            axes.grid(alpha=0.3)
        handles = {}
        for axes in fig.axes:
            found, names = axes.get_legend_handles_labels()
            handles.update(zip(names, found, strict=True))
        labels = sorted(handles)
        fig.legend(
            [handles[label] for label in labels],
            labels,
            loc="upper center",
            ncol=min(6, len(labels)),
            fontsize=7,
            bbox_to_anchor=(0.5, 0.0),
        )
        fig.tight_layout()
        return figures.save(fig, path)


def confusion_figure(
    matrices: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str], path: Path
) -> Path:
    """Row-normalized confusion matrices (true class down, predicted across), counts in cells.

    Rows are normalized so a rare class is as readable as a common one; the annotation keeps the
    raw count so nothing is hidden.
    """
    n = len(matrices)
    size = 0.45 * len(class_names) + 1.6
    with figures.figure(size * n, size) as fig:
        for i, (title, matrix) in enumerate(matrices):
            matrix = np.asarray(matrix, dtype=float)
            rates = matrix / np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
            axes = fig.add_subplot(1, n, i + 1)
            axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
            ticks = range(len(class_names))
            axes.set_xticks(ticks, class_names, rotation=90, fontsize=7)
            axes.set_yticks(ticks, class_names if i == 0 else [], fontsize=7)
            axes.set_xlabel("predicted")
            if i == 0:
                axes.set_ylabel("true")
            axes.set_title(title, fontsize=9)
            if len(class_names) <= 12:
                for (r, c), count in np.ndenumerate(matrix):
                    if count:
                        axes.text(
                            c,
                            r,
                            f"{int(count)}",
                            ha="center",
                            va="center",
                            fontsize=5,
                            color="white" if rates[r, c] > 0.5 else "black",
                        )
        fig.tight_layout()
        return figures.save(fig, path)


def image_grid_figure(
    rows: Sequence[tuple[str, np.ndarray]],
    path: Path,
    title: str | None = None,
    scale: float = 0.6,
) -> Path:
    """Rows of uint8 images (``label``, N x H x W x C), the label on the left of each row."""
    columns = max((len(images) for _, images in rows), default=1)
    with figures.figure(scale * columns + 1.2, scale * len(rows) + (0.4 if title else 0)) as fig:
        grid = fig.add_gridspec(len(rows), columns, wspace=0.05, hspace=0.05)
        for r, (label, images) in enumerate(rows):
            for c in range(columns):
                axes = fig.add_subplot(grid[r, c])
                figures.blank(axes)
                if c < len(images):
                    _show(axes, images[c])
                if c == 0:
                    axes.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        if title:
            fig.suptitle(title, fontsize=10)
        return figures.save(fig, path)


def samples_per_class(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], per_class: int
) -> list[tuple[str, np.ndarray]]:
    """The first ``per_class`` images of every class (in split order), as image-grid rows."""
    return [
        (name, images[np.flatnonzero(labels == k)[:per_class]])
        for k, name in enumerate(class_names)
    ]


def _show(axes: object, image: np.ndarray) -> None:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        axes.imshow(image)


def _colors(count: int) -> list:
    """Distinct colours for up to 20 series (tab10, then tab20), cycling beyond that."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _budget_title(fraction: str) -> str:
    """A panel's title: '1 % of the labels', '4 labels per class', 'all labels'."""
    label = paths.budget_label(fraction)
    if not paths.is_per_class(fraction):
        return f"{label} of the labels"
    return "all labels" if label == "all" else label.replace(" per", " labels per")
