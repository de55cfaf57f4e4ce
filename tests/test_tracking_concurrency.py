"""Parallel stages and parallel pipelines on one SQLite MLflow store: every run recorded.

Real processes on a real SQLite file. Before tracking.prepare_store, processes that met a fresh
store together raced on MLflow's schema creation ("table ... already exists", "duplicate column",
alembic "expected to match one row"); the tests below start them together on purpose.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load
from pipeline.errors import PipelineError
from tests.conftest import REPO, make_project, run, run_env

EXPERIMENT = "label-efficiency"
STRESS_KEYS = ("split", "augment")
WORKERS = 6
STEPS = 20
#: Pretraining and fine-tuning ask for every core (threads: workflow.cores), so with --cores 2
#: nothing would run side by side; one thread each lets two training jobs share the two cores.
ONE_THREAD_EACH = ["--set-threads", "pretrain=1", "finetune=1"]


def _worker(index: int, mode: str, steps: int) -> None:
    """What a stage does to the store: params, many metric batches, an artifact, the end status;
    in "lightning" mode also Lightning's MLFlowLogger writing into the same run."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - imported before the start line

    if mode == "lightning":
        from lightning.pytorch.loggers import MLFlowLogger
    config = load(REPO / "params.yaml")
    artifact = Path(f"artifact-{index}.txt")
    artifact.write_text(f"worker {index}\n")
    _wait_for_start(index)
    with tracking.stage_run("stress", config, "idx", STRESS_KEYS) as tracked:
        tracked.set_tags({"worker": index, "mode": mode})
        for step in range(steps):
            tracked.log_metrics({"m_a": step, "m_b": 2.0 * step}, step=step)
        if mode == "lightning":
            logger = MLFlowLogger(
                experiment_name=config.tracking.experiment,
                tracking_uri=tracking.tracking_uri(),
                run_id=tracked.run_id,
            )
            logger.log_hyperparams({"lr": 0.1, "worker": index})
            for step in range(steps):
                logger.log_metrics({"epoch_loss": 1.0 / (step + 1)}, step=step)
            logger.finalize("success")
        tracked.log_artifact(artifact)


def _wait_for_start(index: int) -> None:
    """Say ready, then wait for the test's "go": imports done, every worker meets the fresh store
    within a few milliseconds of the others, which is what made schema creation race."""
    Path(f"ready-{index}").touch()
    deadline = time.monotonic() + 240
    while not Path("go").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"worker {index}: no start signal")
        time.sleep(0.005)


def _start_together(folder: Path, count: int, processes: dict[str, subprocess.Popen]) -> None:
    """Touch ``go`` once ``count`` workers are ready (or one of them has already died)."""
    deadline = time.monotonic() + 240
    while len(list(folder.glob("ready-*"))) < count:
        assert time.monotonic() < deadline, "workers never got ready"
        if any(p.poll() is not None for p in processes.values()):
            break  # _finish reports what it printed
        time.sleep(0.05)
    (folder / "go").touch()


def _runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    assert found is not None, f"no experiment {EXPERIMENT} in {uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def _parents_and_stage_runs(uri: str) -> tuple[list, list]:
    """(each execution's parent run, the stage runs) in the store."""
    runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("role") == "execution"]
    return parents, [r for r in runs if r.data.tags.get("role") != "execution"]


def _overlapping(runs: list) -> list[tuple[str, str]]:
    """Pairs of runs (by name) whose start..end times overlap: they ran at the same time."""
    spans = sorted((r.info.start_time, r.info.end_time, r.info.run_name) for r in runs)
    return [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1]]


def _start(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(processes: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    """Wait for every process; all must exit 0 without a locked store in what they printed."""
    outputs = {name: p.communicate(timeout=timeout)[0] for name, p in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, f"{name} exited {process.returncode}:\n{outputs[name]}"
        assert tracking.LOCKED not in outputs[name], f"{name}:\n{outputs[name]}"
    return outputs


def _assert_never_locked(project: Path, output: str) -> None:
    """Neither Snakemake's output nor any stage log mentions a locked store (not even a retry)."""
    logs = "".join(path.read_text() for path in (project / "logs").rglob("*.log"))
    assert list((project / "logs").rglob("*.log")), "no stage logs"
    assert tracking.LOCKED not in output + logs
    assert "retrying" not in logs


def test_processes_started_together_on_a_fresh_store_all_record_their_runs(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # a folder that does not exist yet
    env = run_env() | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    modes = ["lightning" if i % 2 else "stage" for i in range(WORKERS)]
    workers = {
        f"worker-{i}": _start(
            [sys.executable, "-m", "tests.test_tracking_concurrency", str(i), mode, str(STEPS)],
            tmp_path,
            env,
        )
        for i, mode in enumerate(modes)
    }
    _start_together(tmp_path, WORKERS, workers)
    _finish(workers, timeout=300)

    config = load(REPO / "params.yaml")
    params = {
        k: v for key in STRESS_KEYS for k, v in tracking.flatten(config.section(key), key).items()
    }
    runs = _runs(uri)
    assert len(runs) == WORKERS
    assert sorted(int(r.data.tags["worker"]) for r in runs) == list(range(WORKERS))
    client = MlflowClient(tracking_uri=uri)
    for r in runs:
        lightning = r.data.tags["mode"] == "lightning"
        assert r.info.status == "FINISHED", r.data.tags["worker"]
        assert r.data.params == params | (
            {"lr": "0.1", "worker": r.data.tags["worker"]} if lightning else {}
        )
        for key in ("m_a", "m_b", *(["epoch_loss"] if lightning else [])):
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert steps == list(range(STEPS)), (r.data.tags["worker"], key)
        assert "stage_seconds" in r.data.metrics
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == [
            f"artifact-{r.data.tags['worker']}.txt"
        ]
    assert (tmp_path / "store" / "mlartifacts").is_dir()  # beside the store, not in the cwd
    assert len(_overlapping(runs)) > 0


@dataclass(frozen=True)
class TwoPipelines:
    """Two Snakemake pipelines that ran at once on one store (``uri``): ``first``, the ``project``
    repository, ran both pretraining jobs side by side (``--cores 2``, one thread each);
    ``second``, a clone of it, pretrained simclr on one core. ``outputs``: what each printed."""

    first: Path
    second: Path
    uri: str
    outputs: dict[str, str]


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory: pytest.TempPathFactory) -> TwoPipelines:
    """One run of minutes for both tests below: parallel stages within a pipeline and parallel
    pipelines on one store are the same run, each checked from its own side."""
    tmp = tmp_path_factory.mktemp("two_pipelines")
    first = make_project(tmp)
    second = tmp / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp)
    uri = f"sqlite:///{tmp / 'shared' / 'mlflow.db'}"  # a folder that does not exist yet
    both = ["models/pretrain/scratch", "models/pretrain/simclr"]
    # MLflow's system metrics every second (the default, 10 s, outlasts these tiny jobs).
    first_env = {"PIPELINE_EXECUTION": "first", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    pipelines = {
        "first": _start(
            ["snakemake", "--cores", "2", *both, *ONE_THREAD_EACH],
            first,
            run_env() | {"MLFLOW_TRACKING_URI": uri} | first_env,
        ),
        "second": _start(
            ["snakemake", "--cores", "1", "models/pretrain/simclr"],
            second,
            run_env() | {"MLFLOW_TRACKING_URI": uri, "PIPELINE_EXECUTION": "second"},
        ),
    }
    return TwoPipelines(first, second, uri, _finish(pipelines, timeout=600))


def test_snakemake_runs_stages_side_by_side_on_one_store(two_pipelines: TwoPipelines):
    project = two_pipelines.first
    _assert_never_locked(project, two_pipelines.outputs["first"])

    parents, stage_runs = _parents_and_stage_runs(two_pipelines.uri)
    (parent,) = [p for p in parents if p.data.tags["execution"] == "first"]
    runs = [r for r in stage_runs if r.data.tags["execution"] == "first"]
    # One execution is one tree: every stage run nested under its parent run, with the commit.
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert {r.data.tags["mlflow.source.git.commit"] for r in [parent, *runs]} == {commit}
    assert Counter(r.data.tags["stage"] for r in runs) == {
        "download": 1,
        "split": 1,
        "augment": 1,
        "pretrain": 2,
    }
    assert {r.data.tags["method"] for r in runs if r.data.tags["stage"] == "pretrain"} == {
        "scratch",
        "simclr",
    }
    assert all(r.info.status == "FINISHED" for r in runs)
    # Lightning's MLFlowLogger wrote its per-epoch curve into simclr's run.
    (simclr,) = (r for r in runs if r.data.tags.get("method") == "simclr")
    assert {"val_knn_acc", "final_val_knn_acc"} <= simclr.data.metrics.keys()
    assert {
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
    } <= simclr.data.metrics.keys()
    # The jobs ran side by side: their processes (imports included, process_seconds before each
    # run's end) overlap. The runs themselves may not: scratch's lasts a fraction of a second.
    both = [r for r in runs if r.data.tags["stage"] == "pretrain"]
    spans = sorted(
        (r.info.end_time - 1000 * r.data.metrics["process_seconds"], r.info.end_time) for r in both
    )
    assert spans[1][0] < spans[0][1], f"the pretraining jobs ran one after the other: {spans}"


def test_two_pipelines_at_once_share_one_store(two_pipelines: TwoPipelines):
    folders = {"first": two_pipelines.first, "second": two_pipelines.second}
    for name, folder in folders.items():
        _assert_never_locked(folder, two_pipelines.outputs[name])

    parents, runs = _parents_and_stage_runs(two_pipelines.uri)
    expected = {"first": ["scratch", "simclr"], "second": ["simclr"]}
    for name, methods in expected.items():
        mine = [r for r in runs if r.data.tags.get("execution") == name]
        assert sorted(r.data.tags["stage"] for r in mine) == sorted(
            ["download", "split", "augment", *["pretrain"] * len(methods)]
        ), name
        assert all(r.info.status == "FINISHED" for r in mine), name
        # Each pipeline's runs hang under its own parent, however the two interleaved.
        (parent,) = [p for p in parents if p.data.tags["execution"] == name]
        assert {r.data.tags["mlflow.parentRunId"] for r in mine} == {parent.info.run_id}
    assert len(runs) == 9 and len(parents) == 2
    # The two pipelines ran at once: a run of one overlaps a run of the other (the first's own
    # two pretraining runs overlap too, but that is the other test's point).
    first, second = ([r for r in runs if r.data.tags["execution"] == n] for n in expected)
    assert any(
        a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
        for a in first
        for b in second
    )
    assert not any((folder / "mlflow.db").exists() for folder in folders.values())


def test_a_store_locked_for_a_while_makes_writers_wait_not_fail(tmp_path: Path):
    """A write transaction held for 3 s by another process: the stage waits it out."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = run_env() | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    tracking.prepare_store(uri)  # the schema exists: what is measured is the wait for the lock
    (tmp_path / "go").touch()
    holder = _start(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]);"
            "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(3);"
            "c.rollback()",
            str(db),
        ],
        tmp_path,
        env,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    worker = _start(
        [sys.executable, "-m", "tests.test_tracking_concurrency", "0", "stage", "3"], tmp_path, env
    )
    _finish({"holder": holder, "worker": worker}, timeout=120)
    assert time.monotonic() - started > 2.5  # it did have to wait
    (only,) = _runs(uri)
    assert only.info.status == "FINISHED"


def test_a_lock_that_never_clears_ends_in_one_clear_error(monkeypatch, caplog):
    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (0.01, 0.01))
    calls = []

    def locked() -> None:
        calls.append(1)
        raise RuntimeError("(sqlite3.OperationalError) database is locked")

    with pytest.raises(PipelineError, match=r"stayed locked .* 3 tries .*MLFLOW_TRACKING_URI"):
        tracking.with_retry(locked, "logging metrics")
    assert len(calls) == 3
    assert [r.levelname for r in caplog.records if "retrying" in r.message] == ["WARNING"] * 2
    flaky = iter([RuntimeError("database is locked"), None])

    def once_locked() -> str:
        error = next(flaky)
        if error:
            raise error
        return "done"

    assert tracking.with_retry(once_locked, "logging metrics") == "done"
    with pytest.raises(ValueError, match="other"):  # other errors are not retried
        tracking.with_retry(lambda: (_ for _ in ()).throw(ValueError("other")), "x")


def test_a_stuck_store_initialisation_ends_in_one_clear_error(tmp_path: Path, monkeypatch):
    import fcntl

    db = tmp_path / "mlflow.db"
    monkeypatch.setattr(tracking, "INIT_LOCK_TIMEOUT_S", 0.5)
    with open(tmp_path / "mlflow.db.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # flock locks belong to the open file: a second open in this process is refused too.
        with pytest.raises(PipelineError, match=r"mlflow\.db\.lock for over 0\.5 s"):
            tracking.prepare_store(f"sqlite:///{db}")
    tracking.prepare_store(f"sqlite:///{db}")  # released: it goes through
    assert db.exists()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
