"""Metrics of a classifier on the test split, with bootstrap confidence intervals.

The test split is touched once, at the end (docs/science.md §2.1): everything here takes
predicted class probabilities and true labels that are already computed and only measures them.
Nothing in this module may be used to choose a hyper-parameter.

Point metrics come from torchmetrics where it has them, so they match what the training code logs;
the bootstrap recomputes the same metrics for many resamples of the test images and therefore uses
a vectorized reimplementation (checked against the point metrics in the tests): calling
torchmetrics 1000 times on 10 000 images would take minutes.

Each metric is defined once, in :data:`METRICS`: its name, how it is computed on the whole test
set and on a bootstrap resample, whether higher is better, and how it is shown. The per-seed
reports, the summaries (JSON, CSV, Markdown), the report's tables and the bootstrap all read that
registry, so a new metric is one :class:`Metric` there (and its test).

The study's answer compares two cells on the same test images: :func:`paired_difference` gives
the difference of their accuracies with a paired bootstrap interval, drawn from the same
resampling (``_resampled_sums``) as every cell's own intervals, and :func:`answer_sentence` says
what it means, for summary.md and the report alike.

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
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict

import numpy as np
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from pipeline import paths
from pipeline.checks import is_int
from pipeline.io import write_bytes

if TYPE_CHECKING:  # matplotlib is imported only to draw the figure
    from matplotlib.figure import Figure

#: Probabilities below this are clamped before the log, so NLL stays finite.
PROB_FLOOR = 1e-12
#: Rows of ``probabilities`` must sum to 1 within this (float32 softmax outputs are well inside).
ROW_SUM_TOLERANCE = 1e-3
#: Resamples per chunk in the bootstrap: bounds memory (chunk x N float64 counts) independently
#: of ``samples``. Fixed, so the random stream and hence the intervals do not depend on it.
BOOTSTRAP_CHUNK = 64
#: Decimals kept in ``evaluate``'s JSON: far below any bootstrap uncertainty, and stable bytes.
DECIMALS = 6

#: The level of every interval the study reports (per cell and paired).
LEVEL = 0.95

#: What the public functions accept as probabilities or labels: ``torch.as_tensor`` converts it.
ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


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


@dataclass(frozen=True)
class Predictions:
    """One classifier's checked test predictions: what every metric definition is given.

    One object instead of (probabilities, labels, classes, bins) lets each definition read only
    what it needs and computes what several share (the predicted class, correctness) once.
    """

    probs: torch.Tensor  # float N x K, rows sum to 1
    target: torch.Tensor  # int64 N
    num_classes: int
    ece_bins: int

    @classmethod
    def of(
        cls, probabilities: ArrayLike, labels: ArrayLike, num_classes: int, ece_bins: int = 15
    ) -> Predictions:
        """Check the inputs (see ``_as_inputs``) and wrap them."""
        probs, target = _as_inputs(probabilities, labels, num_classes)
        return cls(probs, target, num_classes, ece_bins)

    @cached_property
    def predicted(self) -> torch.Tensor:
        """The first arg-max of each row (``torch.argmax``'s tie rule)."""
        return self.probs.argmax(dim=1)

    @cached_property
    def correct(self) -> torch.Tensor:
        """1.0 where the prediction is right, else 0.0 (float64, N)."""
        return (self.predicted == self.target).double()


# --- the metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One test metric, defined once; everything that computes, summarizes or shows it reads this.

    ``point`` computes it on the whole test set. The bootstrap needs it on 1000 resamples, so the
    metric also says how: ``statistics`` gives per-image columns (N x c, float64) whose
    count-weighted sums over a resample determine it, and ``from_sums`` turns those sums
    (R x c, one row per resample) and N into the R values. A test checks the two agree.
    """

    name: str  # its key in every file: metrics/eval/<cell>.json, summary.json's test_<name>
    title: str  # in captions and headings
    meaning: str  # one sentence for a reader of the report
    higher_is_better: bool
    point: Callable[[Predictions], float]
    statistics: Callable[[Predictions], torch.Tensor]
    from_sums: Callable[[np.ndarray, int], np.ndarray]
    unit: str = "%"
    scale: float = 100.0  # shown as value x scale
    digits: int = 2

    @property
    def key(self) -> str:
        """Its key in metrics/summary.json and MLflow: ``test_accuracy``."""
        return f"test_{self.name}"

    def show(self, value: float) -> str:
        """A value as the tables show it: ``92.00`` (a percentage) or ``0.254`` (NLL)."""
        return f"{value * self.scale:.{self.digits}f}"

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values``: the largest, or the smallest where lower is better."""
        return max(values) if self.higher_is_better else min(values)


def _accuracy(p: Predictions) -> float:
    return float(MulticlassAccuracy(p.num_classes, average="micro")(p.probs, p.target))


def _error(p: Predictions) -> float:
    return 1.0 - _accuracy(p)


def _correct_column(p: Predictions) -> torch.Tensor:
    return p.correct[:, None]


def _mean_of_sums(sums: np.ndarray, n: int) -> np.ndarray:
    """A per-image quantity's mean over the resample (one column)."""
    return sums[:, 0] / n


def _error_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    return 1.0 - _mean_of_sums(sums, n)


def _macro_f1(p: Predictions) -> float:
    return float(MulticlassF1Score(p.num_classes, average="macro")(p.probs, p.target))


def _f1_columns(p: Predictions) -> torch.Tensor:
    """K columns each: true class one-hot, predicted class one-hot, correct and true class."""
    true_hot = torch.nn.functional.one_hot(p.target, p.num_classes).double()
    pred_hot = torch.nn.functional.one_hot(p.predicted, p.num_classes).double()
    return torch.cat([true_hot, pred_hot, true_hot * p.correct[:, None]], dim=1)


def _macro_f1_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    """Mean F1 over classes that occur among labels or predictions, as torchmetrics averages.

    F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + actual); a class with neither labels nor
    predictions in a resample has no F1 and is left out of the mean.
    """
    k = sums.shape[1] // 3
    actual, predicted, tp = sums[:, :k], sums[:, k : 2 * k], sums[:, 2 * k :]
    denominator = predicted + actual
    present = denominator > 0
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=1) / present.sum(axis=1)


def _per_image_nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-log p[y]`` per image in float64, probabilities clamped at ``PROB_FLOOR``."""
    picked = probs.double().gather(1, target[:, None]).squeeze(1)
    return -picked.clamp_min(PROB_FLOOR).log()


def _nll(p: Predictions) -> float:
    return float(_per_image_nll(p.probs, p.target).mean())


def _nll_column(p: Predictions) -> torch.Tensor:
    return _per_image_nll(p.probs, p.target)[:, None]


def _ece(p: Predictions) -> float:
    metric = MulticlassCalibrationError(p.num_classes, n_bins=p.ece_bins, norm="l1")
    return float(metric(p.probs, p.target))


def _confidence_bins(probs: torch.Tensor, ece_bins: int) -> torch.Tensor:
    """Bin index of each image's top confidence, exactly as torchmetrics bins it.

    Equal-width bins over [0, 1] on float32 confidences, left-closed; torchmetrics puts a
    confidence of exactly 1.0 in an extra bin of its own (index ``ece_bins``), so there are
    ``ece_bins + 1`` bins. Matching this keeps bootstrap ECE consistent with the point ECE.
    """
    confidence = probs.max(dim=1).values.float()
    edges = torch.linspace(0, 1, ece_bins + 1, dtype=confidence.dtype)
    return torch.bucketize(confidence, edges, right=True) - 1


def _ece_columns(p: Predictions) -> torch.Tensor:
    """B + 1 columns each: the top confidence if in the bin, correct if in the bin."""
    confidence = p.probs.max(dim=1).values.float().double()
    bins = torch.nn.functional.one_hot(_confidence_bins(p.probs, p.ece_bins), p.ece_bins + 1)
    bins = bins.double()
    return torch.cat([bins * confidence[:, None], bins * p.correct[:, None]], dim=1)


def _ece_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    # sum_b (n_b / n) |acc_b - conf_b| with acc_b, conf_b bin means = sum_b |sums' gap| / n
    b = sums.shape[1] // 2
    return np.abs(sums[:, b:] - sums[:, :b]).sum(axis=1) / n


#: Every point metric of the study, in the order tables and reports show them.
METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            "accuracy",
            "accuracy",
            "the share of test images classified correctly",
            higher_is_better=True,
            point=_accuracy,
            statistics=_correct_column,
            from_sums=_mean_of_sums,
        ),
        Metric(
            "error",
            "error",
            "1 - accuracy, the course's Cerr = mean(y_hat != y)",
            higher_is_better=False,
            point=_error,
            statistics=_correct_column,
            from_sums=_error_from_sums,
        ),
        Metric(
            "macro_f1",
            "macro-F1",
            "the F1 score of each class, averaged with equal weight per class, so a class the "
            "classifier neglects costs as much as a common one",
            higher_is_better=True,
            point=_macro_f1,
            statistics=_f1_columns,
            from_sums=_macro_f1_from_sums,
        ),
        Metric(
            "nll",
            "NLL",
            "the mean negative log-probability of the true class, in nats: it punishes "
            "confident mistakes, which accuracy does not see",
            higher_is_better=False,
            point=_nll,
            statistics=_nll_column,
            from_sums=_mean_of_sums,
            unit="nats",
            scale=1.0,
            digits=3,
        ),
        Metric(
            "ece",
            "ECE",
            "the expected calibration error: the gap between confidence and accuracy, "
            "averaged over equal-width confidence bins (evaluate.ece_bins)",
            higher_is_better=False,
            point=_ece,
            statistics=_ece_columns,
            from_sums=_ece_from_sums,
        ),
    )
}
POINT_METRICS = tuple(METRICS)
#: The study's headline metric: the report shows it first, the label-efficiency figure plots it,
#: and its keys keep the names they had before the other metrics were summarized.
HEADLINE = "accuracy"


def _metric(name: str) -> Metric:
    """The registered metric called ``name``; an unknown name says which exist."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}") from None


# --- point metrics -------------------------------------------------------------------------------


def point_metrics(
    probabilities: ArrayLike, labels: ArrayLike, num_classes: int, ece_bins: int = 15
) -> dict[str, float]:
    """Every metric of ``METRICS`` on the whole test set."""
    predictions = Predictions.of(probabilities, labels, num_classes, ece_bins)
    return {name: m.point(predictions) for name, m in METRICS.items()}


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
    """Percentile bootstrap interval of every metric in ``METRICS``.

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
    predictions = Predictions.of(probabilities, labels, num_classes, ece_bins)
    return _measure(predictions, samples, seed, level)[1]


def _measure(
    predictions: Predictions, samples: int, seed: int, level: float
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Point estimates and bootstrap intervals (clamped to contain them) of every metric."""
    _check_bootstrap_options(samples, level)
    if not is_int(predictions.ece_bins) or predictions.ece_bins < 1:
        raise ValueError(f"ece_bins must be an integer >= 1, got {predictions.ece_bins!r}")
    point = {name: m.point(predictions) for name, m in METRICS.items()}
    draws = _bootstrap_distributions(predictions, samples, seed)
    intervals = {name: _percentile_interval(draws[name], point[name], level) for name in METRICS}
    return point, intervals


def _check_bootstrap_options(samples: int, level: float) -> None:
    if not is_int(samples) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")


def _percentile_interval(draws: np.ndarray, point: float, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``draws``, widened where
    needed to contain ``point`` (see ``bootstrap_intervals``): every interval of the study."""
    quantiles = ((1 - level) / 2, (1 + level) / 2)
    low, high = (float(q) for q in np.quantile(draws, quantiles))
    return min(low, point), max(high, point)


def _bootstrap_distributions(
    predictions: Predictions, samples: int, seed: int
) -> dict[str, np.ndarray]:
    """``samples`` resampled values of every metric, computed chunk by chunk.

    Every metric's ``statistics`` are columns of one N x F matrix. A resample is a vector of
    per-image counts w, and w @ features yields all the sums at once: one matrix product per
    chunk of resamples, then each metric reads its own columns.
    """
    blocks = [m.statistics(predictions) for m in METRICS.values()]
    features = torch.cat(blocks, dim=1).numpy()
    n = features.shape[0]
    stacked = _resampled_sums(features, samples, seed)
    edges = np.cumsum([0] + [block.shape[1] for block in blocks])
    return {
        name: m.from_sums(stacked[:, edges[i] : edges[i + 1]], n)
        for i, (name, m) in enumerate(METRICS.items())
    }


def _resampled_sums(features: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """``samples`` x F: per resample of the N rows of ``features`` (N x F), the count-weighted
    column sums. The one random stream of every interval: ``samples`` draws of N indices from
    ``numpy.random.Generator(PCG64(seed))``, in chunks of ``BOOTSTRAP_CHUNK``. Because it
    depends only on (N, samples, seed), every cell of a study, scored on the same test split
    with the same settings, is resampled on the same index sets, which is what pairs them."""
    n = features.shape[0]
    rng = np.random.default_rng(seed)
    sums = []
    for start in range(0, samples, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, samples - start)
        indices = rng.integers(0, n, size=(size, n))
        sums.append(_resample_counts(indices, n) @ features)
    return np.concatenate(sums)


def _resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each image occurs in each resample: rows of ``indices`` -> rows of counts."""
    rows = indices.shape[0]
    flat = (indices + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


# --- paired differences --------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDifference:
    """Mean test accuracy of classifier a minus that of b (each averaged over its seeds), with
    the paired bootstrap interval of the difference."""

    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    #: a's accuracy minus b's, seed by seed (seed i of both; with split.label_draws > 1 each
    #: seed is its own labeled draw); empty when the two have different seed counts.
    per_seed: tuple[float, ...] = ()

    @property
    def holds_zero(self) -> bool:
        """Whether the interval holds 0: then the data cannot tell a from b."""
        return holds_zero(self.ci_low, self.ci_high)


def holds_zero(low: float, high: float) -> bool:
    """Whether the interval [low, high] of a difference holds 0 (a closed interval: [0, 0] of
    two identical classifiers holds it)."""
    return low <= 0.0 <= high


def per_image_correct(probabilities: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """1.0 where the classifier is right, per test image (float64, N): what pairs two
    classifiers, image by image, in ``paired_difference``."""
    return Predictions.of(probabilities, labels, num_classes).correct.numpy()


def paired_difference(
    correct_a: Sequence[np.ndarray],
    correct_b: Sequence[np.ndarray],
    samples: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> PairedDifference:
    """Accuracy of a minus accuracy of b on the same test images, with a paired percentile
    bootstrap interval (Efron & Tibshirani 1993; docs/science.md §10.7).

    ``correct_a`` and ``correct_b`` hold one ``per_image_correct`` vector per seed. Each resample
    draws N test indices once and applies them to both classifiers: a's accuracy averaged over
    its seeds minus b's, on the same images. So an image both get right, or both get wrong,
    moves neither side, and the interval measures only the images on which they disagree,
    which makes it narrower than two independent intervals when the classifiers are correlated.
    The difference of seed means equals the mean over images of ``d_i = mean_s a_si -
    mean_s b_si``, so one column through the same resampling as ``bootstrap_intervals``
    (``_resampled_sums``; the same stream for the same N, samples and seed) gives every
    replicate. Seeds are averaged, not resampled: the interval is about the test images, for
    these seeds (their spread is summary.json's ``std``). With a few labels per class the seeds'
    own differences (``per_seed``, paired seed by seed) can disagree in sign while the interval
    leaves zero out; the answer sentence then says so.
    """
    _check_bootstrap_options(samples, level)
    a, b = _seed_matrix(correct_a, "correct_a"), _seed_matrix(correct_b, "correct_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"correct_a has {a.shape[1]} test images per seed but correct_b has {b.shape[1]}: "
            "a paired difference needs both scored on the same test split"
        )
    per_image = a.mean(axis=0) - b.mean(axis=0)
    n = per_image.shape[0]
    point = float(per_image.mean())
    draws = _resampled_sums(per_image[:, None], samples, seed)[:, 0] / n
    low, high = _percentile_interval(draws, point, level)
    per_seed = tuple(a.mean(axis=1) - b.mean(axis=1)) if a.shape[0] == b.shape[0] else ()
    return PairedDifference(
        float(a.mean()), float(b.mean()), point, low, high, tuple(float(d) for d in per_seed)
    )


def _seed_matrix(correct: Sequence[np.ndarray], name: str) -> np.ndarray:
    """Seeds x N float64 from per-seed 0/1 vectors; empty, ragged or non-0/1 input is refused."""
    if len(correct) == 0:
        raise ValueError(f"{name} is empty: need the per-image correctness of at least one seed")
    lengths = {np.shape(vector) for vector in correct}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1 or next(iter(lengths))[0] == 0:
        raise ValueError(
            f"{name} must hold one non-empty vector per seed, all of the same length N, got "
            f"shapes {sorted(lengths)}"
        )
    matrix = np.stack([np.asarray(vector, dtype=np.float64) for vector in correct])
    if not np.isin(matrix, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold 0 or 1 per image (per_image_correct's output)")
    return matrix


class AnswerEntry(TypedDict):
    """The study's answer at one label budget, as metrics/summary.json's ``answer.<budget>``
    holds it: the best self-supervised (or semi-supervised) cell and the best baseline cell,
    each chosen on validation, and the paired difference of their test accuracies."""

    budget: str  # the label budget as named in files: "0.01"
    ssl_cell: str  # "<init>-<mode>"
    baseline_cell: str
    ssl_accuracy: float  # mean over seeds
    baseline_accuracy: float
    difference: float  # ssl_accuracy - baseline_accuracy
    ci_low: float  # the paired 95 % bootstrap interval of the difference
    ci_high: float
    per_seed: NotRequired[list[float]]  # the difference seed by seed (each its labeled draw)


def answer_entry(
    budget: str, ssl_cell: str, baseline_cell: str, paired: PairedDifference
) -> AnswerEntry:
    """One budget's answer, rounded like every number of the summary (``DECIMALS``)."""
    return AnswerEntry(
        budget=budget,
        ssl_cell=ssl_cell,
        baseline_cell=baseline_cell,
        ssl_accuracy=_round(paired.accuracy_a),
        baseline_accuracy=_round(paired.accuracy_b),
        difference=_round(paired.difference),
        ci_low=_round(paired.ci_low),
        ci_high=_round(paired.ci_high),
        per_seed=[_round(d) for d in paired.per_seed],
    )


def answer_sentence(entries: Sequence[AnswerEntry]) -> str:
    """The study's answer in one sentence, budget by budget in the order given: both cells'
    accuracies, the difference with its paired interval, and what it means. Where the interval
    holds zero the sentence says the two cannot be told apart; it never calls that a gain.
    summary.md and the report both show this sentence."""
    if not entries:
        return (
            "Answer: the study has no self-supervised cell or no baseline cell to compare "
            "(finetune.inits, finetune.baselines), so there is no answer."
        )
    clauses = "; with ".join(_answer_clause(entry) for entry in entries)
    return (
        "Answer: self-supervision (a pretrained encoder, or mode semi) against the best baseline "
        "(from scratch, raw pixels or PCA, labels only), both chosen on validation and scored on "
        f"test, the difference in points with its paired {LEVEL * 100:g} % bootstrap interval "
        f"over the test images (seeds averaged): with {clauses}."
    )


def _answer_clause(entry: AnswerEntry) -> str:
    ssl, base = entry["ssl_cell"], entry["baseline_cell"]
    low, high = entry["ci_low"], entry["ci_high"]
    per_seed = entry.get("per_seed") or []  # absent in summaries written before it existed
    if holds_zero(low, high):
        verdict = "the interval holds zero, so the two cannot be told apart at this budget"
    elif min(per_seed, default=0.0) < 0.0 < max(per_seed, default=0.0):
        verdict = (
            "but the seeds disagree on its sign, so at this budget it depends on which images "
            "were labeled and the test images' interval alone overstates it"
        )
    elif entry["difference"] > 0:
        verdict = f"{ssl} beats {base}"
    else:
        verdict = f"{base} beats {ssl}"
    seeds = ""
    if len(per_seed) > 1:
        seeds = " (per seed " + ", ".join(f"{100 * d:+.2f}" for d in per_seed) + ")"
    return (
        f"{_budget_phrase(entry['budget'])} {ssl} "
        f"{100 * entry['ssl_accuracy']:.2f} % vs {base} {100 * entry['baseline_accuracy']:.2f} "
        f"%: {100 * entry['difference']:+.2f} points [{100 * low:+.2f}, {100 * high:+.2f}]"
        f"{seeds}, {verdict}"
    )


# --- one report ----------------------------------------------------------------------------------


class SeedReport(TypedDict):
    """One classifier (cell and seed) on the test split: metrics/eval/<cell>.json's per seed."""

    n: int
    metrics: dict[str, float]  # every metric of METRICS, by name
    ci95: dict[str, list[float]]  # [low, high] per metric
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]


class SeedRow(SeedReport):
    """A ``SeedReport`` with the cell and seed it belongs to: what ``summarize`` aggregates."""

    init: str
    mode: str
    fraction: str  # as named in files: "0.01"
    seed: int


class SummaryCell(TypedDict):
    """One cell's statistics of one metric, as metrics/summary.json holds them."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n_seeds: int


class SummaryEntry(SummaryCell):
    """``SummaryCell`` with its cell: one element of ``summarize``'s output."""

    init: str
    mode: str
    fraction: str


#: metrics/summary.json's metrics: ``test_<metric>`` -> ``<init>-<mode>`` -> fraction key -> cell.
SummaryDocument = dict[str, dict[str, dict[str, SummaryCell]]]
#: ``summarize_all``'s output: per metric name, its summary.
Summaries = Mapping[str, Sequence[SummaryEntry]]


def evaluate(
    probabilities: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    samples: int = 1000,
    seed: int = 0,
    ece_bins: int = 15,
) -> SeedReport:
    """Everything reported for one model on the test split, as JSON-ready plain Python values.

    Numbers are rounded to ``DECIMALS`` so the JSON is byte-stable across platforms; rounding
    is monotone, so every rounded point estimate still lies inside its rounded interval.
    """
    predictions = Predictions.of(probabilities, labels, num_classes, ece_bins)
    point, intervals = _measure(predictions, samples, seed, LEVEL)
    probs, target = predictions.probs, predictions.target
    return SeedReport(
        n=int(target.shape[0]),
        metrics={name: _round(point[name]) for name in METRICS},
        ci95={name: [_round(v) for v in intervals[name]] for name in METRICS},
        per_class_accuracy=[_round(v) for v in per_class_accuracy(probs, target, num_classes)],
        confusion_matrix=confusion_matrix(probs, target, num_classes),
    )


def _round(value: float) -> float:
    return round(float(value), DECIMALS)


# --- across runs ---------------------------------------------------------------------------------


def summarize(rows: Sequence[SeedRow], metric: str = "accuracy") -> list[SummaryEntry]:
    """Aggregate one metric over seeds for every (init, mode, fraction).

    ``mean``/``std`` describe run-to-run variation (seeds: initialization, label subset, order);
    ``ci_low``/``ci_high`` average the seeds' bootstrap bounds and describe test-set sampling
    error. Both are reported because they answer different questions.
    """
    groups: dict[tuple[str, str, str], list[SeedRow]] = defaultdict(list)
    for row in rows:
        groups[(str(row["init"]), str(row["mode"]), str(row["fraction"]))].append(row)
    summary = [_summarize_group(key, members, metric) for key, members in groups.items()]
    return sorted(summary, key=_cell_order)


def summarize_all(rows: Sequence[SeedRow]) -> dict[str, list[SummaryEntry]]:
    """``summarize`` for every metric of ``METRICS``, in its order."""
    return {name: summarize(rows, name) for name in METRICS}


def _cell_order(entry: SummaryEntry) -> tuple[str, str, float]:
    return (entry["init"], entry["mode"], paths.budget_size(entry["fraction"]))


def _summarize_group(
    key: tuple[str, str, str], members: list[SeedRow], metric: str
) -> SummaryEntry:
    seeds = [member["seed"] for member in members]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs {key} (init, mode, fraction) repeat a seed: {sorted(seeds)}")
    values = np.array([float(member["metrics"][metric]) for member in members])
    bounds = np.array([[float(b) for b in member["ci95"][metric]] for member in members])
    init, mode, fraction = key
    return SummaryEntry(
        init=init,
        mode=mode,
        fraction=fraction,
        n_seeds=len(members),
        mean=float(values.mean()),
        std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        ci_low=float(bounds[:, 0].mean()),
        ci_high=float(bounds[:, 1].mean()),
    )


#: What the summaries hold per cell and metric, in the order of their columns.
STATISTICS = ("mean", "std", "ci_low", "ci_high")


def summary_document(summaries: Summaries) -> SummaryDocument:
    """metrics/summary.json: ``test_<metric>`` -> ``<init>-<mode>`` -> fraction key (no dots,
    ``0_01``) -> mean, std, ci_low, ci_high, n_seeds. DVC flattens it to one column per number,
    ``test_accuracy.scratch-linear.0_01.mean``."""
    document: SummaryDocument = {}
    for name, summary in summaries.items():
        nested: dict[str, dict[str, SummaryCell]] = {}
        for s in summary:
            cell = {k: s[k] for k in (*STATISTICS, "n_seeds")}
            nested.setdefault(f"{s['init']}-{s['mode']}", {})[paths.metric_key(s["fraction"])] = (
                cell
            )
        document[_metric(name).key] = nested
    return document


def read_summary(
    document: Mapping[str, Mapping[str, Mapping[str, SummaryCell]]],
    cells: Iterable[tuple[str, str, str | float]],
) -> dict[str, list[SummaryEntry]]:
    """``summary_document``'s inverse for the study's ``cells`` (init, mode, fraction): per
    metric, the entries ``summarize`` made. A cell the document lacks is left out (a table shows
    it as not run); a metric it lacks is an error: the file predates that metric."""
    cells = list(cells)
    summaries = {}
    for name, m in METRICS.items():
        if m.key not in document:
            raise ValueError(f"it has no {m.key!r}: it was written before {name} was summarized")
        entries = []
        for init, mode, fraction in cells:
            found = document[m.key].get(f"{init}-{mode}", {}).get(paths.metric_key(fraction))
            if found is not None:
                entry = {"init": init, "mode": mode, "fraction": paths.fraction_name(fraction)}
                entries.append({**entry, **found})
        summaries[name] = sorted(entries, key=_cell_order)
    return summaries


# --- tables --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryTable:
    """One metric's summary laid out for reading, by Markdown (``table_markdown``) and by the
    report alike: one row per (init, mode) of formatted strings (init, mode, then one cell per
    label fraction), the (row, column) of the best mean of each fraction column, and a caption
    that says how to read a cell."""

    caption: str
    header: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]]


def summary_table(
    summary: Sequence[SummaryEntry],
    fractions: Sequence[str],
    metric: str = "accuracy",
    marked: Collection[tuple[str, str, str]] = (),
) -> SummaryTable:
    """``summarize``'s output for ``metric`` as a table; ``marked`` (init, mode, fraction name)
    cells get a † (the report marks the cells whose training was cut off while improving)."""
    definition = _metric(metric)
    key = paths.fraction_name  # one spelling per budget: "0.01" or 0.01, "4pc"
    cells = {(s["init"], s["mode"], key(s["fraction"])): s for s in summary}
    models = sorted({(s["init"], s["mode"]) for s in summary})
    rows = [
        [init, mode]
        + [
            _cell(cells.get((init, mode, key(f))), definition, (init, mode, f) in marked)
            for f in fractions
        ]
        for init, mode in models
    ]
    best = set()
    for column, fraction in enumerate(fractions, start=2):
        means = {
            r: cells[(init, mode, key(fraction))]["mean"]
            for r, (init, mode) in enumerate(models)
            if (init, mode, key(fraction)) in cells
        }
        if means:
            top = definition.best(means.values())
            best |= {(r, column) for r, mean in means.items() if mean == top}
    header = ["init", "mode", *(_fraction_label(f) for f in fractions)]
    return SummaryTable(_caption(definition, summary), header, rows, best)


def _caption(definition: Metric, summary: Sequence[SummaryEntry]) -> str:
    seeds = sorted({int(s["n_seeds"]) for s in summary})
    seed_text = "/".join(str(n) for n in seeds) if seeds else "0"
    direction = "higher" if definition.higher_is_better else "lower"
    return (
        f"Test {definition.title} ({definition.unit}, {direction} is better) by label budget. "
        "Cell: mean ± std over seeds [mean of the seeds' 95 % bootstrap CI bounds]; "
        f"{seed_text} seeds per cell; — = not run."
    )


def _fraction_label(fraction: str | float) -> str:
    """'0.01' -> '1 %': fractions read more easily as percentages of the training labels;
    '4pc' -> '4 per class', 'all' -> 'all'."""
    return paths.budget_label(fraction)


def _budget_phrase(fraction: str | float) -> str:
    """A budget inside the answer's sentence: '1 % of the labels', '4 labels per class'."""
    label = _fraction_label(fraction)
    if paths.is_per_class(paths.fraction_name(fraction)):
        return "all labels" if label == "all" else label.replace(" per", " labels per")
    return f"{label} of the labels"


def _x_positions(names: Sequence[str | float]) -> dict[str, float]:
    """Where each budget sits on the figure's log x axis: a fraction at itself, k per class at
    k, and ``all`` (no finite k) one step past the largest k, four times it."""
    sizes = {paths.fraction_name(n): paths.budget_size(n) for n in names}
    finite = [v for v in sizes.values() if v != float("inf")]
    beyond = 4 * max(finite) if finite else 1.0
    return {name: (beyond if v == float("inf") else v) for name, v in sizes.items()}


def _cell(entry: SummaryCell | None, definition: Metric, marked: bool) -> str:
    if entry is None:
        return "—"
    mean, std, low, high = (definition.show(entry[k]) for k in STATISTICS)
    return f"{mean} ± {std} [{low}, {high}]" + (" †" if marked else "")


def table_markdown(table: SummaryTable) -> str:
    """One ``SummaryTable`` as its caption and a Markdown table."""
    lines = [
        table.caption,
        "",
        "| " + " | ".join(table.header) + " |",
        "|" + "---|" * len(table.header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def summary_markdown(
    summaries: Summaries, fractions: Sequence[str], answer: str | None = None
) -> str:
    """metrics/summary.md: one table per metric (``summarize_all``'s output), in its order, then
    the study's ``answer`` sentence (``answer_sentence``) when given."""
    tables = "\n".join(
        table_markdown(summary_table(summary, fractions, name))
        for name, summary in summaries.items()
    )
    return tables if answer is None else f"{tables}\n{answer}\n"


def _columns(name: str, fields: Sequence[str]) -> list[str]:
    """Column names of a metric's statistics in a wide CSV: the headline metric keeps its
    original unprefixed names (``mean``), the others are prefixed (``nll_mean``)."""
    return list(fields) if name == HEADLINE else [f"{name}_{field}" for field in fields]


def _wide(
    summaries: Summaries,
) -> list[tuple[SummaryEntry, list[SummaryEntry]]]:
    """Per cell of the headline summary, in its order: the cell and every metric's entry."""
    by_cell = {name: {_cell_order(s): s for s in summary} for name, summary in summaries.items()}
    return [
        (entry, [by_cell[name][_cell_order(entry)] for name in summaries])
        for entry in summaries[HEADLINE]
    ]


def summary_csv(summaries: Summaries) -> str:
    """metrics/summary.csv: one row per cell, init, mode, fraction, n_seeds, then each metric's
    mean, std, ci_low, ci_high (the headline's unprefixed, as before the other metrics were
    summarized); fixed number formats, so stable bytes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["init", "mode", "fraction", "n_seeds"]
    writer.writerow(header + [c for name in summaries for c in _columns(name, STATISTICS)])
    for cell, entries in _wide(summaries):
        numbers = [f"{float(entry[k]):.6f}" for entry in entries for k in STATISTICS]
        writer.writerow(
            [cell["init"], cell["mode"], cell["fraction"], int(cell["n_seeds"])] + numbers
        )
    return buffer.getvalue()


def curve_csv(summaries: Summaries) -> str:
    """metrics/label_efficiency.csv, DVC's plot: fraction, model, then per metric its mean and
    interval (``accuracy,ci_low,ci_high``, then ``nll,nll_ci_low,nll_ci_high``, ...)."""
    header = ["fraction", "model"]
    for name in summaries:
        header += [name, *_columns(name, ("ci_low", "ci_high"))]
    lines = [",".join(header)]
    for cell, entries in _wide(summaries):
        values = [f"{e[k]}" for e in entries for k in ("mean", "ci_low", "ci_high")]
        lines.append(",".join([cell["fraction"], f"{cell['init']}-{cell['mode']}", *values]))
    return "\n".join(lines) + "\n"


# --- figure --------------------------------------------------------------------------------------


def label_efficiency_figure(
    summary: Sequence[SummaryEntry], path: Path | str, metric: str = HEADLINE
) -> None:
    """Test ``metric`` (``summarize``'s output for it) against label fraction (log x), one line
    per (init, mode), CI error bars.

    Drawn on a standalone Agg figure under matplotlib's default style, so neither the caller's
    pyplot state nor a local matplotlibrc changes the picture, and saved without the version
    stamp so the same summary gives the same PNG bytes.
    """
    if not summary:
        raise ValueError("summary is empty: nothing to plot")
    definition = _metric(metric)
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        figure = Figure(figsize=(6.4, 4.8))
        FigureCanvasAgg(figure)
        _draw_label_efficiency(figure, summary, definition)
        buffer = io.BytesIO()
        figure.savefig(
            buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None}
        )
    write_bytes(Path(path), buffer.getvalue())


def _draw_label_efficiency(
    figure: Figure, summary: Sequence[SummaryEntry], definition: Metric
) -> None:
    import matplotlib

    axes = figure.add_subplot()
    where = _x_positions([e["fraction"] for e in summary])
    lines: dict[tuple[str, str], list[SummaryEntry]] = defaultdict(list)
    for entry in sorted(summary, key=_cell_order):
        lines[(entry["init"], entry["mode"])].append(entry)
    # Colour says the init, line style and marker the mode: 7 inits x 3 modes stay readable
    # where one colour per line would repeat after ten.
    inits = sorted({init for init, _ in lines})
    palette = matplotlib.colormaps["tab10" if len(inits) <= 10 else "tab20"]
    styles = {"linear": ("-", "o"), "finetune": ("--", "s"), "knn": (":", "^")}
    for (init, mode), entries in lines.items():
        x = np.array([where[paths.fraction_name(e["fraction"])] for e in entries])
        mean = np.array([e["mean"] for e in entries]) * definition.scale
        low = np.array([e["ci_low"] for e in entries]) * definition.scale
        high = np.array([e["ci_high"] for e in entries]) * definition.scale
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
    fractions = sorted(where, key=where.__getitem__)
    axes.set_xscale("log")
    axes.set_xticks([where[f] for f in fractions], [_fraction_label(f) for f in fractions])
    axes.minorticks_off()
    per_class = any(paths.is_per_class(f) for f in fractions)
    axes.set_xlabel(
        "labeled images per class" if per_class else "labeled fraction of the training set"
    )
    axes.set_ylabel(f"test {definition.title} ({definition.unit})")
    axes.set_title("Label efficiency")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
