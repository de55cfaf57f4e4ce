"""Decision boundaries of small MLPs on 2-D toy data: the course's picture of why depth and
non-linearity matter (docs/science.md §11.6).

A net with ``depth`` hidden layers computes ``h_l = σ(W_l h_{l-1} + b_l)`` and a linear output
layer with two logits (softmax cross-entropy, docs/science.md §5.1). ``depth = 0`` is logistic
regression, whose boundary is a line. With ``activation = "identity"`` every depth collapses to a
product of matrices, i.e. again a linear model: depth buys nothing without a non-linearity.

``decision_boundary_grid`` trains one net per (depth, width) and, by default, a contrast row with
the linear model and the deepest net of the grid with the identity activation, so one figure shows
all three lessons (width, depth, non-linearity). A fourth shows up by itself: a narrow deep ReLU
net (width 2) often ends with every unit of a layer inactive on all points and predicts one class
everywhere ("dying ReLU"): a real effect of narrow ReLU nets, not a bug. Each result says where
its panel goes (``row``, ``column``), so ``decision_boundary_figure`` only draws.

Training is full-batch Adam through a real ``lightning.Trainer`` on the CPU: the nets have at most
a few thousand parameters and a few hundred points, where a GPU's launch latency costs more than
it saves, and CPU float32 makes the same seed give the same boundary bit for bit. To keep
Lightning's per-fit overhead to one ``fit`` per net, its single epoch iterates ``steps`` times over
the same full batch.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import NamedTuple, TypedDict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pipeline import third_party
from pipeline.checks import is_int
from pipeline.models.backbones import init_weights, make_activation
from pipeline.viz import figures

__all__ = [
    "BoundaryPanel",
    "TOY_ACTIVATIONS",
    "TOY_DATASETS",
    "ToyMLP",
    "decision_boundary_figure",
    "decision_boundary_grid",
    "fit_toy",
    "make_toy",
]

TOY_DATASETS: tuple[str, ...] = ("moons", "circles", "spirals")
TOY_ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "elu", "sigmoid", "tanh", "identity")
# He init (Kaiming, std = sqrt(2 / fan_in)) for ReLU-like units, Glorot for the others.
_HE_ACTIVATIONS = ("relu", "leaky_relu", "elu")
MESH_POINTS = 150  # mesh resolution per axis of the probability map
_MESH_MARGIN = 0.5  # mesh extends this far beyond the (standardized) data
_SPIRAL_TURNS = 1.25


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------- data


def _spirals(samples: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved Archimedean spirals ``r = θ / π``, the second one turned by π.

    Angles start at π/2 (near the centre the arms would touch) and are drawn with density ∝ θ,
    which spreads points evenly along the arc (arc length grows like θ²). Arms of the two classes
    are 1 apart, so ``noise`` is on the same scale as for moons.
    """
    y = np.arange(samples) % 2
    lo, hi = math.pi / 2, math.pi / 2 + 2 * math.pi * _SPIRAL_TURNS
    theta = np.sqrt(rng.uniform(lo**2, hi**2, size=samples))
    angle = theta + math.pi * y
    radius = theta / math.pi
    X = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    X += rng.normal(scale=noise, size=X.shape)
    order = rng.permutation(samples)
    return X[order], y[order]


def make_toy(name: str, samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` 2-D points (float32, each axis standardized) and int64 labels in {0, 1}.

    ``moons`` and ``circles`` (inner radius 0.5) come from scikit-learn, ``spirals`` are two
    interleaved spirals; classes are balanced (±1) and the same seed gives the same points.
    ``noise`` is the standard deviation of Gaussian noise added before standardizing.
    """
    from sklearn.datasets import make_circles, make_moons

    _require(
        name in TOY_DATASETS,
        f"toy data set {name!r} is unknown: use one of {', '.join(TOY_DATASETS)}",
    )
    _require(is_int(samples) and samples >= 4, f"samples must be an integer >= 4, got {samples!r}")
    _require(
        isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0,
        f"noise must be a finite number >= 0, got {noise!r}",
    )
    _require(is_int(seed) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    if name == "moons":
        X, y = make_moons(n_samples=samples, noise=noise, random_state=seed)
    elif name == "circles":
        X, y = make_circles(n_samples=samples, noise=noise, factor=0.5, random_state=seed)
    else:
        X, y = _spirals(samples, noise, np.random.default_rng(seed))
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return X.astype(np.float32), y.astype(np.int64)


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X), np.asarray(y)
    _require(
        X.ndim == 2 and X.shape[1] == 2 and X.shape[0] >= 2,
        f"X must be an N x 2 array of points, got shape {X.shape}",
    )
    _require(bool(np.isfinite(X).all()), "X contains NaN or inf; use make_toy's points")
    _require(
        y.shape == (X.shape[0],) and np.isin(y, (0, 1)).all(),
        f"y must hold one label in {{0, 1}} per point of X ({X.shape[0]}), got shape {y.shape}",
    )
    return X.astype(np.float32), y.astype(np.int64)


# --------------------------------------------------------------------------------------- model


class ToyMLP(L.LightningModule):
    """``depth`` x [Linear(width) -> activation] -> Linear(2), trained with full-batch Adam.

    No batch norm or dropout: the figure should show what depth, width and the activation do,
    nothing else. ``depth = 0`` is logistic regression (a linear boundary).
    """

    def __init__(
        self,
        depth: int,
        width: int,
        activation: str = "relu",
        lr: float = 0.01,
        leaky_relu_slope: float = 0.01,
    ) -> None:
        super().__init__()
        _require(is_int(depth) and depth >= 0, f"depth must be an integer >= 0, got {depth!r}")
        _require(is_int(width) and width >= 1, f"width must be an integer >= 1, got {width!r}")
        _require(
            activation in TOY_ACTIVATIONS,
            f"activation {activation!r} is unknown: use one of {', '.join(TOY_ACTIVATIONS)}",
        )
        _require(
            isinstance(lr, int | float) and math.isfinite(lr) and lr > 0,
            f"lr must be a finite number > 0, got {lr!r}",
        )
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        fan_in = 2
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width))
            act = (
                nn.Identity()
                if activation == "identity"
                else make_activation(activation, leaky_relu_slope)
            )
            layers.append(act)
            fan_in = width
        layers.append(nn.Linear(fan_in, 2))
        self.net = nn.Sequential(*layers)
        init = "he" if activation in _HE_ACTIVATIONS else "glorot"
        init_weights(self.net, init, activation, leaky_relu_slope)

    def forward(self, x: Tensor) -> Tensor:
        """The two logits of each point."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on the whole data set (every batch is the full batch)."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam at ``lr``: robust across depths and activations without tuning per net."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def probability(self, x: np.ndarray) -> np.ndarray:
        """P(class 1) for each row of ``x`` (N x 2), in eval mode."""
        self.eval()
        logits = self(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        return torch.softmax(logits, dim=1)[:, 1].numpy()


class _RepeatedBatch(Dataset):
    """The full batch, ``steps`` times: one epoch = ``steps`` optimizer steps, one fit per net."""

    def __init__(self, X: Tensor, y: Tensor, steps: int) -> None:
        self.X, self.y, self.steps = X, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.X, self.y


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (weights and biases) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _trainer() -> L.Trainer:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per net
    third_party.ignore_known_warnings()
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def fit_toy(
    X: np.ndarray,
    y: np.ndarray,
    depth: int,
    width: int,
    activation: str,
    steps: int,
    lr: float,
    seed: int,
) -> tuple[ToyMLP, float]:
    """Train one ToyMLP for ``steps`` full-batch Adam steps; return it and its train accuracy.

    The seed fixes the initial weights (the only randomness: full batch, no dropout); the
    caller's global random state is left as it was.
    """
    X, y = _check_xy(X, y)
    _require(is_int(steps) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    _require(is_int(seed) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    x_t, y_t = torch.from_numpy(X), torch.from_numpy(y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = ToyMLP(int(depth), int(width), activation, lr)
    loader = DataLoader(_RepeatedBatch(x_t, y_t, int(steps)), batch_size=None, shuffle=False)
    with warnings.catch_warnings():
        # One in-memory tensor per step: worker processes would only add start-up time.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Lightning 2.6 builds torch's deprecated LeafSpec for every batch (harmless, noisy).
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        _trainer().fit(model, train_dataloaders=loader)
    accuracy = float(((model.probability(X) > 0.5) == y).mean())
    return model, accuracy


# ------------------------------------------------------------------------------ boundary grid


def _mesh(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis coordinates of the probability map: the data's range plus a margin."""
    lo, hi = X.min(axis=0) - _MESH_MARGIN, X.max(axis=0) + _MESH_MARGIN
    return np.linspace(lo[0], hi[0], MESH_POINTS), np.linspace(lo[1], hi[1], MESH_POINTS)


class BoundaryPanel(TypedDict):
    """One panel of the decision-boundary figure: a trained net and its probability map."""

    depth: int
    width: int  # 0 for the linear model
    activation: str  # "none" for the linear model
    parameters: int
    accuracy: float  # on the training points
    grid_x: np.ndarray
    grid_y: np.ndarray
    probability: np.ndarray  # P(class 1); [i, j] is at (grid_x[j], grid_y[i])
    row: int
    column: int


class _Cell(NamedTuple):
    """One net of the grid: what it is and where its panel goes."""

    depth: int
    width: int
    activation: str
    row: int
    column: int


def _cells(depths: list[int], widths: list[int], activation: str, contrast: bool) -> list[_Cell]:
    """The nets of ``decision_boundary_grid``, in figure order (see its docstring)."""
    cells = [
        _Cell(depth, width, activation, row, column)
        for row, depth in enumerate(depths)
        for column, width in enumerate(widths[:1] if depth == 0 else widths)
    ]
    if contrast:
        row, column = len(depths), 0
        if 0 not in depths:
            cells.append(_Cell(0, 1, activation, row, column))
            column += 1
        deepest, widest = max(depths), max(widths)
        if deepest > 0:
            cells.append(_Cell(deepest, widest, "identity", row, column))
    return cells


def _panel(X: np.ndarray, model: ToyMLP, accuracy: float, cell: _Cell) -> BoundaryPanel:
    """The trained net of ``cell`` as a panel: its probability map over the data's range."""
    grid_x, grid_y = _mesh(np.asarray(X))
    xx, yy = np.meshgrid(grid_x, grid_y)
    probability = model.probability(np.stack([xx.ravel(), yy.ravel()], axis=1))
    return {
        "depth": cell.depth,
        "width": cell.width if cell.depth > 0 else 0,
        "activation": cell.activation if cell.depth > 0 else "none",
        "parameters": count_parameters(model),
        "accuracy": accuracy,
        "grid_x": grid_x,
        "grid_y": grid_y,
        "probability": probability.reshape(xx.shape),  # [i, j] is at (grid_x[j], grid_y[i])
        "row": cell.row,
        "column": cell.column,
    }


def decision_boundary_grid(
    X: np.ndarray,
    y: np.ndarray,
    depths: list[int],
    widths: list[int],
    activation: str,
    steps: int,
    lr: float,
    seed: int,
    contrast: bool = True,
) -> list[BoundaryPanel]:
    """Train one net per (depth, width) and return one dict per net, in figure order.

    Each dict: ``depth``, ``width``, ``activation``, ``parameters``, ``accuracy`` (train),
    ``grid_x``/``grid_y``/``probability`` (P(class 1) on a mesh) and its panel's ``row`` and
    ``column`` (rows = depths, columns = widths). A depth of 0 (linear: width plays no role) is
    fitted once, in the first column. ``contrast`` adds a last row with the linear model and the
    deepest net of the grid at the widest width with the identity activation (what depth gives
    without a non-linearity); the linear model is left out there when ``depths`` has 0 already.
    """
    _require(
        len(depths) > 0 and len(widths) > 0,
        "depths and widths must each list at least one "
        "value, e.g. depths [1, 2, 4] and widths [2, 8, 32]",
    )
    panels = []
    for cell in _cells(depths, widths, activation, contrast):
        model, accuracy = fit_toy(X, y, cell.depth, cell.width, cell.activation, steps, lr, seed)
        panels.append(_panel(X, model, accuracy, cell))
    return panels


def _panel_title(result: BoundaryPanel) -> str:
    if result["depth"] == 0:
        net = "linear (depth 0)"
    else:
        net = f"depth {result['depth']} · width {result['width']} · {result['activation']}"
    return f"{net}\nacc {result['accuracy']:.2f} · {result['parameters']} params"


def decision_boundary_figure(
    results: list[BoundaryPanel], X: np.ndarray, y: np.ndarray, path: Path | str, title: str
) -> Path:
    """Save the panels of ``decision_boundary_grid``: P(class 1) as filled contours on a diverging
    colormap (white at 0.5), the boundary P = 0.5 as a line, and the training points on top.

    Returns the path.
    """
    _require(len(results) > 0, "no results to draw: pass decision_boundary_grid's output")
    X, y = _check_xy(X, y)
    rows = 1 + max(r["row"] for r in results)
    columns = 1 + max(r["column"] for r in results)
    levels = np.linspace(0.0, 1.0, 11)
    with figures.figure(2.8 * columns, 2.8 * rows) as fig:
        axes = fig.subplots(rows, columns, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        filled = None
        for result in results:
            ax = axes[result["row"], result["column"]]
            ax.set_axis_on()
            grid_x, grid_y, probability = result["grid_x"], result["grid_y"], result["probability"]
            filled = ax.contourf(
                grid_x,
                grid_y,
                probability,
                levels=levels,
                cmap="RdBu_r",
                vmin=0.0,
                vmax=1.0,
                alpha=0.8,
            )
            if probability.min() < 0.5 < probability.max():
                ax.contour(
                    grid_x, grid_y, probability, levels=[0.5], colors="black", linewidths=1.0
                )
            ax.scatter(
                X[:, 0],
                X[:, 1],
                c=y,
                cmap="RdBu_r",
                vmin=0,
                vmax=1,
                s=8,
                edgecolors="black",
                linewidths=0.3,
            )
            ax.set_title(_panel_title(result), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(title)
        fig.tight_layout()
        fig.colorbar(filled, ax=axes.ravel().tolist(), shrink=0.6, label="P(class 1)")
        return figures.save(fig, path)
