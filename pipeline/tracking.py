"""MLflow tracking: one run per stage execution, tagged so runs of one pipeline can be grouped.

The store is ``sqlite:///<repo>/mlflow.db`` (MLflow 3 refuses the old ./mlruns file store) with
artifacts under ``<repo>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it, for example to point
at an ``mlflow server``. Every run carries the tags ``stage``, ``dataset``, ``dataset_checksum``,
``pipeline_id`` (git commit + hash of params.yaml), ``git_commit``, ``git_dirty`` and, when the
Makefile or a user sets ``PIPELINE_EXECUTION``, ``execution`` (one id per pipeline invocation).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Config

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def git_state(cwd: Path | None = None) -> tuple[str, bool]:
    """(commit hash or "nogit", whether tracked files differ from it)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "nogit", False
    return commit, bool(dirty)


def pipeline_id(config: Config, commit: str | None = None) -> str:
    """Same code and same params give the same id: ``<commit[:12]>-<params hash[:12]>``."""
    commit = commit if commit is not None else git_state()[0]
    return f"{commit[:12]}-{config.params_hash[:12]}"


def flatten(value: Any, prefix: str) -> dict[str, str]:
    """Nested params as MLflow params: ``{"split.seed": "42", ...}``."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: str(value)}


class TrackedRun:
    """The MLflow run of one stage execution."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(batch), 100):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, params=batch[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def client() -> Any:
    """An MlflowClient on :func:`tracking_uri`, with MLflow's own chatter turned down."""
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(mlflow_client: Any, name: str) -> str:
    """The experiment's id, creating it (artifacts beside the SQLite store) when missing."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = Path(DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another stage created it between our look-up and our create.
        return mlflow_client.get_experiment_by_name(name).experiment_id


def resource_metrics(started: float) -> dict[str, float]:
    """What a stage execution cost: ``stage_seconds`` (inside the run), ``process_seconds``
    (the whole process, imports included) and ``peak_rss_mb`` (the process's peak resident
    memory, from getrusage; on Linux ru_maxrss is in KiB). The benchmarks read these."""
    import resource

    import pipeline

    now = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stage_seconds": now - started, "process_seconds": now - pipeline.PROCESS_STARTED,
            "peak_rss_mb": peak}  # fmt: skip


@contextlib.contextmanager
def stage_run(
    stage: str, config: Config, dataset: str, param_keys: Iterable[str]
) -> Iterator[TrackedRun]:
    """Open the MLflow run of one stage execution; it ends FINISHED, or FAILED on an exception."""
    mlflow_client = client()
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment)
    commit, dirty = git_state()
    tags = {
        "stage": stage,
        "dataset": dataset,
        "pipeline_id": pipeline_id(config, commit),
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "params_hash": config.params_hash,
    }
    if os.environ.get("PIPELINE_EXECUTION"):
        tags["execution"] = os.environ["PIPELINE_EXECUTION"]
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=f"{stage}-{dataset}")
    tracked = TrackedRun(mlflow_client, run.info.run_id)
    params: dict[str, str] = {}
    for key in param_keys:
        params.update(flatten(config.section(key), key))
    tracked.log_params(params)
    log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, tracking_uri())
    started = time.perf_counter()
    try:
        yield tracked
    except BaseException:
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        raise
    tracked.log_metrics(resource_metrics(started))
    mlflow_client.set_terminated(run.info.run_id, status="FINISHED")
