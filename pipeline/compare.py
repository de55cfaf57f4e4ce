"""compare: the study of one pipeline execution as a table, or of two with B - A.

``python -m pipeline compare [A [B]]`` is not a stage: it only reads the MLflow store the stages
log to (``pipeline.tracking``), so the outcome of a ``make run`` can be read without the MLflow
UI, and two executions (say, before and after a params change) compared cell by cell. An
execution is named by its ``execution`` tag (one id per ``make run``) or by its ``pipeline_id``
(code + params); with none named, the latest execution is shown.

By default it prints the study: one row per cell (init, mode, label fraction) with its
validation and test accuracy and what its pretraining and fine-tuning runs cost, then the
stages that ran once for all cells. ``--metric`` picks any logged metric instead, one row per
run; MLflow's system metrics (``system/*``) only with ``--system``. Every table fits
:data:`WIDTH` columns: a wider one is printed in blocks of columns.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # mlflow is imported where a comparison runs, not at CLI start
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

#: How many runs one search request asks for (MLflow's maximum page is larger).
PAGE_SIZE = 1000

#: Shown in a cell that has no value (metric not logged, or no run for this row).
MISSING = "-"

#: Under a study table with missing values: why a cell is empty.
MISSING_NOTE = (
    f"{MISSING}: not logged; a runner re-runs only the stages a change affects, so an execution "
    "may have no run of a stage"
)

#: The widest line a table may print: a 120-column terminal shows it unwrapped.
WIDTH = 120

#: MLflow's system metrics (sampled every 10 s by tracking.stage_run) are named ``system/...``.
SYSTEM = "system/"

#: What the stages log that the study view reads (tracking.resource_metrics, the finetune and
#: evaluate stages).
SECONDS, PEAK_RSS, VALIDATION, TEST = "stage_seconds", "peak_rss_mb", "val_acc", "test_accuracy."

#: MLflow's per-device GPU memory samples (NVIDIA in megabytes, ROCm in gigabytes).
GPU_MEMORY = re.compile(r"system/gpu_\d+_memory_usage_(megabytes|gigabytes)")

#: A metric's samples, by run id and metric name (MlflowClient.get_metric_history's values).
History = Callable[[str, str], Sequence[float]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``compare``; ``--params`` is added by the CLI for every command."""
    parser.add_argument(
        "executions",
        nargs="*",
        metavar="EXECUTION",
        help="zero, one or two executions, each an `execution` tag value or a pipeline_id "
        "(default: the latest execution); with two, B - A is shown on the same rows",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="NAME",
        help="one row per run with this metric, or a pattern such as 'n_*' (repeatable; "
        "default: one row per study cell with its accuracies and costs)",
    )
    parser.add_argument(
        "--system",
        action="store_true",
        help="one row per run with MLflow's system metrics (CPU, memory, disk, network, GPU; "
        "each one's highest sample), and let --metric patterns match them",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment (default: tracking.experiment in params.yaml)",
    )


# --------------------------------------------------------------------------- finding runs


def _search(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """Every active run of the experiment matching ``filter_string``, across result pages."""
    runs: list[Run] = []
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


def _tag_equals(client: MlflowClient, experiment_id: str, tag: str, value: str) -> list[Run]:
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


def _is_parent(run: Run) -> bool:
    """An execution's parent run (tracking.start_execution): it groups stage runs, it is none."""
    return run.data.tags.get("role") == "execution"


def latest_execution(client: MlflowClient, experiment_id: str) -> str | None:
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


def runs_of(client: MlflowClient, experiment_id: str, execution: str | None) -> list[Run]:
    """The runs whose tag ``execution`` or ``pipeline_id`` equals ``execution``, oldest first.

    ``None`` means the latest execution (:func:`latest_execution`). Both tags are tried because
    a user may only know one: ``make run`` prints the execution id, while every run (also one
    started by hand, without PIPELINE_EXECUTION) carries a pipeline_id.
    """
    if execution is None:
        execution = latest_execution(client, experiment_id)
        if execution is None:
            return []
    found: dict[str, Run] = {}
    for tag in ("execution", "pipeline_id"):
        for run in _tag_equals(client, experiment_id, tag, execution):
            found[run.info.run_id] = run
    return sorted(found.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id))


# --------------------------------------------------------------------------- runs by key

Key = tuple[str, str]


def run_key(run: Run) -> Key:
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


def _row_order(key: Key) -> tuple:
    """Stages in pipeline order (unknown stages after, by name), then the key naturally."""
    from pipeline.cli import PIPELINE_ORDER  # here, not at the top: the CLI imports this module

    stage, name = key
    rank = PIPELINE_ORDER.index(stage) if stage in PIPELINE_ORDER else len(PIPELINE_ORDER)
    return rank, stage, _natural(name)


@dataclass(frozen=True)
class Execution:
    """One execution's runs, one per key (the latest started), and how many each key had.

    Several runs share a key when a stage was re-run in the same execution, or when the
    execution is a pipeline_id shared by several ``make run``s; the latest one is what the
    outputs on disk come from.
    """

    runs: Mapping[Key, Run]
    counts: Mapping[Key, int]

    @classmethod
    def of(cls, runs: Iterable[Run]) -> Execution:
        """The runs by :func:`run_key`, the latest started kept where a key has several."""
        chosen: dict[Key, Run] = {}
        counts: dict[Key, int] = {}
        for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
            key = run_key(run)
            chosen[key] = run
            counts[key] = counts.get(key, 0) + 1
        return cls(chosen, counts)

    def metric(self, key: Key, name: str) -> float | None:
        """The last value of ``name`` logged by the run of ``key``; None when either is absent."""
        run = self.runs.get(key)
        return None if run is None else run.data.metrics.get(name)


def _repeated(executions: Sequence[Execution]) -> list[str]:
    """A line naming the keys with several runs, where there are any."""
    repeated = {k for e in executions for k, n in e.counts.items() if n > 1}
    if not repeated:
        return []
    listed = ", ".join(f"{s} {k}".strip() for s, k in sorted(repeated, key=_row_order))
    return [f"several runs for {listed}: the latest started is shown"]


def _unfinished(executions: Sequence[Execution]) -> list[str]:
    """A line per execution naming its runs that did not finish: their values are what they
    logged before they stopped, which the study view (no status column) must not hide."""
    sides = ["A: ", "B: "] if len(executions) == 2 else [""]
    lines = []
    for side, execution in zip(sides, executions, strict=True):
        unfinished = [
            " ".join(p for p in (stage, key, execution.runs[(stage, key)].info.status) if p)
            for stage, key in sorted(execution.runs, key=_row_order)
            if execution.runs[(stage, key)].info.status != "FINISHED"
        ]
        if unfinished:
            lines.append(f"{side}not finished: {', '.join(unfinished)}")
    return lines


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Column:
    """A table column: its header, the group header above it (a span of columns sharing one),
    and whether it holds text (left-aligned, repeated in every block) or numbers."""

    name: str
    group: str = ""
    text: bool = False


def _number(value: float | None) -> str:
    """Integers without decimals (counts, sizes), other values with 4 decimals."""
    if value is None:
        return MISSING
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4f}"


def _difference(a: float | None, b: float | None, decimals: int | None = None) -> str:
    """B - A with its sign, so an improvement reads ``+0.0500``; ``-`` when a side is missing.

    ``decimals`` fixes the precision (else :func:`_number`'s); a difference that rounds to
    zero reads ``0.0`` rather than ``+0.0`` or ``-0.0``."""
    if a is None or b is None or math.isnan(b - a):
        return MISSING
    delta = b - a
    text = _number(delta) if decimals is None else f"{delta:.{decimals}f}"
    if float(text) == 0:
        return text.lstrip("-")
    return f"+{text}" if delta > 0 else text


def _fixed(value: float | None, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, ``-`` when missing."""
    return MISSING if value is None or math.isnan(value) else f"{value:.{decimals}f}"


def _units(columns: Sequence[Column]) -> list[list[int]]:
    """Indices of the number columns, in runs that stay together in a block (one group)."""
    units: list[list[int]] = []
    for i, column in enumerate(columns):
        if column.text:
            continue
        if units and column.group and columns[units[-1][-1]].group == column.group:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _widths(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[int]:
    """Each column as wide as its header and cells; a group's columns widened evenly where the
    group header is wider than their span."""
    widths = [max([len(c.name), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    for unit in _units(columns):
        label = columns[unit[0]].group
        missing = len(label) - (sum(widths[i] for i in unit) + 2 * (len(unit) - 1))
        for n, i in enumerate(unit):
            widths[i] += max(0, missing) // len(unit) + (n < max(0, missing) % len(unit))
    return widths


def _blocks(columns: Sequence[Column], widths: Sequence[int], width: int) -> list[list[int]]:
    """Column indices per block: the text columns, then as many number units as fit ``width``
    (at least one, so a block is never empty)."""
    labels = [i for i, c in enumerate(columns) if c.text]
    used = sum(widths[i] + 2 for i in labels)
    blocks: list[list[int]] = [[]]
    size = used
    for unit in _units(columns):
        extra = sum(widths[i] + 2 for i in unit)
        if blocks[-1] and size + extra - 2 > width:
            blocks.append([])
            size = used
        blocks[-1].extend(unit)
        size += extra
    return [labels + block for block in blocks]


def _render(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int = WIDTH) -> str:
    """Fixed-width text: text columns left-aligned, numbers right-aligned, a group header line
    where columns have groups. A table wider than ``width`` is printed as several blocks of
    columns, each repeating the text columns, so no line wraps on a ``width``-column terminal."""
    widths = _widths(columns, rows)
    out = []
    for block in _blocks(columns, widths, width):
        lines = []
        if any(columns[i].group for i in block):
            lines.append(_group_line(columns, widths, block))
        for cells in ([c.name for c in columns], ["-" * w for w in widths], *rows):
            parts = [
                cells[i].ljust(widths[i]) if columns[i].text else cells[i].rjust(widths[i])
                for i in block
            ]
            lines.append("  ".join(parts).rstrip())
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _group_line(columns: Sequence[Column], widths: Sequence[int], block: Sequence[int]) -> str:
    """The group headers of ``block``, each centred over the columns of its span."""
    line, position = "", 0
    spans: list[tuple[str, int, int]] = []  # (group, start, end) of each run of one group
    for i in block:
        group = columns[i].group
        if group and spans and spans[-1][0] == group and spans[-1][2] == position - 2:
            spans[-1] = (group, spans[-1][1], position + widths[i])
        elif group:
            spans.append((group, position, position + widths[i]))
        position += widths[i] + 2
    for group, start, end in spans:
        line = line.ljust(start) + group.center(end - start)
    return line.rstrip()


# --------------------------------------------------------------------------- the study view


@dataclass(frozen=True)
class Cell:
    """One cell of the study's matrix, as the finetune stage tags its run."""

    init: str
    mode: str
    fraction: str

    @property
    def name(self) -> str:
        return f"{self.init}-{self.mode}-{self.fraction}"


@dataclass(frozen=True)
class Quantity:
    """A number the study view shows per row: its header, its group, how it is read and its
    precision. ``both``: with two executions, A and B are shown beside B - A (accuracies);
    otherwise B - A alone (costs), which keeps the two-execution table within WIDTH."""

    name: str
    group: str
    read: Callable[[Execution, Cell | Key], float | None]
    decimals: int
    both: bool = False


def _cells(execution: Execution) -> dict[str, Cell]:
    """The cells an execution logged: each fine-tuning run, and each test accuracy the evaluate
    run logged (``test_accuracy.<init>-<mode>-<fraction>``: an execution that re-ran evaluate
    alone has those rows too)."""
    found: dict[str, Cell] = {}
    for (stage, _), run in execution.runs.items():
        tags = run.data.tags
        if stage == "finetune" and all(tags.get(t) for t in ("init", "mode", "fraction")):
            cell = Cell(tags["init"], tags["mode"], tags["fraction"])
            found[cell.name] = cell
        if stage == "evaluate":
            for metric in run.data.metrics:
                parts = metric[len(TEST) :].rsplit("-", 2)
                if metric.startswith(TEST) and len(parts) == 3:
                    found.setdefault(metric[len(TEST) :], Cell(*parts))
    return found


def _evaluate_key(execution: Execution) -> Key:
    """The evaluate run's key (it has no method tag; a seed tag would add to it)."""
    keys = [k for k in execution.runs if k[0] == "evaluate"]
    return max(keys, key=_row_order) if keys else ("evaluate", "")


def _gpu_peak(run: Run, history: History | None) -> float | None:
    """The highest GPU memory use (MB) MLflow sampled during the run, over its devices; None
    without GPU samples. Without ``history`` only the last sample is known."""
    peaks = []
    for name, last in run.data.metrics.items():
        match = GPU_MEMORY.fullmatch(name)
        if match:
            values = list(history(run.info.run_id, name)) if history else [last]
            scale = 1000.0 if match.group(1) == "gigabytes" else 1.0
            peaks.append(max(values or [last]) * scale)
    return max(peaks) if peaks else None


def _study_quantities(gpu: bool, history: History | None) -> list[Quantity]:
    """The cell table's numbers: accuracies, then each stage's seconds and peak memory (process
    RSS, and GPU memory where MLflow sampled a GPU)."""

    def cost(stage: str, key_of: Callable[[Cell], str]) -> list[Quantity]:
        def read(name: str) -> Callable[[Execution, Cell], float | None]:
            return lambda e, cell: e.metric((stage, key_of(cell)), name)

        def gpu_read(e: Execution, cell: Cell) -> float | None:
            run = e.runs.get((stage, key_of(cell)))
            return None if run is None else _gpu_peak(run, history)

        found = [
            Quantity("seconds", stage, read(SECONDS), 1),
            Quantity("peak MB", stage, read(PEAK_RSS), 0),
        ]
        return found + ([Quantity("GPU MB", stage, gpu_read, 0)] if gpu else [])

    return [
        Quantity(
            "validation",
            "accuracy",
            lambda e, cell: e.metric(("finetune", cell.name), VALIDATION),
            4,
            both=True,
        ),
        Quantity(
            "test",
            "accuracy",
            lambda e, cell: e.metric(_evaluate_key(e), f"{TEST}{cell.name}"),
            4,
            both=True,
        ),
        *cost("pretrain", lambda cell: cell.init),
        *cost("finetune", lambda cell: cell.name),
    ]


def _stage_quantities(gpu: bool, history: History | None) -> list[Quantity]:
    """The numbers of the stages that run once for all cells: seconds and peak memory."""

    def gpu_read(e: Execution, key: Key) -> float | None:
        run = e.runs.get(key)
        return None if run is None else _gpu_peak(run, history)

    found = [
        Quantity("seconds", "", lambda e, key: e.metric(key, SECONDS), 1, both=True),
        Quantity("peak MB", "", lambda e, key: e.metric(key, PEAK_RSS), 0, both=True),
    ]
    return found + ([Quantity("GPU MB", "", gpu_read, 0, both=True)] if gpu else [])


def _columns(labels: Sequence[str], quantities: Sequence[Quantity], pair: bool) -> list[Column]:
    """Text columns, then each quantity's column(s): one for one execution; with two, A, B and
    B - A (or B - A alone), grouped under the quantity's name."""
    columns = [Column(label, text=True) for label in labels]
    for q in quantities:
        if not pair:
            columns.append(Column(q.name, q.group))
        elif q.both:
            group = f"{q.name} {q.group}".strip()  # "validation accuracy", "seconds"
            columns += [Column(side, group) for side in ("A", "B", "B-A")]
        else:
            columns.append(Column(q.name, f"{q.group} B-A"))
    return columns


def _cells_row(
    quantities: Sequence[Quantity], executions: Sequence[Execution], item: Cell | Key
) -> list[str]:
    """One row's numbers for ``item`` (a cell or a run key) in one execution or two."""
    cells: list[str] = []
    for q in quantities:
        values = [q.read(e, item) for e in executions]
        if len(values) == 1:
            cells.append(_fixed(values[0], q.decimals))
            continue
        if q.both:
            cells += [_fixed(v, q.decimals) for v in values]
        cells.append(_difference(*values, decimals=q.decimals))
    return cells


def study_table(
    runs_a: Iterable[Run], runs_b: Iterable[Run] | None = None, history: History | None = None
) -> str:
    """The study: one row per cell (init, mode, label fraction) with its validation and test
    accuracy and the seconds and peak memory of its pretraining and fine-tuning runs; then one
    row per run of the other stages (download, split, augment, evaluate, visualize, and any
    pretraining no cell used) with theirs. With ``runs_b``, B - A on the same rows.

    ``history`` gives a metric's samples, for the GPU memory peak (MLflow keeps only the last
    sample as the run's value); the column appears only where a run sampled a GPU.
    """
    executions = [Execution.of(runs_a)] + ([Execution.of(runs_b)] if runs_b is not None else [])
    pair = len(executions) == 2
    gpu = any(
        GPU_MEMORY.fullmatch(m) for e in executions for r in e.runs.values() for m in r.data.metrics
    )
    cells = {k: c for e in executions for k, c in _cells(e).items()}
    ordered = [cells[k] for k in sorted(cells, key=_natural)]
    quantities = _study_quantities(gpu, history)
    numbers = [_cells_row(quantities, executions, c) for c in ordered]
    tables = [
        _render(
            _columns(("init", "mode", "fraction"), quantities, pair),
            [[c.init, c.mode, c.fraction, *row] for c, row in zip(ordered, numbers, strict=True)],
        )
        if ordered
        else "no study cells: no finetune or evaluate run in this execution"
    ]
    per_cell = {("finetune", c.name) for c in ordered} | {("pretrain", c.init) for c in ordered}
    once = sorted({k for e in executions for k in e.runs if k not in per_cell}, key=_row_order)
    if once:
        quantities = _stage_quantities(gpu, history)
        stage_numbers = [_cells_row(quantities, executions, key) for key in once]
        numbers += stage_numbers
        tables.append(
            _render(
                _columns(("stage", "run"), quantities, pair),
                [[s, k or MISSING, *row] for (s, k), row in zip(once, stage_numbers, strict=True)],
            )
        )
    notes = _repeated(executions) + _unfinished(executions)
    if any(MISSING in row for row in numbers):
        notes.append(MISSING_NOTE)
    return "\n\n".join([*tables, *(["\n".join(notes)] if notes else [])])


# --------------------------------------------------------------------------- the run view


def _metric_columns(
    wanted: Sequence[str] | None, logged: set[str], system: bool = False
) -> list[str]:
    """The metric columns: every logged one by name, or those ``wanted`` in the order given.

    A wanted entry with ``*``, ``?`` or ``[`` is a pattern (``n_*`` picks the data stages'
    counts) and adds the matching logged names, sorted; a plain name always gets its column,
    so a metric missing from every run shows as ``-`` rather than vanishing without a word.
    MLflow's system metrics (``system/...``) are left out of every pattern unless ``system``.
    """
    if not system:
        logged = {m for m in logged if not m.startswith(SYSTEM)}
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


def table(
    runs_a: Iterable[Run],
    runs_b: Iterable[Run] | None = None,
    metrics: Sequence[str] | None = None,
    system: bool = False,
    history: History | None = None,
) -> str:
    """One row per (stage, key) with the run's status and metrics, as fixed-width text.

    With ``runs_b``, each metric gets columns A, B and B - A (rows present in only one
    execution show ``-`` on the other side). ``metrics`` picks the metric columns in the order
    given; by default every metric any of the runs logged, sorted by name, MLflow's system
    metrics only with ``system`` (each shown as its highest sample where ``history`` gives the
    samples). Rows are in pipeline stage order, then by key, so the same store always prints
    the same table.
    """
    executions = [Execution.of(runs_a)] + ([Execution.of(runs_b)] if runs_b is not None else [])
    everything = [r for e in executions for r in e.runs.values()]
    names = _metric_columns(metrics, {m for r in everything for m in r.data.metrics}, system)
    keys = sorted({k for e in executions for k in e.runs}, key=_row_order)

    def status(execution: Execution, key: Key) -> str:
        run = execution.runs.get(key)
        return run.info.status if run is not None else MISSING

    def metric(execution: Execution, key: Key, name: str) -> float | None:
        run = execution.runs.get(key)
        if run is None or name not in run.data.metrics:
            return None
        if history is not None and name.startswith(SYSTEM):
            return max(history(run.info.run_id, name), default=run.data.metrics[name])
        return run.data.metrics[name]

    pair = len(executions) == 2
    columns = [Column("stage", text=True), Column("run", text=True)]
    columns += [Column(f"status {s}" if pair else "status", text=True) for s in "AB"[: 1 + pair]]
    for name in names:
        columns += [Column(f"{name} {s}") for s in ("A", "B", "B-A")] if pair else [Column(name)]
    rows: list[list[str]] = []
    for key in keys:
        row = [key[0], key[1] or MISSING, *(status(e, key) for e in executions)]
        for name in names:
            values = [metric(e, key, name) for e in executions]
            row += [_number(v) for v in values] + ([_difference(*values)] if pair else [])
        rows.append(row)
    return "\n\n".join([_render(columns, rows), *_repeated(executions)])


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
    """Print the study of the latest execution, of one, or of two side by side (B - A)."""
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
    print(_view(args, client, selected[0], selected[1] if len(selected) == 2 else None))
    return 0


def _view(
    args: argparse.Namespace, client: MlflowClient, runs_a: list[Run], runs_b: list[Run] | None
) -> str:
    """The study by default; the run view with --metric, or with --system (then every system
    metric unless --metric names others)."""

    @functools.cache  # the cell table asks for a pretraining run's samples once per cell
    def history(run_id: str, name: str) -> tuple[float, ...]:
        return tuple(m.value for m in client.get_metric_history(run_id, name))

    metrics, system = getattr(args, "metric", None), getattr(args, "system", False)
    if not metrics and not system:
        return study_table(runs_a, runs_b, history)
    wanted = metrics or [f"{SYSTEM}*"]
    return table(runs_a, runs_b, wanted, system, history)
