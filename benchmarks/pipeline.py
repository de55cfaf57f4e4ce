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
   (metrics/summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from benchmarks.machine import describe, save_result

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "split", "augment", "pretrain", "finetune", "evaluate", "visualize")
TARGETS = {
    "full": 0.93,
    "tenth_ssl": 0.90,
    "one_percent_gain": 0.05,
    "gain_1_to_10": 0.02,
    "knn_margin_over_pixels": 0.03,
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
) -> dict[str, Any]:
    """Measure a clean clone of ``source``; ``params`` replaces its params.yaml (tests do);
    ``figure_to`` receives a copy of the run's label-efficiency figure; ``change`` is the
    ``(section, key, new value)`` of the re-run measurement (default: ``CHANGED_PARAM`` nudged
    by 0.05; a test picks a cheaper one)."""
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
    """The targets, each choice made on validation, each number from the test split.

    - ``full``: at 100 % labels, the cell with the best validation accuracy.
    - ``tenth_ssl``: at 10 %, the best cell by validation among self-supervised inits.
    - ``one_percent_ssl`` / ``one_percent_baseline``: at 1 %, the best self-supervised cell and
      the best baseline cell (scratch, pixels or PCA, any mode), each chosen on validation;
      ``one_percent_gain`` is the difference of their test accuracies.
    - ``gains``: per init x mode, the test accuracy gained from 1 % to 10 % and from 10 % to
      100 % labels (scratch-linear is exempt from the target: random features barely learn).
    - ``knn``: each pretrained encoder's validation kNN monitor (metrics/pretrain), and the best
      self-supervised one's margin over raw pixels.
    """
    from pipeline.paths import metric_key
    from pipeline.study import BASELINES

    summary = json.loads((work / "metrics/summary.json").read_text())["test_accuracy"]
    validation = {}
    for path in sorted((work / "metrics/finetune").glob("*.json")):
        cell = json.loads(path.read_text())
        validation[(cell["init"], cell["mode"], cell["fraction"])] = cell["val_acc_mean"]

    def chosen(fraction: str, keep: Any) -> dict[str, Any] | None:
        cells = [(v, i, m) for (i, m, f), v in validation.items() if f == fraction and keep(i, m)]
        if not cells:
            return None
        val, init, mode = max(cells)
        test = summary[f"{init}-{mode}"][metric_key(fraction)]
        return {
            "cell": f"{init}-{mode}-{fraction}",
            "val": val,
            "test": test["mean"],
            "ci": [test["ci_low"], test["ci_high"]],
        }

    def ssl(init: str, mode: str) -> bool:
        return init not in BASELINES

    def baseline(init: str, mode: str) -> bool:
        return init in BASELINES

    out: dict[str, Any] = {
        "full": chosen("1.0", lambda i, m: True),
        "tenth_ssl": chosen("0.1", ssl),
        "one_percent_ssl": chosen("0.01", ssl),
        "one_percent_baseline": chosen("0.01", baseline),
    }
    pre, base = out["one_percent_ssl"], out["one_percent_baseline"]
    out["one_percent_gain"] = pre["test"] - base["test"] if pre and base else None
    gains = {}
    for model, cells in sorted(summary.items()):
        if {"0.01", "0.1", "1.0"} <= set(cells):
            one, ten, full = (cells[f]["mean"] for f in ("0.01", "0.1", "1.0"))
            gains[model] = {"1_to_10": ten - one, "10_to_100": full - ten}
    out["gains"] = gains
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
    out["knn"] = {
        "per_method": knn,
        "best_ssl": best_ssl and best_ssl[1],
        "margin_over_pixels": (best_ssl[0] - knn["pixels"])
        if best_ssl and "pixels" in knn
        else None,
    }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--cores", type=int, default=None, help="snakemake --cores (default: all)")
    args = parser.parse_args(argv)
    figure = args.json.with_name("label_efficiency.png") if args.json else None
    result = {
        "machine": describe("benchmarks.pipeline"),
        **run(cores=args.cores, figure_to=figure),
        "targets": TARGETS,
    }
    save_result(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
