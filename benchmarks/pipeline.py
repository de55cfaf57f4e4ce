"""The whole default pipeline from a clean state: time and memory per stage, re-run times, and
the study's numbers against the quality targets.

python -m benchmarks.pipeline [--json benchmarks/results/pipeline.json] [--cores N]

What it does, in a fresh ``git clone`` of the repository's committed state (so nothing already
computed is reused and uncommitted edits are not measured):

1. ``snakemake --cores N``: the wall-clock time of the whole pipeline; per stage, the jobs'
   process time (imports included) and peak resident memory, read from the MLflow run every
   stage execution records (``tracking.resource_metrics``);
2. the no-op re-runs: ``snakemake`` again, then ``dvc commit`` (what ``make run`` does) and
   ``dvc repro`` (both must find nothing to do);
3. a re-run after changing one fine-tuning param (``finetune.label_smoothing``): the cells, the
   evaluation and the report run again, nothing upstream;
4. the quality targets, every choice made on validation (metrics/finetune) and reported on test
   (metrics/summary.json), for whatever label grid the params name (label fractions, or labeled
   images per class).

The result's ``quality`` holds (budgets as named in files: ``0.01``, ``1.0``, ``4pc``, ``all``):

- ``budgets``: finetune.fractions, smallest first (``paths.budget_size``);
- ``largest``: at the largest budget, the best cell on validation;
- ``second_ssl``: at the second-largest budget, the best self-supervised (or semi) cell;
- ``smallest_ssl`` / ``smallest_baseline``: at the smallest budget, the best self-supervised
  (or semi) cell and the best baseline cell; ``smallest_gain``: their test difference;
- ``answer``: metrics/summary.json's ``answer`` as is (per budget key, ``0_01`` or ``4pc``: both
  cells, the difference and its paired 95 % interval);
- ``gains``: per init x mode, the test accuracy gained between consecutive budgets
  (``"4pc->25pc"``);
- ``knn``: each pretrained encoder's validation kNN, and the best self-supervised one's margin
  over raw pixels.

A chosen cell is ``{"cell", "budget", "val", "test", "ci"}``, or null where the grid has no such
budget or side. ``TARGETS`` is keyed like the quality entry each target judges.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from benchmarks.machine import describe, save_result

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "split", "augment", "pretrain", "finetune", "evaluate", "visualize")
#: The study's targets, keyed like the ``quality`` entry each judges. ``gain_step``: the first
#: step up the grid (smallest budget to the next) gains at least this much test accuracy, and every
#: later step gains some; ``knn``: the best self-supervised kNN's margin over raw pixels.
TARGETS = {
    "largest": 0.93,
    "second_ssl": 0.90,
    "smallest_gain": 0.05,
    "gain_step": 0.02,
    "knn": 0.03,
    "minutes": 15.0,
}
CHANGED_PARAM = ("finetune", "label_smoothing")


def run(
    source: Path = REPO,
    cores: int | None = None,
    workdir: Path | None = None,
    params: dict | None = None,
    figure_to: Path | None = None,
    change: tuple[str, str, Any] | None = None,
    measure_reruns: bool = True,
) -> dict[str, Any]:
    """Measure a clean clone of ``source``; ``params`` replaces its params.yaml (tests do);
    ``figure_to`` receives a copy of the run's label-efficiency figure; ``change`` is the
    ``(section, key, new value)`` of the re-run measurement (default: ``CHANGED_PARAM`` nudged
    by 0.05; a test picks a cheaper one). ``measure_reruns=False`` skips the re-runs (the
    param change re-trains every cell); a ``workdir`` given is kept, for benchmarks.scarce."""
    cores = cores or os.cpu_count() or 1
    owned = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="pipeline-benchmark-")) / "project"
    try:
        _clone(source, work, params)
        result: dict[str, Any] = {"cores": cores, "commit": _git(work, "rev-parse", "HEAD")}
        started = time.perf_counter()
        _run(["snakemake", "--cores", str(cores)], work)
        result["total_seconds"] = time.perf_counter() - started
        result["stages"] = stage_costs(work)
        result["quality"] = quality(work)
        result["summary_markdown"] = (work / "metrics/summary.md").read_text()
        if figure_to is not None:  # the study's figure, for README (the clone is deleted)
            figure_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / "reports/figures/label_efficiency.png", figure_to)
        if measure_reruns:
            result["reruns"] = reruns(work, cores, change)
        return result
    finally:
        if owned:
            shutil.rmtree(work.parent, ignore_errors=True)


def _clone(source: Path, work: Path, params: dict | None) -> None:
    subprocess.run(["git", "clone", "-q", str(source), str(work)], check=True)
    if params is not None:
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _git(
            work,
            "-c",
            "user.email=bench@localhost",
            "-c",
            "user.name=bench",
            "commit",
            "-qam",
            "benchmark params",
        )


def _env() -> dict[str, str]:
    """The venv first on PATH (stage commands call `python`), a store of the clone's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PIPELINE_"))}
    venv = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    env["PATH"] = f"{venv}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = _run(command, cwd)
    return time.perf_counter() - started, result.stdout + result.stderr


def stage_costs(work: Path) -> dict[str, dict[str, float]]:
    """Per stage: jobs, summed process seconds (imports included), slowest job, peak memory."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=10000)
    costs: dict[str, dict[str, float]] = defaultdict(
        lambda: {"jobs": 0, "seconds": 0.0, "slowest_job_seconds": 0.0, "peak_rss_mb": 0.0}
    )
    for found in runs:
        metrics = found.data.metrics
        if found.info.status != "FINISHED" or "process_seconds" not in metrics:
            continue
        cost = costs[found.data.tags["stage"]]
        cost["jobs"] += 1
        cost["seconds"] += metrics["process_seconds"]
        cost["slowest_job_seconds"] = max(cost["slowest_job_seconds"], metrics["process_seconds"])
        cost["peak_rss_mb"] = max(cost["peak_rss_mb"], metrics["peak_rss_mb"])
    return {stage: dict(costs[stage]) for stage in STAGES if stage in costs}


def reruns(work: Path, cores: int, change: tuple[str, str, Any] | None = None) -> dict[str, Any]:
    """No-op re-runs of both runners, then one param changed (a fine-tuning one by default)."""
    out: dict[str, Any] = {}
    out["snakemake_noop_seconds"], text = _timed(["snakemake", "--cores", str(cores)], work)
    out["snakemake_noop_nothing_to_do"] = "Nothing to be done" in text
    _run(["dvc", "commit", "--force", "--quiet"], work)  # what `make run` does after snakemake
    out["dvc_noop_seconds"], text = _timed(["dvc", "repro"], work)
    out["dvc_noop_skipped_all"] = "didn't change, skipping" in text and "Running stage" not in text
    params = yaml.safe_load((work / "params.yaml").read_text())
    section, key = change[:2] if change else CHANGED_PARAM
    value = params[section][key]
    if change:
        params[section][key] = change[2]
    else:
        params[section][key] = round(value + 0.05, 6) if value < 0.9 else value - 0.05
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    planned = _run(["snakemake", "-n"], work).stdout
    out["param_change"] = f"{section}.{key}: {value} -> {params[section][key]}"
    out["param_change_jobs"] = _job_counts(planned)
    out["param_change_seconds"], _ = _timed(["snakemake", "--cores", str(cores)], work)
    return out


def _job_counts(dry_run: str) -> dict[str, int]:
    """Snakemake's dry-run job table: rule -> job count (without `all`)."""
    counts: dict[str, int] = {}
    in_table = False
    for line in dry_run.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table and len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("all", "total"):
            counts[parts[0]] = int(parts[1])
        elif in_table and parts and parts[0] == "total":
            break
    return counts


def quality(work: Path) -> dict[str, Any]:
    """The targets for the grid in the clone's params (the keys: this module's docstring), each
    choice made on validation, each number from the test split.

    The cells are chosen by ``pipeline.study.best_by_validation`` with ``study.is_baseline``, the
    choice the evaluate stage makes for summary.json's ``answer``: a semi cell counts on the
    self-supervised side whatever its init, and ties go the same way, so ``smallest_ssl`` and
    ``smallest_baseline`` are the answer's cells at the smallest budget.
    """
    from pipeline import config as pipeline_config
    from pipeline import paths
    from pipeline.study import best_by_validation, is_baseline

    config = pipeline_config.load(work / "params.yaml")
    budgets = sorted(map(paths.fraction_name, config.finetune.fractions), key=paths.budget_size)
    document = json.loads((work / "metrics/summary.json").read_text())
    test = document["test_accuracy"]
    with contextlib.chdir(work):  # the study reads metrics/finetune relative to the project root
        best = best_by_validation(config)
        ssl = best_by_validation(config, lambda init, mode: not is_baseline(init, mode))
        baseline = best_by_validation(config, is_baseline)

    def chosen(
        cells: dict[str, tuple[float, str, str, Any]], budget: str | None
    ) -> dict[str, Any] | None:
        if budget not in cells:
            return None
        val, init, mode, _ = cells[budget]
        scores = test[f"{init}-{mode}"][paths.metric_key(budget)]
        return {
            "cell": paths.cell_name(init, mode, budget),
            "budget": budget,
            "val": val,
            "test": scores["mean"],
            "ci": [scores["ci_low"], scores["ci_high"]],
        }

    smallest = budgets[0]
    out: dict[str, Any] = {
        "budgets": budgets,
        "largest": chosen(best, budgets[-1]),
        "second_ssl": chosen(ssl, budgets[-2] if len(budgets) > 1 else None),
        "smallest_ssl": chosen(ssl, smallest),
        "smallest_baseline": chosen(baseline, smallest),
    }
    pre, base = out["smallest_ssl"], out["smallest_baseline"]
    out["smallest_gain"] = pre["test"] - base["test"] if pre and base else None
    out["answer"] = document["answer"]
    out["gains"] = budget_gains(test, budgets)
    out["knn"] = knn_margin(work)
    return out


def budget_gains(test: dict[str, dict[str, dict]], budgets: list[str]) -> dict[str, dict]:
    """Per ``init-mode`` of summary.json's ``test_accuracy``: the mean test accuracy gained at each
    step up the grid, keyed ``"<smaller>-><larger>"``. A model that lacks a budget is left out:
    a step with a missing end would not be a gain."""
    from pipeline.paths import metric_key

    keys = [metric_key(b) for b in budgets]
    gains = {}
    for model, cells in sorted(test.items()):
        if len(budgets) > 1 and set(keys) <= set(cells):
            mean = {budget: cells[key]["mean"] for budget, key in zip(budgets, keys, strict=True)}
            gains[model] = {f"{a}->{b}": mean[b] - mean[a] for a, b in pairwise(budgets)}
    return gains


def knn_margin(work: Path) -> dict[str, Any]:
    """Each pretrained encoder's validation kNN monitor (metrics/pretrain), and the best
    self-supervised one's margin over raw pixels (the baselines are methods here, not cells)."""
    from pipeline.study import BASELINES

    knn = {}
    for path in sorted((work / "metrics/pretrain").glob("*.json")):
        value = json.loads(path.read_text()).get("val_knn_acc")
        if value is not None:
            knn[path.stem] = value
    best_ssl = (
        max((v, m) for m, v in knn.items() if m not in BASELINES)
        if any(m not in BASELINES for m in knn)
        else None
    )
    return {
        "per_method": knn,
        "best_ssl": best_ssl and best_ssl[1],
        "margin_over_pixels": (best_ssl[0] - knn["pixels"])
        if best_ssl and "pixels" in knn
        else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--cores", type=int, default=None, help="snakemake --cores (default: all)")
    parser.add_argument(
        "--keep", type=Path, help="run in this folder and keep it (benchmarks.scarce adds to it)"
    )
    parser.add_argument(
        "--no-reruns", action="store_true", help="skip the re-run measurements (minutes)"
    )
    args = parser.parse_args(argv)
    figure = args.json.with_name("label_efficiency.png") if args.json else None
    measured = run(
        cores=args.cores,
        workdir=args.keep,
        figure_to=figure,
        measure_reruns=not args.no_reruns,
    )
    result = {
        "machine": describe("benchmarks.pipeline"),
        **measured,
        "targets": TARGETS,
    }
    save_result(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
