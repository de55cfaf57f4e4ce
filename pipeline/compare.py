"""compare: the MLflow runs of one pipeline execution as a table, or of two with B - A.

``python -m pipeline compare [A [B]]`` is not a stage: it only reads the MLflow store the stages
log to (``pipeline.tracking``), so the outcome of a ``make run`` can be read without the MLflow
UI, and two executions (say, before and after a params change) compared metric by metric. An
execution is named by its ``execution`` tag (one id per ``make run``) or by its ``pipeline_id``
(code + params); with none named, the latest execution is shown.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

#: How many runs one search request asks for (MLflow's maximum page is larger).
PAGE_SIZE = 1000

#: Shown in a cell that has no value (metric not logged, or no run for this row).
MISSING = "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``compare``; ``--params`` is added by the CLI for every command."""
    parser.add_argument(
        "executions",
        nargs="*",
        metavar="EXECUTION",
        help="zero, one or two executions, each an `execution` tag value or a pipeline_id "
        "(default: the latest execution); with two, B - A is shown for each metric",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="NAME",
        help="a metric to show, or a pattern such as 'test_accuracy.*' (repeatable; "
        "default: every metric the runs logged)",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment (default: tracking.experiment in params.yaml)",
    )


# --------------------------------------------------------------------------- finding runs


def _search(client: Any, experiment_id: str, filter_string: str = "") -> list[Any]:
    """Every active run of the experiment matching ``filter_string``, across result pages."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=PAGE_SIZE,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _tag_equals(client: Any, experiment_id: str, tag: str, value: str) -> list[Any]:
    """Runs whose ``tag`` is exactly ``value``.

    MLflow's filter language has no escape for quotes inside a literal, so a value with a quote
    or backslash is matched here instead of by the store (slower, but never a parse error or a
    wrong match).
    """
    if re.search(r"['\"\\]", value):
        found = [r for r in _search(client, experiment_id) if r.data.tags.get(tag) == value]
    else:
        found = _search(client, experiment_id, f"tags.`{tag}` = '{value}'")
    return [r for r in found if not _is_parent(r)]


def _is_parent(run: Any) -> bool:
    """An execution's parent run (tracking.start_execution): it groups stage runs, it is none."""
    return run.data.tags.get("role") == "execution"


def latest_execution(client: Any, experiment_id: str) -> str | None:
    """The ``execution`` tag of the most recently started run, else its ``pipeline_id``.

    None when the experiment has no runs, or its latest run carries neither tag (not a run of
    this pipeline's stages).
    """
    page = client.search_runs(
        [experiment_id], max_results=20, order_by=["attributes.start_time DESC"]
    )
    stages = [r for r in page if not _is_parent(r)]
    if not stages:
        return None
    tags = stages[0].data.tags
    return tags.get("execution") or tags.get("pipeline_id")


def runs_of(client: Any, experiment_id: str, execution: str | None) -> list[Any]:
    """The runs whose tag ``execution`` or ``pipeline_id`` equals ``execution``, oldest first.

    ``None`` means the latest execution (:func:`latest_execution`). Both tags are tried because
    a user may only know one: ``make run`` prints the execution id, while every run (also one
    started by hand, without PIPELINE_EXECUTION) carries a pipeline_id.
    """
    if execution is None:
        execution = latest_execution(client, experiment_id)
        if execution is None:
            return []
    found: dict[str, Any] = {}
    for tag in ("execution", "pipeline_id"):
        for run in _tag_equals(client, experiment_id, tag, execution):
            found[run.info.run_id] = run
    return sorted(found.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id))


# --------------------------------------------------------------------------- the table


def run_key(run: Any) -> tuple[str, str]:
    """(stage, what distinguishes runs of one stage): ``method`` or ``init-mode-fraction``.

    A ``seed`` tag, where a stage sets one, is appended so that per-seed runs stay apart.
    """
    tags = run.data.tags
    stage = tags.get("stage", "?")
    if all(tags.get(t) for t in ("init", "mode", "fraction")):
        key = f"{tags['init']}-{tags['mode']}-{tags['fraction']}"
    else:
        key = tags.get("method", "")
    if tags.get("seed"):
        key = f"{key} seed={tags['seed']}" if key else f"seed={tags['seed']}"
    return stage, key


def _natural(text: str) -> tuple:
    """Sort key that orders numbers by value: ``scratch-linear-0.01`` before ``...-0.1``."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def _row_order(key: tuple[str, str]) -> tuple:
    """Stages in pipeline order (unknown stages after, by name), then the key naturally."""
    from pipeline.cli import PIPELINE_ORDER  # here, not at the top: the CLI imports this module

    stage, name = key
    rank = PIPELINE_ORDER.index(stage) if stage in PIPELINE_ORDER else len(PIPELINE_ORDER)
    return rank, stage, _natural(name)


def _by_key(runs: Iterable[Any]) -> tuple[dict[tuple[str, str], Any], dict[tuple[str, str], int]]:
    """One run per key, the most recently started; and how many runs each key had.

    Several runs share a key when a stage was re-run in the same execution, or when the
    execution is a pipeline_id shared by several ``make run``s; the latest one is what the
    outputs on disk come from.
    """
    chosen: dict[tuple[str, str], Any] = {}
    counts: dict[tuple[str, str], int] = {}
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        key = run_key(run)
        chosen[key] = run
        counts[key] = counts.get(key, 0) + 1
    return chosen, counts


def _metric_columns(wanted: Sequence[str] | None, logged: set[str]) -> list[str]:
    """The metric columns: every logged one by name, or those ``wanted`` in the order given.

    A wanted entry with ``*``, ``?`` or ``[`` is a pattern (``test_accuracy.*`` picks the
    evaluate stage's per-cell columns) and adds the matching logged names, sorted; a plain name
    always gets its column, so a metric missing from every run shows as ``-`` rather than
    vanishing without a word.
    """
    if not wanted:
        return sorted(logged)
    columns: list[str] = []
    for entry in wanted:
        if any(c in entry for c in "*?["):
            found = sorted(m for m in logged if fnmatch.fnmatchcase(m, entry))
        else:
            found = [entry]
        columns.extend(m for m in found if m not in columns)
    return columns


def _number(value: float | None) -> str:
    """Integers without decimals (counts, sizes), other values with 4 decimals."""
    if value is None:
        return MISSING
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4f}"


def _difference(a: float | None, b: float | None) -> str:
    """B - A with its sign, so an improvement reads ``+0.0500``; ``-`` when a side is missing."""
    if a is None or b is None:
        return MISSING
    delta = b - a
    if math.isnan(delta):
        return MISSING
    text = _number(delta)
    return f"+{text}" if delta > 0 else text


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> str:
    """Fixed-width text: the first ``left`` (text) columns left-aligned, numbers right-aligned."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = []
    for cells in (header, ["-" * w for w in widths], *rows):
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def table(
    runs_a: Iterable[Any],
    runs_b: Iterable[Any] | None = None,
    metrics: Sequence[str] | None = None,
) -> str:
    """One row per (stage, key) with the run's status and metrics, as fixed-width text.

    With ``runs_b``, each metric gets columns A, B and B - A (rows present in only one
    execution show ``-`` on the other side). ``metrics`` picks the metric columns in the order
    given; by default every metric any of the runs logged, sorted by name. Rows are in pipeline
    stage order, then by key, so the same store always prints the same table.
    """
    chosen_a, counts_a = _by_key(runs_a)
    chosen_b, counts_b = _by_key(runs_b) if runs_b is not None else ({}, {})
    everything = [*chosen_a.values(), *chosen_b.values()]
    names = _metric_columns(metrics, {m for r in everything for m in r.data.metrics})
    keys = sorted(set(chosen_a) | set(chosen_b), key=_row_order)

    def label(key: tuple[str, str]) -> list[str]:
        return [key[0], key[1] or MISSING]

    def status(run: Any | None) -> str:
        return run.info.status if run is not None else MISSING

    def metric(run: Any | None, name: str) -> float | None:
        return run.data.metrics.get(name) if run is not None else None

    rows: list[list[str]] = []
    if runs_b is None:
        header = ["stage", "run", "status", *names]
        for key in keys:
            run = chosen_a[key]
            rows.append([*label(key), status(run), *(_number(metric(run, n)) for n in names)])
    else:
        header = ["stage", "run", "status A", "status B"]
        for name in names:
            header += [f"{name} A", f"{name} B", f"{name} B-A"]
        for key in keys:
            a, b = chosen_a.get(key), chosen_b.get(key)
            row = [*label(key), status(a), status(b)]
            for name in names:
                va, vb = metric(a, name), metric(b, name)
                row += [_number(va), _number(vb), _difference(va, vb)]
            rows.append(row)
    text = _render(header, rows, left=3 if runs_b is None else 4)
    repeated = sorted(
        {k for c in (counts_a, counts_b) for k, n in c.items() if n > 1}, key=_row_order
    )
    if repeated:
        listed = ", ".join(f"{s} {k}".strip() for s, k in repeated)
        text += f"\n\nseveral runs for {listed}: the latest started is shown"
    return text


# --------------------------------------------------------------------------- command


def _experiment_name(args: argparse.Namespace) -> str:
    """--experiment, else tracking.experiment from params.yaml (read only when needed)."""
    if getattr(args, "experiment", None):
        return args.experiment
    from pipeline.config import PARAMS_FILE, load

    return load(getattr(args, "params", None) or PARAMS_FILE).tracking.experiment


def _no_runs(execution: str, experiment: str) -> PipelineError:
    return PipelineError(
        f"no MLflow runs for execution {execution} in experiment {experiment}; run `make run` "
        "first or pass an execution id (tag `execution`) or pipeline_id"
    )


def main(args: argparse.Namespace) -> int:
    """Print the table of the latest execution, of one, or of two side by side."""
    from pipeline import tracking

    executions: list[str] = list(getattr(args, "executions", None) or [])
    if len(executions) > 2:
        raise PipelineError(
            f"compare takes at most two executions (A and B), got {len(executions)}: "
            f"{' '.join(executions)}"
        )
    experiment = _experiment_name(args)
    default_db = Path(tracking.DEFAULT_DB).resolve()
    if not os.environ.get("MLFLOW_TRACKING_URI") and not default_db.is_file():
        # MLflow would create an empty store here; a read-only command should not.
        raise PipelineError(
            f"no MLflow store at {default_db}; run `make run` first, run compare from the "
            "repository root, or set MLFLOW_TRACKING_URI to the store the stages logged to"
        )
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise _no_runs(executions[0] if executions else "(latest)", experiment)
    experiment_id = found.experiment_id
    if not executions:
        latest = latest_execution(client, experiment_id)
        if latest is None:
            raise _no_runs("(latest)", experiment)
        executions = [latest]
    selected = []
    for execution in executions:
        runs = runs_of(client, experiment_id, execution)
        if not runs:
            raise _no_runs(execution, experiment)
        selected.append(runs)
    labels = ["A", "B"] if len(selected) == 2 else [""]
    for label, execution, runs in zip(labels, executions, selected, strict=True):
        prefix = f"{label}: " if label else ""
        print(f"{prefix}execution {execution} ({len(runs)} runs) in experiment {experiment}")
    print()
    runs_b = selected[1] if len(selected) == 2 else None
    print(table(selected[0], runs_b, getattr(args, "metric", None)))
    return 0
