"""Behaviour of pipeline.evaluation: test-set metrics, bootstrap intervals, summaries, figure.

Point metrics are checked against scikit-learn on fixed predictions and ECE against a hand-written
loop over equal-width bins; the vectorized bootstrap is checked against recomputing the point
metrics on explicitly resampled test sets drawn from the same random stream.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from pipeline import evaluation
from pipeline.evaluation import (
    HEADLINE,
    METRICS,
    POINT_METRICS,
    Metric,
    Predictions,
    bootstrap_intervals,
    confusion_matrix,
    curve_csv,
    evaluate,
    label_efficiency_figure,
    per_class_accuracy,
    point_metrics,
    read_summary,
    summarize,
    summarize_all,
    summary_csv,
    summary_document,
    summary_markdown,
    summary_table,
)

# --- helpers -------------------------------------------------------------------------------------


def problem(n: int, k: int, seed: int, skill: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of a noisy classifier (larger ``skill`` -> more accurate)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), labels


def knn_like(n: int, k: int, votes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized vote counts: many rows are one-hot (confidence exactly 1) and ties happen."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    voted = np.where(rng.random((n, votes)) < 0.7, labels[:, None], rng.integers(0, k, (n, votes)))
    counts = np.stack([np.bincount(row, minlength=k) for row in voted]).astype(np.float64)
    return counts / votes, labels


def ece_loop(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Textbook ECE: equal-width bins of top confidence, sum of bin fraction x |acc - conf|."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence >= low) & (confidence < high)
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            total += inside.mean() * gap
    return total


# --- point metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_metrics_match_scikit_learn(seed: int) -> None:
    k = 5
    probs, labels = problem(300, k, seed, skill=1.5)
    predicted = probs.argmax(axis=1)
    got = point_metrics(probs, labels, k)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted), abs=1e-6)
    assert got["macro_f1"] == pytest.approx(
        skm.f1_score(labels, predicted, average="macro"), abs=1e-6
    )
    assert got["nll"] == pytest.approx(skm.log_loss(labels, probs, labels=range(k)), abs=1e-9)
    assert got["ece"] == pytest.approx(ece_loop(probs, labels, 15), abs=1e-6)
    assert (
        confusion_matrix(probs, labels, k)
        == skm.confusion_matrix(labels, predicted, labels=range(k)).tolist()
    )
    recall = skm.recall_score(labels, predicted, labels=range(k), average=None, zero_division=0)
    assert per_class_accuracy(probs, labels, k) == pytest.approx(recall, abs=1e-6)


def test_error_is_one_minus_accuracy() -> None:
    probs, labels = problem(101, 3, seed=4)
    got = point_metrics(probs, labels, 3)
    cerr = float(np.mean(probs.argmax(axis=1) != labels))
    assert got["error"] == pytest.approx(1 - got["accuracy"], abs=1e-12)
    assert got["error"] == pytest.approx(cerr, abs=1e-6)


def test_ece_on_a_hand_made_example() -> None:
    # 5 bins of width 0.2; confidences chosen away from the bin edges.
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # conf 0.90, correct  -> bin 4
            [0.10, 0.85, 0.05],  # conf 0.85, wrong    -> bin 4
            [0.70, 0.20, 0.10],  # conf 0.70, correct  -> bin 3
            [0.45, 0.35, 0.20],  # conf 0.45, wrong    -> bin 2
            [0.25, 0.50, 0.25],  # conf 0.50, correct  -> bin 2
            [0.20, 0.15, 0.65],  # conf 0.65, correct  -> bin 3
        ]
    )
    labels = np.array([0, 0, 0, 1, 1, 2])
    # bin 4: |0.5 - 0.875| * 2/6; bin 3: |1 - 0.675| * 2/6; bin 2: |0.5 - 0.475| * 2/6
    expected = (0.375 + 0.325 + 0.025) * 2 / 6
    assert ece_loop(probs, labels, 5) == pytest.approx(expected)
    assert point_metrics(probs, labels, 3, ece_bins=5)["ece"] == pytest.approx(expected, abs=1e-6)


def test_nll_is_finite_for_a_confident_mistake() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = point_metrics(probs, np.array([1, 1]), 2)
    assert got["nll"] == pytest.approx(-math.log(1e-12) / 2)


def test_macro_f1_skips_classes_never_seen_like_scikit_learn() -> None:
    # class 3 occurs neither in the labels nor in the predictions
    probs, labels = problem(200, 3, seed=5)
    probs = np.hstack([probs, np.zeros((200, 1))])
    predicted = probs.argmax(axis=1)
    got = point_metrics(probs, labels, 4)["macro_f1"]
    assert got == pytest.approx(skm.f1_score(labels, predicted, average="macro"), abs=1e-6)


def test_ties_go_to_the_first_class() -> None:
    probs = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert confusion_matrix(probs, np.array([0, 1]), 2) == [[1, 0], [1, 0]]


# --- bootstrap -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [problem(150, 4, seed=6), knn_like(150, 4, votes=5, seed=7), problem(40, 3, 8, skill=0.3)],
    ids=["softmax", "knn-votes", "tiny-weak"],
)
def test_vectorized_bootstrap_equals_recomputing_on_resamples(data: tuple) -> None:
    probs, labels = data
    k = probs.shape[1]
    samples, seed, n = 5, 3, len(labels)
    draws = evaluation._bootstrap_distributions(Predictions.of(probs, labels, k), samples, seed)
    indices = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    for row, index in enumerate(indices):
        expected = point_metrics(probs[index], labels[index], k)
        for name in METRICS:
            assert draws[name][row] == pytest.approx(expected[name], abs=1e-6), name


def test_bootstrap_is_reproducible_and_depends_on_the_seed() -> None:
    probs, labels = problem(500, 4, seed=9)
    first = bootstrap_intervals(probs, labels, 4, samples=200, seed=1)
    assert bootstrap_intervals(probs, labels, 4, samples=200, seed=1) == first
    other = bootstrap_intervals(probs, labels, 4, samples=200, seed=2)
    assert other != first
    assert other["nll"] != first["nll"]


@pytest.mark.parametrize(
    "data",
    [
        problem(30, 3, seed=10),
        problem(200, 10, seed=11, skill=0.5),
        problem(1000, 4, seed=12, skill=4.0),
        knn_like(80, 5, votes=3, seed=13),
        knn_like(300, 2, votes=1, seed=14),
    ],
)
def test_every_interval_contains_its_point_estimate(data: tuple) -> None:
    probs, labels = data
    k = probs.shape[1]
    point = point_metrics(probs, labels, k)
    intervals = bootstrap_intervals(probs, labels, k, samples=300, seed=0)
    assert set(intervals) == set(POINT_METRICS)
    for name in POINT_METRICS:
        low, high = intervals[name]
        assert low <= point[name] <= high, (name, low, point[name], high)
        assert low < high, name  # none of these problems is degenerate


def test_larger_test_set_gives_narrower_accuracy_interval() -> None:
    small = bootstrap_intervals(*problem(200, 5, seed=15), 5, samples=500)
    large = bootstrap_intervals(*problem(5000, 5, seed=15), 5, samples=500)
    width = {
        name: ci["accuracy"][1] - ci["accuracy"][0] for name, ci in [("s", small), ("l", large)]
    }
    assert width["l"] < width["s"] / 2  # sqrt(25) = 5 times narrower in theory


def test_perfect_classifier_has_degenerate_intervals() -> None:
    labels = np.arange(60) % 3
    probs = np.eye(3)[labels]
    intervals = bootstrap_intervals(probs, labels, 3, samples=100)
    assert intervals["accuracy"] == (1.0, 1.0)
    assert intervals["error"] == (0.0, 0.0)
    assert intervals["macro_f1"] == (1.0, 1.0)
    assert intervals["ece"] == (0.0, 0.0)
    assert intervals["nll"][1] == pytest.approx(0.0, abs=1e-12)


def test_interval_is_wider_at_a_higher_level() -> None:
    probs, labels = problem(300, 4, seed=16)
    narrow = bootstrap_intervals(probs, labels, 4, samples=400, level=0.5)["nll"]
    wide = bootstrap_intervals(probs, labels, 4, samples=400, level=0.99)["nll"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bootstrap_is_fast_enough_for_a_full_test_split() -> None:
    probs, labels = problem(10_000, 10, seed=17)
    start = time.perf_counter()
    bootstrap_intervals(probs.astype(np.float32), labels, 10, samples=1000)
    # about 1 s here; calling torchmetrics per resample would take minutes
    assert time.perf_counter() - start < 10


# --- evaluate ------------------------------------------------------------------------------------


def test_evaluate_report_is_plain_rounded_json() -> None:
    probs, labels = problem(250, 4, seed=18)
    report = evaluate(
        torch.tensor(probs, dtype=torch.float32), torch.tensor(labels), 4, samples=200
    )
    assert json.loads(json.dumps(report)) == report
    assert report["n"] == 250
    assert set(report["metrics"]) == set(report["ci95"]) == set(POINT_METRICS)
    for name, value in report["metrics"].items():
        low, high = report["ci95"][name]
        assert type(value) is float and low <= value <= high
        assert round(value, 6) == value
    assert len(report["per_class_accuracy"]) == 4
    matrix = report["confusion_matrix"]
    assert sum(map(sum, matrix)) == 250 and all(type(v) is int for row in matrix for v in row)
    assert report == evaluate(probs, labels, 4, samples=200)  # float32 or float64, same report


# --- input checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.full(4, 0.5), np.zeros(4, int), "N x K"),
        (np.full((4, 3), 1 / 3), np.zeros(4, int), "N x K"),
        (np.full((4, 2), 0.5), np.zeros(3, int), "labels must have shape"),
        (np.full((4, 2), 0.5), np.zeros((4, 1), int), "labels must have shape"),
        (np.full((4, 2), 0.5), np.array([0, 1, 2, 0]), "labels out of range"),
        (np.full((4, 2), 0.5), np.array([0, -1, 1, 0]), "labels out of range"),
        (np.full((4, 2), 0.5), np.zeros(4), "labels must be integers"),
        (np.zeros((0, 2)), np.zeros(0, int), "empty"),
        (np.array([[2.0, -1.0]]), np.zeros(1, int), "logits"),
        (np.array([[0.2, 0.2]]), np.zeros(1, int), "sum to 1"),
        (np.array([[np.nan, 0.5]]), np.zeros(1, int), "NaN"),
        (np.array([[1, 0]]), np.zeros(1, int), "floating point"),
    ],
)
def test_bad_inputs_raise_clear_errors(probs: np.ndarray, labels: np.ndarray, message: str) -> None:
    for call in (
        point_metrics,
        per_class_accuracy,
        confusion_matrix,
        bootstrap_intervals,
        evaluate,
    ):
        with pytest.raises(ValueError, match=message):
            call(probs, labels, 2)


def test_bad_options_raise() -> None:
    probs, labels = problem(20, 2, seed=19)
    with pytest.raises(ValueError, match="num_classes"):
        point_metrics(probs, labels, 1)
    with pytest.raises(ValueError, match="samples"):
        bootstrap_intervals(probs, labels, 2, samples=1)
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(probs, labels, 2, level=95)
    with pytest.raises(ValueError, match="ece_bins"):
        evaluate(probs, labels, 2, ece_bins=0)


# --- summaries -----------------------------------------------------------------------------------


def run_row(init: str, mode: str, fraction: str, seed: int, acc: float, ci: tuple) -> dict:
    """One seed's report as the evaluate stage collects it; every metric follows accuracy."""
    metrics = {"accuracy": acc, "error": 1 - acc, "macro_f1": acc - 0.1, "nll": 1 - acc}
    metrics["ece"] = 0.05
    ci95 = {"accuracy": list(ci), "error": [1 - ci[1], 1 - ci[0]], "nll": [0.0, 1.0]}
    ci95 |= {"macro_f1": [ci[0] - 0.1, ci[1] - 0.1], "ece": [0.04, 0.06]}
    return {"init": init, "mode": mode, "fraction": fraction, "seed": seed} | {
        "metrics": metrics,
        "ci95": ci95,
    }


ROWS = [
    run_row("simclr", "linear", "1.0", 0, 0.90, (0.88, 0.92)),
    run_row("simclr", "linear", "1.0", 1, 0.92, (0.90, 0.94)),
    run_row("simclr", "linear", "1.0", 2, 0.94, (0.93, 0.95)),
    run_row("simclr", "linear", "0.01", 0, 0.70, (0.69, 0.71)),
    run_row("scratch", "finetune", "0.1", 0, 0.80, (0.79, 0.81)),
    run_row("scratch", "finetune", "0.01", 0, 0.50, (0.48, 0.52)),
    run_row("scratch", "finetune", "0.01", 1, 0.60, (0.58, 0.62)),
]


def test_summarize_by_hand() -> None:
    summary = summarize(ROWS)
    keys = [(s["init"], s["mode"], s["fraction"]) for s in summary]
    assert keys == [
        ("scratch", "finetune", "0.01"),
        ("scratch", "finetune", "0.1"),
        ("simclr", "linear", "0.01"),
        ("simclr", "linear", "1.0"),
    ]
    three = summary[3]
    assert three["n_seeds"] == 3
    assert three["mean"] == pytest.approx(0.92)
    assert three["std"] == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / 2)
    assert three["ci_low"] == pytest.approx((0.88 + 0.90 + 0.93) / 3)
    assert three["ci_high"] == pytest.approx((0.92 + 0.94 + 0.95) / 3)
    two = summary[0]
    assert two["mean"] == pytest.approx(0.55) and two["std"] == pytest.approx(math.sqrt(0.005))
    assert summary[1]["std"] == 0.0 and summary[1]["n_seeds"] == 1
    assert summarize(ROWS, metric="nll")[3]["mean"] == pytest.approx(0.08)


def test_summarize_rejects_a_repeated_seed() -> None:
    with pytest.raises(ValueError, match="repeat a seed"):
        summarize(ROWS + [ROWS[0]])


def test_summary_markdown_has_one_table_per_metric_in_registry_order() -> None:
    text = summary_markdown(summarize_all(ROWS), ["0.01", "0.1", "1.0"])
    tables = text.split("\n\n")[::2]  # caption, blank line, table, blank line, caption, ...
    titles = [t.split(" (")[0] for t in tables]
    assert titles == [f"Test {m.title}" for m in METRICS.values()]
    assert titles[0] == "Test accuracy" and HEADLINE == "accuracy"
    lines = text.splitlines()
    assert lines[0].startswith("Test accuracy (%, higher is better) by label budget.")
    assert "mean ± std over seeds" in lines[0]
    assert "| init | mode | 1 % | 10 % | 100 % |" in lines
    simclr = next(line for line in lines if line.startswith("| simclr | linear |"))
    assert (
        simclr
        == "| simclr | linear | 70.00 ± 0.00 [69.00, 71.00] | — | 92.00 ± 2.00 [90.33, 93.67] |"
    )
    scratch = next(line for line in lines if line.startswith("| scratch | finetune |"))
    assert "55.00 ± 7.07 [53.00, 57.00]" in scratch and scratch.endswith("| — |")
    # NLL is in nats with three decimals, lower is better.
    nll = text[text.index("Test NLL") :]
    assert nll.startswith("Test NLL (nats, lower is better)")
    assert (
        "| simclr | linear | 0.300 ± 0.000 [0.000, 1.000] | — | 0.080 ± 0.020 [0.000, 1.000] |"
        in nll
    )


def test_summary_table_marks_the_best_by_the_metrics_direction() -> None:
    summaries = summarize_all(ROWS)
    fractions = ["0.01", "0.1", "1.0"]
    # rows: scratch-finetune, simclr-linear; 1 %: scratch 0.55 < simclr 0.70
    accuracy = summary_table(
        summaries["accuracy"], fractions, "accuracy", {("simclr", "linear", "1.0")}
    )
    assert accuracy.header == ["init", "mode", "1 %", "10 %", "100 %"]
    assert [row[:2] for row in accuracy.rows] == [["scratch", "finetune"], ["simclr", "linear"]]
    assert accuracy.best == {(1, 2), (0, 3), (1, 4)}
    assert accuracy.rows[1][4].endswith(" †") and not accuracy.rows[0][2].endswith(" †")
    assert accuracy.rows[0][4] == "—"
    error = summary_table(summaries["error"], fractions, "error")
    assert error.best == accuracy.best  # the lowest error is the highest accuracy
    assert "lower is better" in error.caption
    # A tie marks both cells.
    tied = summarize(ROWS[3:4] + [run_row("pca", "linear", "0.01", 0, 0.70, (0.6, 0.8))])
    assert summary_table(tied, ["0.01"]).best == {(0, 2), (1, 2)}
    with pytest.raises(ValueError, match="unknown metric 'top5'; known: accuracy, error"):
        summary_table(tied, ["0.01"], "top5")


def test_summary_document_keys_and_reading_it_back() -> None:
    summaries = summarize_all(ROWS)
    document = summary_document(summaries)
    assert list(document) == [m.key for m in METRICS.values()]
    assert set(document) == {f"test_{name}" for name in POINT_METRICS}
    # The accuracy keys DVC and the tests read: test_accuracy.<init>-<mode>.<fraction key>.mean
    cell = document["test_accuracy"]["simclr-linear"]["1_0"]
    assert cell == pytest.approx(
        {"mean": 0.92, "std": 0.02, "ci_low": 0.903333, "ci_high": 0.936667, "n_seeds": 3}, abs=1e-6
    )
    assert document["test_nll"]["simclr-linear"]["1_0"]["mean"] == pytest.approx(0.08)
    cells = [
        (i, m, f)
        for i in ("scratch", "simclr")
        for m in ("finetune", "linear")
        for f in ("0.01", "0.1", "1.0")
    ]
    assert read_summary(json.loads(json.dumps(document)), cells) == summaries
    del document["test_ece"]
    with pytest.raises(ValueError, match="no 'test_ece'"):
        read_summary(document, cells)


def test_summary_csv_keeps_the_accuracy_columns_and_adds_every_metric() -> None:
    text = summary_csv(summarize_all(ROWS))
    lines = text.splitlines()
    header = lines[0].split(",")
    assert header[:8] == ["init", "mode", "fraction", "n_seeds", "mean", "std", "ci_low", "ci_high"]
    others = [n for n in METRICS if n != HEADLINE]
    assert header[8:] == [f"{n}_{s}" for n in others for s in ("mean", "std", "ci_low", "ci_high")]
    assert len(lines) == 1 + 4
    assert lines[-1].startswith("simclr,linear,1.0,3,0.920000,0.020000,0.903333,0.936667,")
    last = lines[-1].split(",")
    assert dict(zip(header, last, strict=True))["nll_mean"] == "0.080000"


def test_curve_csv_keeps_its_accuracy_columns_and_adds_every_metric() -> None:
    lines = curve_csv(summarize_all(ROWS)).splitlines()
    assert lines[0].startswith("fraction,model,accuracy,ci_low,ci_high,error,error_ci_low,")
    assert lines[0].endswith(",ece,ece_ci_low,ece_ci_high")
    row = dict(zip(lines[0].split(","), lines[-1].split(","), strict=True))
    assert row["fraction"] == "1.0" and row["model"] == "simclr-linear"
    assert float(row["accuracy"]) == pytest.approx(0.92)
    assert float(row["macro_f1"]) == pytest.approx(0.82)
    assert float(row["nll_ci_high"]) == 1.0


# --- the registry --------------------------------------------------------------------------------


def test_every_metric_is_defined_once_in_the_registry() -> None:
    assert tuple(METRICS) == POINT_METRICS and next(iter(METRICS)) == HEADLINE
    for name, definition in METRICS.items():
        assert definition.name == name and definition.key == f"test_{name}"
        assert definition.title and definition.meaning and definition.unit
    assert METRICS["nll"].show(0.25) == "0.250" and METRICS["ece"].show(0.25) == "25.00"
    assert METRICS["nll"].best([0.3, 0.2]) == 0.2 and METRICS["macro_f1"].best([0.3, 0.2]) == 0.3


def _brier(p: Predictions) -> float:
    return float(_brier_column(p).mean())


def _brier_column(p: Predictions) -> torch.Tensor:
    truth = torch.nn.functional.one_hot(p.target, p.num_classes).double()
    return ((p.probs.double() - truth) ** 2).sum(dim=1, keepdim=True)


def test_a_new_metric_is_one_definition(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Brier score registered, and nothing else edited: it is measured with an interval,
    bootstrapped consistently, summarized, tabled and plotted."""
    brier = Metric(
        "brier",
        "Brier score",
        "the mean squared distance between the probabilities and the one-hot truth",
        higher_is_better=False,
        point=_brier,
        statistics=_brier_column,
        from_sums=lambda sums, n: sums[:, 0] / n,
        unit="squared probability",
        scale=1.0,
        digits=4,
    )
    monkeypatch.setitem(METRICS, "brier", brier)
    probs, labels = problem(120, 3, seed=20)
    expected = float(np.mean(np.sum((probs - np.eye(3)[labels]) ** 2, axis=1)))
    assert point_metrics(probs, labels, 3)["brier"] == pytest.approx(expected)
    report = evaluate(probs, labels, 3, samples=50)
    low, high = report["ci95"]["brier"]
    assert low <= report["metrics"]["brier"] <= high and low < high
    draws = evaluation._bootstrap_distributions(Predictions.of(probs, labels, 3), 3, 1)
    index = np.random.default_rng(1).integers(0, 120, size=(3, 120))[2]
    assert draws["brier"][2] == pytest.approx(
        point_metrics(probs[index], labels[index], 3)["brier"]
    )
    rows = [{"init": "a", "mode": "knn", "fraction": "1.0", "seed": 0, **report}]
    summaries = summarize_all(rows)
    assert "Test Brier score (squared probability, lower is better)" in summary_markdown(
        summaries, ["1.0"]
    )
    assert "brier_mean" in summary_csv(summaries) and ",brier," in curve_csv(summaries)
    assert "test_brier" in summary_document(summaries)
    label_efficiency_figure(summaries["brier"], tmp_path / "brier.png", "brier")
    assert (tmp_path / "brier.png").read_bytes()[:4] == b"\x89PNG"


# --- figure --------------------------------------------------------------------------------------


def test_label_efficiency_figure_is_a_reproducible_png(tmp_path: Path) -> None:
    summary = summarize(ROWS)
    first, second = tmp_path / "a" / "fig.png", tmp_path / "b.png"
    label_efficiency_figure(summary, first)
    label_efficiency_figure(summary, second)
    data = first.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    assert data == second.read_bytes()
    assert b"matplotlib" not in data.lower()  # no version stamp that would change the bytes
    assert list(tmp_path.rglob(".*tmp*")) == []


def test_label_efficiency_figure_needs_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        label_efficiency_figure([], tmp_path / "fig.png")


def test_label_efficiency_figure_of_another_metric_differs(tmp_path: Path) -> None:
    summaries = summarize_all(ROWS)
    label_efficiency_figure(summaries["accuracy"], tmp_path / "accuracy.png")
    label_efficiency_figure(summaries["nll"], tmp_path / "nll.png", "nll")
    assert (tmp_path / "accuracy.png").read_bytes() != (tmp_path / "nll.png").read_bytes()


# --- the study's answer: paired differences ------------------------------------------------------


def one_hot_predictions(correct: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (one-hot) and labels of a classifier right exactly where ``correct`` is."""
    labels = np.arange(len(correct)) % k
    predicted = np.where(correct.astype(bool), labels, (labels + 1) % k)
    return np.eye(k)[predicted], labels


def correlated_pair(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """b right on about 75 % of the images; a the same classifier but for 30 of b's mistakes
    it gets right and 10 of b's successes it gets wrong: a is 2 points better, image by image
    almost the same."""
    rng = np.random.default_rng(seed)
    b = (rng.random(n) < 0.75).astype(np.float64)
    a = b.copy()
    a[rng.choice(np.flatnonzero(b == 0), 30, replace=False)] = 1.0
    a[rng.choice(np.flatnonzero(b == 1), 10, replace=False)] = 0.0
    return a, b


def test_two_identical_classifiers_differ_by_zero_with_interval_zero_zero() -> None:
    correct = [(np.random.default_rng(s).random(300) < 0.7).astype(float) for s in (1, 2)]
    paired = evaluation.paired_difference(correct, [c.copy() for c in correct], 500, 0)
    assert (paired.difference, paired.ci_low, paired.ci_high) == (0.0, 0.0, 0.0)
    assert paired.holds_zero and paired.accuracy_a == paired.accuracy_b


@pytest.mark.parametrize("k, apart", [(1, False), (7, True), (40, True)])
def test_right_on_exactly_k_more_images_is_a_difference_of_k_over_n(k: int, apart: bool) -> None:
    n = 400
    b = np.zeros(n)
    b[::2] = 1.0  # right on every other image
    a = b.copy()
    a[np.flatnonzero(b == 0)[:k]] = 1.0
    paired = evaluation.paired_difference([a], [b], 500, 0)
    assert paired.difference == k / n
    assert paired.accuracy_a - paired.accuracy_b == pytest.approx(k / n)
    # a is never worse on any image, so no resample can make the difference negative
    assert 0.0 <= paired.ci_low <= k / n <= paired.ci_high <= 1.0
    # One image is left out of about 37 % of the resamples (e^-1): one image cannot tell the
    # two apart; seven are all left out of 0.1 % of them (e^-7), well inside the 2.5 % tail.
    assert paired.holds_zero is not apart and (paired.ci_low > 0.0) is apart


def test_seeds_are_averaged_on_the_same_resampled_images() -> None:
    n = 200
    rng = np.random.default_rng(3)
    a = [(rng.random(n) < p).astype(float) for p in (0.6, 0.8)]
    b = [(rng.random(n) < 0.5).astype(float)]
    paired = evaluation.paired_difference(a, b, 300, 5)
    means = (a[0].mean() + a[1].mean()) / 2
    assert paired.difference == pytest.approx(means - b[0].mean())
    assert paired.accuracy_a == pytest.approx(means)


def test_the_paired_interval_resamples_the_images_every_cell_interval_resamples() -> None:
    # Against a classifier that is always wrong, the paired difference is the accuracy of the
    # other one, and its interval must be that cell's own bootstrap interval: the same stream.
    probs, labels = problem(500, 4, seed=21)
    correct = evaluation.per_image_correct(probs, labels, 4)
    own = bootstrap_intervals(probs, labels, 4, samples=300, seed=7)["accuracy"]
    paired = evaluation.paired_difference([correct], [np.zeros(500)], 300, 7)
    assert (paired.ci_low, paired.ci_high) == pytest.approx(own, abs=1e-12)
    assert paired.difference == pytest.approx(point_metrics(probs, labels, 4)["accuracy"])


def test_a_paired_interval_is_narrower_than_an_unpaired_one_on_correlated_classifiers() -> None:
    n, samples = 1000, 1000
    a, b = correlated_pair(n, seed=4)
    paired = evaluation.paired_difference([a], [b], samples, 0)
    assert paired.difference == pytest.approx(0.02)
    # Unpaired: each classifier resampled on its own images, as two separate studies would.
    draws_a = evaluation._resampled_sums(a[:, None], samples, 1)[:, 0] / n
    draws_b = evaluation._resampled_sums(b[:, None], samples, 2)[:, 0] / n
    low, high = evaluation._percentile_interval(draws_a - draws_b, 0.02, 0.95)
    assert paired.ci_high - paired.ci_low < (high - low) / 2
    # The difference is real; only the paired interval can say so.
    assert low < 0.0 < high and not paired.holds_zero


@pytest.mark.parametrize(
    "a, b, message",
    [
        ([], [np.ones(3)], "correct_a is empty"),
        ([np.ones(3)], [np.ones(4)], "correct_a has 3 test images per seed but correct_b has 4"),
        ([np.ones(3), np.ones(2)], [np.ones(3)], "same length N"),
        ([np.full(3, 0.5)], [np.ones(3)], "0 or 1 per image"),
    ],
)
def test_paired_difference_refuses_what_cannot_be_paired(a: list, b: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluation.paired_difference(a, b, 100, 0)


def answer_of(difference: float, low: float, high: float) -> evaluation.AnswerEntry:
    return evaluation.AnswerEntry(
        budget="0.01",
        ssl_cell="simclr-finetune",
        baseline_cell="scratch-finetune",
        ssl_accuracy=0.8 + difference,
        baseline_accuracy=0.8,
        difference=difference,
        ci_low=low,
        ci_high=high,
    )


def test_the_answer_sentence_says_beats_only_when_the_interval_leaves_out_zero() -> None:
    beats = evaluation.answer_sentence([answer_of(0.016, 0.009, 0.023)])
    assert beats.startswith("Answer: self-supervision")
    assert "paired 95 % bootstrap interval" in beats
    assert (
        "with 1 % of the labels simclr-finetune 81.60 % vs scratch-finetune 80.00 %: "
        "+1.60 points [+0.90, +2.30], simclr-finetune beats scratch-finetune." in beats
    )
    assert "cannot be told apart" not in beats
    loses = evaluation.answer_sentence([answer_of(-0.02, -0.03, -0.01)])
    assert "-2.00 points [-3.00, -1.00], scratch-finetune beats simclr-finetune." in loses
    tie = evaluation.answer_sentence([answer_of(0.016, -0.003, 0.035)])
    assert "+1.60 points [-0.30, +3.50], the interval holds zero, so the two cannot be told " in tie
    assert "beats" not in tie
    both = [answer_of(0.0, 0.0, 0.0), answer_of(0.05, 0.04, 0.06) | {"budget": "1.0"}]
    sentence = evaluation.answer_sentence(both)
    assert sentence.index("with 1 % of the labels") < sentence.index("; with 100 % of the labels")
    assert sentence.count("cannot be told apart") == 1 and sentence.count("beats") == 1
    assert "no answer" in evaluation.answer_sentence([])


def test_the_answer_gives_each_seeds_difference_and_says_when_they_disagree() -> None:
    # Seed 0 (labeled draw 0) gains 8 of 10 images, seed 1 (draw 1) loses 2: the interval over
    # the 10 test images leaves zero out, but which images were labeled decides the sign.
    a = [np.array([1.0] * 9 + [0.0]), np.array([1.0] * 5 + [0.0] * 5)]
    b = [np.array([1.0] + [0.0] * 9), np.array([1.0] * 7 + [0.0] * 3)]
    paired = evaluation.paired_difference(a, b, 500, 0)
    assert paired.per_seed == pytest.approx((0.8, -0.2))
    assert paired.difference == pytest.approx(0.3) and not paired.holds_zero
    entry = evaluation.answer_entry("4pc", "simclr-semi", "pixels-linear", paired)
    assert entry["per_seed"] == [0.8, -0.2]
    sentence = evaluation.answer_sentence([entry])
    assert "(per seed +80.00, -20.00), but the seeds disagree on its sign" in sentence
    assert "beats" not in sentence
    agree = answer_of(0.016, 0.009, 0.023) | {"per_seed": [0.01, 0.022]}
    assert "(per seed +1.00, +2.20), simclr-finetune beats" in evaluation.answer_sentence([agree])
    unequal = evaluation.paired_difference(a, b[:1], 100, 0)  # seeds that cannot be paired
    assert unequal.per_seed == ()


def test_summary_markdown_ends_with_the_answer_and_is_unchanged_without_it() -> None:
    summaries = summarize_all(ROWS)
    tables = summary_markdown(summaries, ["0.01", "0.1", "1.0"])
    sentence = evaluation.answer_sentence([answer_of(0.016, 0.009, 0.023)])
    with_answer = summary_markdown(summaries, ["0.01", "0.1", "1.0"], sentence)
    assert with_answer == f"{tables}\n{sentence}\n"


def test_the_answer_compares_the_cells_validation_chose_not_the_best_on_test(workdir: Path):
    """rotation-linear is the best self-supervised cell on test and pixels-linear the best
    baseline on test, but validation prefers simclr-linear and scratch-linear: those are
    compared, and the files say so."""
    from pipeline.config import from_dict
    from pipeline.stages import evaluate
    from tests.conftest import params_for, sync_matrix

    params = params_for("fashion_mnist", split={"label_fractions": [0.5]})
    params["pretrain"]["methods"] = ["scratch", "pixels", "pca", "simclr", "rotation"]
    params["finetune"].update(modes=["linear"], baseline_modes=["linear"], seeds=[0, 1])
    config = from_dict(sync_matrix(params))
    validation = {"simclr": 0.80, "rotation": 0.75, "scratch": 0.70, "pca": 0.65, "pixels": 0.6}
    test = {"simclr": 0.70, "rotation": 0.90, "scratch": 0.55, "pca": 0.50, "pixels": 0.85}
    n, rows, correct = 400, [], {}
    for init, mode, fraction in config.finetune.cells():
        path = Path("metrics/finetune") / f"{init}-{mode}-{fraction!r}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"val_acc_mean": validation[init]}))
        for seed in config.finetune.seeds:
            right = np.zeros(n)
            right[np.random.default_rng(seed).permutation(n)[: round(test[init] * n)]] = 1.0
            probs, labels = one_hot_predictions(right)
            report = evaluation.evaluate(probs, labels, 4, samples=50)
            row = {"init": init, "mode": mode, "fraction": repr(fraction), "seed": seed}
            rows.append(row | report)
            correct.setdefault((f"{init}-{mode}", repr(fraction)), []).append(
                evaluation.per_image_correct(probs, labels, 4)
            )
    summaries = summarize_all(rows)
    answer = evaluate._answer(config, summaries, correct)
    assert set(answer) == {"0_5"}
    entry = answer["0_5"]
    assert (entry["ssl_cell"], entry["baseline_cell"]) == ("simclr-linear", "scratch-linear")
    assert entry["difference"] == pytest.approx(0.70 - 0.55)
    assert entry["ci_low"] <= entry["difference"] <= entry["ci_high"]
    assert entry["ci_low"] > 0  # 60 more images right out of 400, on every seed

    evaluate._write_summary(config, summaries, answer)
    document = json.loads(Path("metrics/summary.json").read_text())
    assert document["answer"] == {"0_5": entry}
    assert set(document) == {"answer"} | {m.key for m in METRICS.values()}
    markdown = Path("metrics/summary.md").read_text()
    assert markdown.endswith(evaluation.answer_sentence([entry]) + "\n")
    sentence = markdown.splitlines()[-1]
    assert "simclr-linear beats scratch-linear" in sentence and "rotation" not in sentence
