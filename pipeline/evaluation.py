"""Metrics of a classifier on the test split, with bootstrap confidence intervals.

The test split is touched once, at the end (SCIENCE.md, "Data discipline"): everything here takes
predicted class probabilities and true labels that are already computed and only measures them.
Nothing in this module may be used to choose a hyper-parameter.

Point metrics come from torchmetrics where it has them, so they match what the training code logs;
the bootstrap recomputes the same metrics for many resamples of the test images and therefore uses
a vectorized reimplementation (checked against the point metrics in the tests): calling
torchmetrics 1000 times on 10 000 images would take minutes.

Conventions:
- ``probabilities`` is an N x K array whose rows sum to 1 (softmax outputs, or normalized kNN vote
  weights). The predicted class is the first arg-max of a row, as ``torch.argmax`` breaks ties, so
  kNN vote ties resolve the same way everywhere.
- ``error`` is the course's ``Cerr = mean(y_hat != y)`` and equals ``1 - accuracy``.
- ``nll`` is ``mean(-log p[y])`` with ``p`` clamped at 1e-12, so a confident mistake costs about
  27.6 nats instead of infinity.
- ``ece`` is torchmetrics' top-label L1 calibration error with equal-width confidence bins.
- ``macro_f1`` averages the per-class F1 over the classes that occur in the labels or predictions
  (torchmetrics and scikit-learn agree on this); per-class accuracy of a class that does not occur
  in the labels is 0.0 (torchmetrics' choice).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from pipeline.checks import is_int
from pipeline.io import write_bytes

POINT_METRICS = ("accuracy", "error", "macro_f1", "nll", "ece")

#: Probabilities below this are clamped before the log, so NLL stays finite.
PROB_FLOOR = 1e-12
#: Rows of ``probabilities`` must sum to 1 within this (float32 softmax outputs are well inside).
ROW_SUM_TOLERANCE = 1e-3
#: Resamples per chunk in the bootstrap: bounds memory (chunk x N float64 counts) independently
#: of ``samples``. Fixed, so the random stream and hence the intervals do not depend on it.
BOOTSTRAP_CHUNK = 64
#: Decimals kept in ``evaluate``'s JSON: far below any bootstrap uncertainty, and stable bytes.
DECIMALS = 6

ArrayLike = Any  # torch.Tensor, np.ndarray or nested sequences


# --- input checks --------------------------------------------------------------------------------


def _as_inputs(
    probabilities: ArrayLike, labels: ArrayLike, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert to (float N x K, int64 N) CPU tensors.

    Every public function goes through here, so a transposed matrix, logits instead of
    probabilities, or labels from another dataset fail loudly instead of giving a plausible number.
    """
    if not is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    probs = torch.as_tensor(probabilities).detach().cpu()
    target = torch.as_tensor(labels).detach().cpu()
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(
            f"probabilities must be N x K = N x {num_classes}, got shape {tuple(probs.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("probabilities is empty: need at least one test image")
    if not probs.is_floating_point():
        raise ValueError(f"probabilities must be floating point, got dtype {probs.dtype}")
    if target.ndim != 1 or target.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({probs.shape[0]},) to match probabilities, "
            f"got shape {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {target.dtype}")
    target = target.to(torch.int64)
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels out of range: must lie in [0, {num_classes - 1}], got min {low}, max {high}"
        )
    _check_rows_are_distributions(probs)
    return probs, target


def _check_rows_are_distributions(probs: torch.Tensor) -> None:
    """Reject logits and unnormalized scores: NLL and ECE are meaningless on them."""
    if not torch.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or infinite values")
    if (probs < 0).any() or (probs > 1).any():
        raise ValueError("probabilities must lie in [0, 1] (were logits passed instead?)")
    worst = float((probs.double().sum(dim=1) - 1).abs().max())
    if worst > ROW_SUM_TOLERANCE:
        raise ValueError(f"probabilities rows must sum to 1, worst row is off by {worst:.3g}")


# --- point metrics -------------------------------------------------------------------------------


def point_metrics(
    probabilities: ArrayLike, labels: ArrayLike, num_classes: int, ece_bins: int = 15
) -> dict[str, float]:
    """accuracy, error (= 1 - accuracy), macro_f1, nll and ece of the whole test set."""
    probs, target = _as_inputs(probabilities, labels, num_classes)
    accuracy = float(MulticlassAccuracy(num_classes, average="micro")(probs, target))
    return {
        "accuracy": accuracy,
        "error": 1.0 - accuracy,
        "macro_f1": float(MulticlassF1Score(num_classes, average="macro")(probs, target)),
        "nll": float(_per_image_nll(probs, target).mean()),
        "ece": float(
            MulticlassCalibrationError(num_classes, n_bins=ece_bins, norm="l1")(probs, target)
        ),
    }


def _per_image_nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-log p[y]`` per image in float64, probabilities clamped at ``PROB_FLOOR``."""
    picked = probs.double().gather(1, target[:, None]).squeeze(1)
    return -picked.clamp_min(PROB_FLOOR).log()


def per_class_accuracy(
    probabilities: ArrayLike, labels: ArrayLike, num_classes: int
) -> list[float]:
    """Accuracy within each true class (= per-class recall), indexed by class."""
    probs, target = _as_inputs(probabilities, labels, num_classes)
    values = MulticlassAccuracy(num_classes, average=None)(probs, target)
    return [float(v) for v in values]


def confusion_matrix(
    probabilities: ArrayLike, labels: ArrayLike, num_classes: int
) -> list[list[int]]:
    """K x K counts; row = true class, column = predicted class."""
    probs, target = _as_inputs(probabilities, labels, num_classes)
    matrix = MulticlassConfusionMatrix(num_classes)(probs, target)
    return [[int(v) for v in row] for row in matrix]


# --- bootstrap -----------------------------------------------------------------------------------


def bootstrap_intervals(
    probabilities: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    ece_bins: int = 15,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric in ``POINT_METRICS``.

    Each resample draws N test images with replacement (``numpy.random.Generator(PCG64(seed))``,
    so the same seed gives the same intervals). The interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled metric, widened where needed to contain the
    point estimate: a percentile interval need not contain it when the bootstrap distribution is
    skewed or biased. ECE is the usual culprit: resampling duplicates images, which makes bins
    noisier and the resampled ECE larger than the point ECE, so for a well-calibrated model the
    whole bootstrap distribution can lie above the point estimate (in simulations of perfectly
    calibrated 10-class models this happened in 2 or 3 of 10 test sets, at N = 500 and 10 000;
    then the ECE interval's lower bound is the point estimate itself). A reported interval that
    excludes the reported number would only confuse, so the bound is moved to the point.
    """
    probs, target = _as_inputs(probabilities, labels, num_classes)
    _check_bootstrap_options(samples, level, ece_bins)
    point = point_metrics(probs, target, num_classes, ece_bins)
    return _intervals(probs, target, num_classes, samples, seed, level, ece_bins, point)


def _check_bootstrap_options(samples: int, level: float, ece_bins: int) -> None:
    if not is_int(samples) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if not is_int(ece_bins) or ece_bins < 1:
        raise ValueError(f"ece_bins must be an integer >= 1, got {ece_bins!r}")


def _intervals(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    samples: int,
    seed: int,
    level: float,
    ece_bins: int,
    point: dict[str, float],
) -> dict[str, tuple[float, float]]:
    """Bootstrap distributions -> percentile intervals clamped to contain ``point``."""
    features = _image_features(probs, target, num_classes, ece_bins)
    draws = _bootstrap_distributions(features, num_classes, ece_bins, samples, seed)
    quantiles = ((1 - level) / 2, (1 + level) / 2)
    intervals = {}
    for name in POINT_METRICS:
        low, high = (float(q) for q in np.quantile(draws[name], quantiles))
        intervals[name] = (min(low, point[name]), max(high, point[name]))
    return intervals


def _image_features(
    probs: torch.Tensor, target: torch.Tensor, num_classes: int, ece_bins: int
) -> np.ndarray:
    """N x F matrix whose count-weighted column sums give every metric of a resample.

    Columns: correct, -log p[y], then K columns each of (true class one-hot, predicted class
    one-hot, correct and true class), then B + 1 columns each of (confidence if in bin, correct
    if in bin). A resample is a vector of per-image counts w, and w @ features yields
    all sufficient statistics at once: one matrix product per chunk of resamples.
    """
    predicted = probs.argmax(dim=1)
    correct = (predicted == target).double()
    bins = _confidence_bins(probs, ece_bins)
    confidence = probs.max(dim=1).values.float().double()
    true_hot = torch.nn.functional.one_hot(target, num_classes).double()
    pred_hot = torch.nn.functional.one_hot(predicted, num_classes).double()
    bin_hot = torch.nn.functional.one_hot(bins, ece_bins + 1).double()
    columns = [
        correct[:, None],
        _per_image_nll(probs, target)[:, None],
        true_hot,
        pred_hot,
        true_hot * correct[:, None],
        bin_hot * confidence[:, None],
        bin_hot * correct[:, None],
    ]
    return torch.cat(columns, dim=1).numpy()


def _confidence_bins(probs: torch.Tensor, ece_bins: int) -> torch.Tensor:
    """Bin index of each image's top confidence, exactly as torchmetrics bins it.

    Equal-width bins over [0, 1] on float32 confidences, left-closed; torchmetrics puts a
    confidence of exactly 1.0 in an extra bin of its own (index ``ece_bins``), so there are
    ``ece_bins + 1`` bins. Matching this keeps bootstrap ECE consistent with the point ECE.
    """
    confidence = probs.max(dim=1).values.float()
    edges = torch.linspace(0, 1, ece_bins + 1, dtype=confidence.dtype)
    return torch.bucketize(confidence, edges, right=True) - 1


def _bootstrap_distributions(
    features: np.ndarray, num_classes: int, ece_bins: int, samples: int, seed: int
) -> dict[str, np.ndarray]:
    """``samples`` resampled values of every metric, computed chunk by chunk."""
    n = features.shape[0]
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, samples, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, samples - start)
        indices = rng.integers(0, n, size=(size, n))
        stats.append(_resample_counts(indices, n) @ features)
    return _metrics_from_stats(np.concatenate(stats), n, num_classes, ece_bins)


def _resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each image occurs in each resample: rows of ``indices`` -> rows of counts."""
    rows = indices.shape[0]
    flat = (indices + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _metrics_from_stats(
    stats: np.ndarray, n: int, num_classes: int, ece_bins: int
) -> dict[str, np.ndarray]:
    """Metric values from the summed feature columns of ``_image_features`` (one row each)."""
    k, b = num_classes, ece_bins + 1
    correct, nll = stats[:, 0], stats[:, 1]
    true_count, pred_count, true_positive = (
        stats[:, 2 + i * k : 2 + (i + 1) * k] for i in range(3)
    )
    offset = 2 + 3 * k
    conf_sum, correct_sum = (stats[:, offset + i * b : offset + (i + 1) * b] for i in range(2))
    accuracy = correct / n
    return {
        "accuracy": accuracy,
        "error": 1.0 - accuracy,
        "macro_f1": _macro_f1(true_positive, pred_count, true_count),
        "nll": nll / n,
        # sum_b (n_b / n) |acc_b - conf_b| with acc_b, conf_b bin means = sum_b |sums' gap| / n
        "ece": np.abs(correct_sum - conf_sum).sum(axis=1) / n,
    }


def _macro_f1(tp: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Mean F1 over classes that occur among labels or predictions, as torchmetrics averages.

    F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + actual); a class with neither labels nor
    predictions in a resample has no F1 and is left out of the mean.
    """
    denominator = predicted + actual
    present = denominator > 0
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=1) / present.sum(axis=1)


# --- one report ----------------------------------------------------------------------------------


def evaluate(
    probabilities: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    samples: int = 1000,
    seed: int = 0,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Everything reported for one model on the test split, as JSON-ready plain Python values.

    Numbers are rounded to ``DECIMALS`` so the JSON is byte-stable across platforms; rounding
    is monotone, so every rounded point estimate still lies inside its rounded interval.
    """
    probs, target = _as_inputs(probabilities, labels, num_classes)
    _check_bootstrap_options(samples, 0.95, ece_bins)
    point = point_metrics(probs, target, num_classes, ece_bins)
    intervals = _intervals(probs, target, num_classes, samples, seed, 0.95, ece_bins, point)
    return {
        "n": int(target.shape[0]),
        "metrics": {name: _round(point[name]) for name in POINT_METRICS},
        "ci95": {name: [_round(v) for v in intervals[name]] for name in POINT_METRICS},
        "per_class_accuracy": [_round(v) for v in per_class_accuracy(probs, target, num_classes)],
        "confusion_matrix": confusion_matrix(probs, target, num_classes),
    }


def _round(value: float) -> float:
    return round(float(value), DECIMALS)


# --- across runs ---------------------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Aggregate one metric over seeds for every (init, mode, fraction).

    ``mean``/``std`` describe run-to-run variation (seeds: initialization, label subset, order);
    ``ci_low``/``ci_high`` average the seeds' bootstrap bounds and describe test-set sampling
    error. Both are reported because they answer different questions.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row["init"]), str(row["mode"]), str(row["fraction"]))].append(row)
    summary = [_summarize_group(key, members, metric) for key, members in groups.items()]
    return sorted(summary, key=lambda s: (s["init"], s["mode"], float(s["fraction"])))


def _summarize_group(
    key: tuple[str, str, str], members: list[dict[str, Any]], metric: str
) -> dict[str, Any]:
    seeds = [member["seed"] for member in members]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs {key} (init, mode, fraction) repeat a seed: {sorted(seeds)}")
    values = np.array([float(member["metrics"][metric]) for member in members])
    bounds = np.array([[float(b) for b in member["ci95"][metric]] for member in members])
    init, mode, fraction = key
    return {
        "init": init,
        "mode": mode,
        "fraction": fraction,
        "n_seeds": len(members),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "ci_low": float(bounds[:, 0].mean()),
        "ci_high": float(bounds[:, 1].mean()),
    }


_RATE_METRICS = ("accuracy", "error", "macro_f1", "ece")


def summary_markdown(
    summary: Sequence[dict[str, Any]], fractions: Sequence[str], metric: str = "accuracy"
) -> str:
    """Table: one row per (init, mode), one column per label fraction.

    ``metric`` only labels the table and picks the scale (percent for rates, raw for nll); it
    must name the metric the summary was made from.
    """
    percent = metric in _RATE_METRICS
    unit = " (%)" if percent else ""
    seeds = sorted({int(s["n_seeds"]) for s in summary})
    seed_text = "/".join(str(n) for n in seeds) if seeds else "0"
    lines = [
        f"Test {metric}{unit} by label fraction. Cell: mean ± std over seeds "
        f"[mean of the seeds' 95 % bootstrap CI bounds]; {seed_text} seeds per cell; "
        "— = not run.",
        "",
        "| init | mode | " + " | ".join(_fraction_label(f) for f in fractions) + " |",
        "|---|---|" + "---|" * len(fractions),
    ]
    cells = {(s["init"], s["mode"], float(s["fraction"])): s for s in summary}
    for init, mode in dict.fromkeys((s["init"], s["mode"]) for s in summary):
        row = [_cell(cells.get((init, mode, float(f))), percent) for f in fractions]
        lines.append(f"| {init} | {mode} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fraction_label(fraction: str | float) -> str:
    """'0.01' -> '1 %': fractions read more easily as percentages of the training labels."""
    return f"{float(fraction) * 100:g} %"


def _cell(entry: dict[str, Any] | None, percent: bool) -> str:
    if entry is None:
        return "—"
    scale, digits = (100.0, 2) if percent else (1.0, 3)
    mean, std, low, high = (entry[k] * scale for k in ("mean", "std", "ci_low", "ci_high"))
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


SUMMARY_FIELDS = ("init", "mode", "fraction", "n_seeds", "mean", "std", "ci_low", "ci_high")


def summary_csv(summary: Sequence[dict[str, Any]]) -> str:
    """CSV of ``summarize``'s output with fixed columns and number formats (stable bytes)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_FIELDS)
    for entry in summary:
        writer.writerow(
            [entry["init"], entry["mode"], entry["fraction"], int(entry["n_seeds"])]
            + [f"{float(entry[k]):.6f}" for k in ("mean", "std", "ci_low", "ci_high")]
        )
    return buffer.getvalue()


# --- figure --------------------------------------------------------------------------------------


def label_efficiency_figure(summary: Sequence[dict[str, Any]], path: Path | str) -> None:
    """Test accuracy against label fraction (log x), one line per (init, mode), CI error bars.

    Drawn on a standalone Agg figure under matplotlib's default style, so neither the caller's
    pyplot state nor a local matplotlibrc changes the picture, and saved without the version
    stamp so the same summary gives the same PNG bytes.
    """
    if not summary:
        raise ValueError("summary is empty: nothing to plot")
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        figure = Figure(figsize=(6.4, 4.8))
        FigureCanvasAgg(figure)
        _draw_label_efficiency(figure, summary)
        buffer = io.BytesIO()
        figure.savefig(
            buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None}
        )
    write_bytes(Path(path), buffer.getvalue())


def _draw_label_efficiency(figure: Any, summary: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    axes = figure.add_subplot()
    lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for entry in sorted(summary, key=lambda s: (s["init"], s["mode"], float(s["fraction"]))):
        lines[(entry["init"], entry["mode"])].append(entry)
    # Colour says the init, line style and marker the mode: 7 inits x 3 modes stay readable
    # where one colour per line would repeat after ten.
    inits = sorted({init for init, _ in lines})
    palette = matplotlib.colormaps["tab10" if len(inits) <= 10 else "tab20"]
    styles = {"linear": ("-", "o"), "finetune": ("--", "s"), "knn": (":", "^")}
    for (init, mode), entries in lines.items():
        x = np.array([float(e["fraction"]) for e in entries])
        mean = np.array([e["mean"] for e in entries]) * 100
        low = np.array([e["ci_low"] for e in entries]) * 100
        high = np.array([e["ci_high"] for e in entries]) * 100
        yerr = np.clip(np.stack([mean - low, high - mean]), 0, None)
        linestyle, marker = styles.get(mode, ("-.", "d"))
        axes.errorbar(
            x,
            mean,
            yerr=yerr,
            marker=marker,
            linestyle=linestyle,
            capsize=3,
            color=palette(inits.index(init) % palette.N),
            label=f"{init} / {mode}",
        )
    fractions = sorted({float(e["fraction"]) for e in summary})
    axes.set_xscale("log")
    axes.set_xticks(fractions, [_fraction_label(f) for f in fractions])
    axes.minorticks_off()
    axes.set_xlabel("labeled fraction of the training set")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Label efficiency")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
