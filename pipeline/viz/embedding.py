"""Embeddings of encoder features in 2-D (t-SNE, UMAP), a number for how well they separate the
classes, and the figure that shows them (docs/science.md §11.5).

Features are L2-normalized before either method: the contrastive encoders are trained on the
cosine similarity ``aᵀb / (‖a‖ ‖b‖)``, so a feature's norm carries no meaning for them, and on
unit vectors the Euclidean distance that t-SNE and UMAP use is a monotone function of that cosine
(``‖a − b‖² = 2 − 2 cos``). The same normalization is applied to every method's features (also
auto-encoder or supervised ones), so the panels of one figure are embedded the same way; the kNN
evaluation (docs/science.md §8.3) uses the cosine too. Standardizing each dimension instead
would weigh near-constant dimensions as much as informative ones.

A picture can flatter or hide structure (t-SNE's perplexity, UMAP's neighbours), so every panel
also reports ``embedding_quality``: the mean fraction of each point's k nearest 2-D neighbours
that share its class.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from pipeline.checks import is_int
from pipeline.viz import figures

__all__ = ["METHODS", "embed", "embedding_figure", "embedding_quality"]

METHODS: tuple[str, ...] = ("tsne", "umap")
METHOD_TITLES = {"tsne": "t-SNE", "umap": "UMAP"}
# Fewer points leave t-SNE's perplexity or UMAP's neighbourhood (>= 2 neighbours) empty.
MIN_POINTS = 4
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero rather than becoming NaN)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _check_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(
            f"features must be an N x D array, got shape {features.shape}; "
            "flatten each sample's features into one row"
        )
    if features.shape[0] < MIN_POINTS or features.shape[1] < 1:
        raise ValueError(
            f"features of shape {features.shape} are too few to embed: need at least "
            f"{MIN_POINTS} rows and 1 column"
        )
    if not np.issubdtype(features.dtype, np.number) or not np.isfinite(features).all():
        raise ValueError("features contain NaN, inf or non-numbers; check the encoder's output")
    return features.astype(np.float32)


def _tsne(features: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    # The usual perplexity 30 needs > 90 points; min(30, (N - 1) / 3) keeps small sets legal.
    perplexity = min(30.0, (features.shape[0] - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        features
    )


def _umap(features: np.ndarray, seed: int) -> np.ndarray:
    # Imported here: umap's import (numba compilation) takes seconds that most callers never need.
    with warnings.catch_warnings():
        # A random_state makes umap run single-threaded (that is what makes it reproducible) and
        # it warns about the n_jobs it overrides; newer scikit-learn renames an argument it uses.
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        import umap

        reducer = umap.UMAP(
            n_components=2, n_neighbors=min(15, features.shape[0] - 1), random_state=seed
        )
        return reducer.fit_transform(features)


def embed(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """``N x D`` features -> ``N x 2`` float32 points by t-SNE or UMAP, the same for the same seed.

    Features are L2-normalized first (the module doc says why). Raises ValueError for an unknown
    method or unusable features.
    """
    if method not in METHODS:
        raise ValueError(f"embedding method {method!r} is unknown: use one of {', '.join(METHODS)}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    features = _l2_normalize(_check_features(features))
    run = _tsne if method == "tsne" else _umap
    return np.asarray(run(features, int(seed)), dtype=np.float32)


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integers (one per point), got dtype {labels.dtype} and shape "
            f"{labels.shape}"
        )
    return labels


def embedding_quality(points2d: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each point's k nearest 2-D neighbours (itself excluded) with its label.

    1.0 means every neighbourhood is pure; for labels unrelated to the layout it is near chance,
    ``Σ_c p_c²`` for class frequencies ``p_c``. With fewer than ``k + 1`` points, k becomes N - 1.
    """
    from sklearn.neighbors import NearestNeighbors

    points2d = np.asarray(points2d, dtype=np.float64)
    if points2d.ndim != 2 or points2d.shape[1] != 2 or points2d.shape[0] < 2:
        raise ValueError(f"points2d must be an N x 2 array with N >= 2, got {points2d.shape}")
    if not np.isfinite(points2d).all():
        raise ValueError("points2d contain NaN or inf; check the embedding")
    labels = _check_labels(labels, points2d.shape[0])
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = min(k, points2d.shape[0] - 1)
    # kneighbors() without a query excludes each point from its own neighbours, even duplicates.
    neighbours = NearestNeighbors(n_neighbors=k).fit(points2d).kneighbors(return_distance=False)
    return float((labels[neighbours] == labels[:, None]).mean())


def _class_styles(n_classes: int) -> list[tuple[tuple[float, ...], str]]:
    """A (colour, marker) per class: tab10 up to 10 classes, tab20 up to 20, then tab20's colours
    again with other markers, so no two classes look alike."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n_classes <= 10 else "tab20"]
    size = cmap.N
    return [(cmap(c % size), _MARKERS[(c // size) % len(_MARKERS)]) for c in range(n_classes)]


def _grid_shape(n_panels: int) -> tuple[int, int]:
    columns = min(n_panels, 4 if n_panels > 6 else 3)
    return math.ceil(n_panels / columns), columns


def embedding_figure(
    panels: list[tuple[str, np.ndarray]],
    labels: np.ndarray,
    class_names: list[str],
    path: Path | str,
    title: str,
) -> Path:
    """Save a grid of 2-D scatter plots, one per ``(name, N x 2 points)`` panel, coloured by class.

    All panels show the same N points (``labels[i]`` is point i's class, an index into
    ``class_names``); each title carries the panel's ``embedding_quality`` (k = 10) so the
    picture is not the only evidence. One legend names the classes. Returns the path.
    """
    if not panels:
        raise ValueError("no panels to draw: pass at least one (name, N x 2 points) pair")
    n = panels[0][1].shape[0] if np.ndim(panels[0][1]) == 2 else -1
    labels = _check_labels(labels, n)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(
            f"labels run from {labels.min()} to {labels.max()} but there are "
            f"{len(class_names)} class names; pass one name per class index"
        )
    for name, points in panels:
        if np.shape(points) != (n, 2):
            raise ValueError(
                f"panel {name!r} has points of shape {np.shape(points)}; every panel must hold "
                f"the same {n} points as N x 2"
            )
    styles = _class_styles(len(class_names))
    rows, columns = _grid_shape(len(panels))
    with figures.figure(3.2 * columns, 3.2 * rows) as fig:
        axes = fig.subplots(rows, columns, squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_axis_off()
        for ax, (name, points) in zip(axes.flat, panels, strict=False):
            points = np.asarray(points)
            quality = embedding_quality(points, labels)
            for c, (colour, marker) in enumerate(styles):
                mine = labels == c
                ax.scatter(
                    points[mine, 0],
                    points[mine, 1],
                    s=4,
                    color=colour,
                    marker=marker,
                    linewidths=0,
                    label=class_names[c],
                )
            ax.set_title(f"{name}\n10-NN same class: {quality:.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(title)
        fig.tight_layout()
        # Below the axes: the tight bounding box that figures.save uses takes the legend in.
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(
            handles,
            names,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(len(names), 5),
            fontsize=8,
            markerscale=3,
            frameon=False,
        )
        return figures.save(fig, path)
