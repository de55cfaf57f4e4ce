"""MLflow tracking: one run per stage execution, tagged so runs of one pipeline can be grouped.

The store is ``sqlite:///<repo>/mlflow.db`` (MLflow 3 refuses the old ./mlruns file store) with
artifacts under ``<repo>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it, for example to point
at an ``mlflow server`` or at another SQLite file (whose artifacts then go beside that file).
Every run carries the tags ``stage``, ``dataset``, ``dataset_checksum``, ``pipeline_id`` (git
commit + hash of params.yaml), ``git_commit``, ``git_dirty``, MLflow's ``mlflow.source.*`` and,
under a pipeline invocation, ``execution`` (one id per invocation). The invocation has a parent
run (tag ``role: execution``) that every stage run of it is nested under (:func:`start_execution`).

Stages run side by side (``snakemake --cores N``) and whole pipelines run at once against one
SQLite store, so every client goes through :func:`prepare_store` (schema creation one process at a
time, a generous SQLite busy timeout) and the calls a stage makes are retried while the store is
locked (:func:`with_retry`).

A store that cannot be written (a full disk, a file-size limit, a read-only file, a server that
refuses) is the machine's state, not a bug: the stage stops with one line naming the store and
the way out (:class:`StoreError`). The stage's run is created before it does any work, so such a
store stops it before any output is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io import is_disk_error

if TYPE_CHECKING:  # mlflow is imported when a stage opens its run, not at CLI start
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"

#: SQLite busy timeout for every connection this process opens, so schema checks and migrations
#: wait for another process's write instead of failing (pysqlite's default is 5 s; MLflow's own
#: sessions set 20 s on each session, which then applies to the rest of their work).
BUSY_TIMEOUT_S = 60.0
#: How long to wait for another process that is creating or upgrading the store's schema.
INIT_LOCK_TIMEOUT_S = 300.0
#: Pauses between tries of an MLflow call that failed with "database is locked" (each try already
#: waited for the busy timeout), so a stage gives up with a clear error after about two minutes.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)
LOCKED = "database is locked"

#: The experiment tag MLflow 3's UI reads to choose an experiment's landing page: without it an
#: experiment may open on the GenAI overview of traces, empty for this pipeline;
#: ``custom_model_development`` is the training view (its runs). MLflow 3.17's UI follows its
#: own "GenAI | Model training" switch instead; README says how to open the training view there.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: SQLite's words for a store it cannot write: (text in the error, what it means, what to do).
#: ``{path}`` is the database file. A file-size limit makes SQLite's write fail with EFBIG,
#: which it reports as a disk I/O error.
_SQLITE_PROBLEMS = (
    ("database or disk is full", "the disk is full", "free space on the disk that holds {path}"),
    (
        "disk I/O error",
        "disk I/O error (a full disk, a file-size limit or a failing disk)",
        "free space on the disk that holds {path} or raise the file-size limit "
        "(ulimit -f unlimited)",
    ),
    (
        "attempt to write a readonly database",
        "the database file is read-only",
        "make {path} and its folder writable for you",
    ),
    (
        "unable to open database file",
        "the database file cannot be opened or created",
        "make sure the folder of {path} exists and is writable for you",
    ),
)
#: MLflow error codes of a server that refuses a request; any other code (a bad parameter, a
#: name that exists) is a mistake in the request and keeps its traceback.
_SERVER_REFUSALS = frozenset(
    {
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
        "TEMPORARILY_UNAVAILABLE",
        "INTERNAL_ERROR",
        "ENDPOINT_NOT_FOUND",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
    }
)
OTHER_STORE = (
    "or send the runs to another store (MLFLOW_TRACKING_URI=sqlite:////abs/path/other.db, "
    "or the http:// address of an mlflow server)"
)

T = TypeVar("T")
_prepared: set[str] = set()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI; None for servers and in-memory stores."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError:  # http://, databricks, file stores: not a SQLAlchemy URL
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def artifacts_root(uri: str) -> Path | None:
    """Where a SQLite store's artifacts go: ``mlartifacts`` beside the database file, so pipelines
    sharing one store share one artifact folder whichever of them created the experiment."""
    path = sqlite_path(uri)
    return None if path is None else path.parent / DEFAULT_ARTIFACTS


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and what caused it, outermost first (MLflow wraps sqlite3.OperationalError in
    sqlalchemy's, then in an MlflowException; Lightning's teardown can add a second error)."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def is_locked(error: BaseException) -> bool:
    """Whether an error (or what caused it) is SQLite's SQLITE_BUSY, "database is locked"."""
    return any(LOCKED in str(seen) for seen in _chain(error))


class StoreError(PipelineError):
    """The MLflow store refused a write: full disk, file-size limit, read-only file, a server
    that refuses. The message names the store, what it said, and what to do."""


def store_problem(error: BaseException, uri: str) -> tuple[str, str] | None:
    """(what is wrong, what to do) when ``error`` says the store at ``uri`` cannot be written;
    None for anything else (a bug keeps its traceback)."""
    path = sqlite_path(uri)
    for seen in _chain(error):
        if isinstance(seen, sqlite3.Error):
            text = str(seen)
            for needle, problem, remedy in _SQLITE_PROBLEMS:
                if needle in text:
                    return problem, remedy.format(path=path)
        written = _written(seen) if is_disk_error(seen) else None
        if written is not None and _in_store(written, path):
            assert isinstance(seen, OSError)
            return f"{os.strerror(seen.errno)} while writing {written}", "free space on that disk"
    if path is None and _refused_by_server(error):
        return (
            f"the server did not take the request: {_first_line(error)}",
            f"check that the server at {uri} runs and lets you write (its log says why)",
        )
    return None


def _written(error: BaseException) -> Path | None:
    """The file a refused write went to (``filename2`` where an OSError has two: copy, rename)."""
    if not isinstance(error, OSError):
        return None
    written = error.filename2 if error.filename2 is not None else error.filename
    return None if written is None else Path(os.fsdecode(written))


def _in_store(written: Path, database: Path | None) -> bool:
    """Whether a refused write was the store's (its database or artifact folder), not one of the
    stage's own outputs: those are the disk errors the CLI reports (pipeline.cli)."""
    if database is None:
        return False
    target = written.resolve()
    artifacts = database.parent / DEFAULT_ARTIFACTS
    in_folder = target.parent == database.parent and target.name.startswith(database.name)
    return in_folder or target.is_relative_to(artifacts)


def _refused_by_server(error: BaseException) -> bool:
    """Whether MLflow's REST client gave up on the server: no answer, or a refusal."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    return error.message.startswith("API request to") or error.error_code in _SERVER_REFUSALS


def _first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, cut to ``limit`` characters: MLflow's messages
    carry the SQL statement and the server's whole response body."""
    text = str(getattr(error, "message", error)).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else f"{line[: limit - 3]}..."


def store_error(error: BaseException, what: str) -> StoreError | None:
    """A one-line :class:`StoreError` for a store that cannot be written, else None."""
    if isinstance(error, StoreError):
        return error
    uri = tracking_uri()
    found = store_problem(error, uri)
    if found is None:
        return None
    problem, remedy = found
    return StoreError(
        f"MLflow store {uri} cannot be written while {what}: {problem}; {remedy}, {OTHER_STORE}, "
        "then run it again"
    )


class _HideReportedStoreErrors(logging.Filter):
    """MLflow logs a database error with its whole traceback before it raises it. One that means
    the store cannot be written is reported by the stage in one line (:func:`store_error`), so
    the traceback is dropped here; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or store_problem(error, tracking_uri()) is None


def with_retry(call: Callable[[], T], what: str) -> T:
    """``call()``, tried again with growing pauses while the store reports "database is locked".

    Every try already waited for SQLite's busy timeout, so a lock that outlasts all of them is
    held by something stuck: the stage stops with one line that names the store and the way out.
    A store that cannot be written at all (:func:`store_error`) stops it at once, also in one line.
    A failed try was rolled back by MLflow's session, so trying again cannot record twice.
    """
    started = time.monotonic()
    for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
        try:
            return call()
        except Exception as err:
            if not is_locked(err):
                refused = store_error(err, what)
                if refused is None or refused is err:
                    raise
                raise refused from err
            if delay is None:
                raise PipelineError(
                    f"MLflow store {tracking_uri()} stayed locked ({LOCKED}) while {what}, "
                    f"{attempt} tries over {time.monotonic() - started:.0f} s: another process "
                    "holds a write on it; stop that process, or give this pipeline its own "
                    "store (MLFLOW_TRACKING_URI=sqlite:////abs/path/other.db) or an mlflow server"
                ) from err
            log.warning(
                "MLflow store locked while %s (try %d); retrying in %.0f s", what, attempt, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _set_busy_timeout(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    """SQLAlchemy "connect" hook: a generous busy timeout on every new SQLite connection."""
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")


def _install_busy_timeout() -> None:
    """Hook :func:`_set_busy_timeout` into every SQLAlchemy engine of this process.

    Listening on the Engine class reaches the engine MLflow creates (and caches per URI) for
    our client and for Lightning's ``MlflowClient(tracking_uri)``, without touching MLflow."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _set_busy_timeout):
        event.listen(Engine, "connect", _set_busy_timeout)


@contextlib.contextmanager
def _exclusive(lock_path: Path, uri: str) -> Iterator[None]:
    """Hold an flock on ``lock_path``; the kernel drops it if the holder dies, so a left-over
    lock file never blocks anyone. Gives up after INIT_LOCK_TIMEOUT_S with a PipelineError.
    Where the lock file cannot be made (a read-only folder) nothing can write the store either,
    so reading goes on without it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        log.warning("cannot open %s (%s); using the MLflow store without it", lock_path, err)
        yield
        return
    try:
        deadline = time.monotonic() + INIT_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"another process has held {lock_path} for over "
                        f"{INIT_LOCK_TIMEOUT_S:g} s while creating the MLflow store {uri}; "
                        "wait for it to finish or stop it, then run the stage again"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def prepare_store(uri: str) -> None:
    """Make a SQLite store ready (tables, migrations, default experiment) one process at a time.

    MLflow's tracking SqlAlchemyStore creates and migrates a fresh database without a lock (its
    jobs and workspace stores use a file lock, ``_safe_initialize_tables``), so stages started
    together fail with "table ... already exists", "duplicate column" or alembic errors. Here the
    first store of the process is built under an flock on ``<db>.lock``; MLflow caches that store
    per URI, so later clients in the process (Lightning's MLFlowLogger included) reuse it.
    Servers and other stores are left alone: they handle their own concurrency.
    """
    path = sqlite_path(uri)
    if path is None or uri in _prepared:
        return
    _install_busy_timeout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    with _exclusive(path.with_name(f"{path.name}.lock"), uri):
        with_retry(
            lambda: MlflowClient(uri).search_experiments(max_results=1), "creating the store"
        )
    _prepared.add(uri)


def git_state(cwd: Path | None = None) -> tuple[str, bool]:
    """(commit hash or "nogit", whether tracked files differ from it)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nogit", False
    return commit, bool(dirty)


def pipeline_id(config: Config, commit: str | None = None) -> str:
    """Same code and same params give the same id: ``<commit[:12]>-<params hash[:12]>``."""
    commit = commit if commit is not None else git_state()[0]
    return f"{commit[:12]}-{config.params_hash[:12]}"


def flatten(value: object, prefix: str) -> dict[str, str]:
    """Nested params as MLflow params: ``{"split.seed": "42", ...}``."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: str(value)}


class TrackedRun:
    """The MLflow run of one stage execution."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        if batch:
            with_retry(lambda: self.client.log_batch(self.run_id, tags=batch), "setting tags")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(batch), 100):  # MLflow's per-request limit
            chunk = batch[start : start + 100]
            log_chunk = functools.partial(self.client.log_batch, self.run_id, params=chunk)
            with_retry(log_chunk, "logging params")

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            with_retry(lambda: self.client.log_batch(self.run_id, metrics=batch), "logging metrics")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with_retry(
            lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
            f"logging artifact {path}",
        )

    def terminate(self, status: str) -> None:
        """End the run FINISHED or FAILED (retried: a run left RUNNING would hide the result)."""
        with_retry(
            lambda: self.client.set_terminated(self.run_id, status=status),
            f"marking the run {status}",
        )


class _Untracked(TrackedRun):
    """What a DDP rank other than zero logs to: nothing (rank zero holds the stage's run)."""

    def __init__(self) -> None:
        super().__init__(None, None)  # type: ignore[arg-type]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def terminate(self, status: str) -> None:
        pass


UNTRACKED = _Untracked()


def client() -> MlflowClient:
    """An MlflowClient on :func:`tracking_uri` (store prepared for concurrent use), with MLflow's
    own chatter turned down."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow_logs()
    uri = tracking_uri()
    prepare_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def quiet_mlflow_logs() -> None:
    """MLflow's INFO lines (schema migrations, the system-metrics sampler starting and stopping
    in every job) to WARNING, and its tracebacks of store errors the stage reports in one line
    dropped. After ``import mlflow``, which sets up its loggers (and would reset the levels)."""
    import mlflow  # noqa: F401 - configures MLflow's loggers first

    for name in ("alembic", "mlflow", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    store_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _HideReportedStoreErrors) for f in store_log.filters):
        store_log.addFilter(_HideReportedStoreErrors())


def ensure_experiment(mlflow_client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it (artifacts beside the SQLite store) when missing.

    It carries ``mlflow.experimentKind`` (:data:`EXPERIMENT_KIND`), which tells MLflow's UI that
    it is model training; an experiment made before (or by another tool) gets the tag when it
    has none, and a kind someone chose is left alone.
    """
    from mlflow.exceptions import MlflowException

    found = with_retry(lambda: mlflow_client.get_experiment_by_name(name), "finding the experiment")
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            with_retry(
                lambda: mlflow_client.set_experiment_tag(
                    found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                ),
                "tagging the experiment",
            )
        return found.experiment_id
    root = artifacts_root(tracking_uri())
    location = None if root is None else root.as_uri()
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    try:
        return with_retry(
            lambda: mlflow_client.create_experiment(name, artifact_location=location, tags=tags),
            "creating the experiment",
        )
    except MlflowException:
        # Another stage created it between our look-up and our create.
        found = with_retry(
            lambda: mlflow_client.get_experiment_by_name(name), "finding the experiment"
        )
        if found is None:
            raise
        return found.experiment_id


def resource_metrics(started: float) -> dict[str, float]:
    """What a stage execution cost: ``stage_seconds`` (inside the run), ``process_seconds``
    (the whole process, imports included) and ``peak_rss_mb`` (the process's peak resident
    memory, from getrusage; on Linux ru_maxrss is in KiB). The benchmarks read these."""
    import resource

    import pipeline

    now = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "stage_seconds": now - started,
        "process_seconds": now - pipeline.PROCESS_STARTED,
        "peak_rss_mb": peak,
    }


#: One id per pipeline invocation (``make run`` sets it; else the Snakefile does), a tag of
#: every run of that invocation.
EXECUTION_ENV = "PIPELINE_EXECUTION"
#: The id of the invocation's parent run, which every stage run is nested under.
PARENT_ENV = "PIPELINE_PARENT_RUN"
#: Seconds between samples of MLflow's system metrics (CPU, memory, disk, network; GPU where
#: pynvml finds one); MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 10.0


def _common_tags(config: Config, entry_point: str) -> dict[str, str]:
    """Tags of every run: the pipeline's own, and MLflow's standard source tags (the UI shows
    the commit and the entry point from them)."""
    commit, dirty = git_state()
    tags = {
        "pipeline_id": pipeline_id(config, commit),
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "params_hash": config.params_hash,
        "mlflow.source.name": entry_point,
        "mlflow.source.type": "LOCAL",
    }
    if commit != "nogit":
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get(EXECUTION_ENV):
        tags["execution"] = os.environ[EXECUTION_ENV]
    return tags


def new_execution_id() -> str:
    """``20261202T151500Z-3f9a1c``: sortable by time, unique across machines starting at once."""
    import secrets

    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


_started_parent: str | None = None


def start_execution(config: Config, runner: str) -> str:
    """Open the parent run of one pipeline invocation and export its id (and the execution id)
    to the environment the jobs inherit; every stage run is nested under it.

    Called once, by the process that schedules the jobs (the Snakefile's ``onstart``, or
    ``python -m pipeline execution dvc repro``), so parallel jobs and
    pipelines sharing a store never race to create it. An already exported parent is reused.
    """
    global _started_parent
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    os.environ.setdefault(EXECUTION_ENV, new_execution_id())
    mlflow_client = client()
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment)
    tags = {**_common_tags(config, runner), "role": "execution", "runner": runner}
    name = f"execution-{os.environ[EXECUTION_ENV]}"
    run = with_retry(
        lambda: mlflow_client.create_run(experiment_id, tags=tags, run_name=name),
        "creating the execution's run",
    )
    _started_parent = os.environ[PARENT_ENV] = run.info.run_id
    log.info(
        "MLflow execution %s: parent run %s in %s",
        os.environ[EXECUTION_ENV],
        run.info.run_id,
        tracking_uri(),
    )
    return run.info.run_id


def end_execution(status: str, run_id: str | None = None) -> None:
    """End the parent run this process started (or ``run_id``) FINISHED or FAILED.

    A store that refuses is a warning here: the jobs' results stand, and each job that met the
    refusal has already said so in its own error line."""
    run_id = run_id or _started_parent
    if not run_id:
        return
    try:
        TrackedRun(client(), run_id).terminate(status)
    except StoreError as err:
        log.warning("the execution's parent run %s is not marked %s: %s", run_id, status, err)


def _system_metrics(run_id: str) -> SystemMetricsMonitor | None:
    """MLflow's system-metrics sampler on the run, started; None where it cannot run (psutil
    missing). It samples every SYSTEM_METRICS_INTERVAL_S, and once more when the stage ends
    (:func:`_stop`)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=tracking_uri()
        )
    except Exception as err:  # noqa: BLE001 - a missing sampler must not stop the stage
        log.warning("no system metrics for run %s: %s", run_id, err)
        return None
    monitor.start()
    return monitor


@contextlib.contextmanager
def stage_run(
    stage: str, config: Config, dataset: str, param_keys: Iterable[str]
) -> Iterator[TrackedRun]:
    """Open the MLflow run of one stage execution; it ends FINISHED, or FAILED on an exception.

    It is nested under the pipeline invocation's parent run when there is one (PARENT_ENV).
    The run is created, and its params written, before the stage does any work: a store that
    cannot be written stops the stage there, with its outputs untouched. A store that fails
    later (during training, or while the results are logged) also ends the stage in one line.
    """
    try:
        tracked = _open_run(stage, config, dataset, param_keys)
    except StoreError as err:
        raise StoreError(f"{err}. The stage did no work: its outputs are as they were") from err
    started = time.perf_counter()
    monitor = _system_metrics(tracked.run_id)
    try:
        yield tracked
    except BaseException as err:
        refused = store_error(err, "the stage logged to it")
        if refused is None:
            _stop(monitor)
            _mark_failed(tracked)
            raise
        # The store refuses writes: no last sample and no FAILED mark (the run stays RUNNING).
        _abandon(monitor)
        if refused is err:
            raise
        raise refused from err
    _stop(monitor)
    tracked.log_metrics(resource_metrics(started))  # a refusal here is a StoreError already
    tracked.terminate("FINISHED")


def _open_run(stage: str, config: Config, dataset: str, param_keys: Iterable[str]) -> TrackedRun:
    """Create the stage's run with its tags and params (the store's first writes)."""
    mlflow_client = client()
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment)
    tags = {
        "stage": stage,
        "dataset": dataset,
        **_common_tags(config, f"python -m pipeline {stage}"),
    }
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    run = with_retry(
        lambda: mlflow_client.create_run(experiment_id, tags=tags, run_name=f"{stage}-{dataset}"),
        "creating the run",
    )
    tracked = TrackedRun(mlflow_client, run.info.run_id)
    params: dict[str, str] = {}
    for key in param_keys:
        params.update(flatten(config.section(key), key))
    tracked.log_params(params)
    log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, tracking_uri())
    return tracked


def _stop(monitor: SystemMetricsMonitor | None) -> None:
    """Stop the sampler, then record one last sample: MLflow's sampler publishes only after a
    full interval, so a stage shorter than that would otherwise have no system metrics."""
    if monitor is None:
        return
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001 - metrics about the run must not fail the run
        log.warning("could not record the last system metrics: %s", err)


def _abandon(monitor: SystemMetricsMonitor | None) -> None:
    """Stop the sampler without its last write: the store has just refused one, and MLflow would
    log the second refusal as an ERROR under the stage's one-line error."""
    if monitor is None:
        return
    sampler_log = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    sampler_log.disabled = True
    try:
        with contextlib.suppress(Exception):  # the stage's own error is already on its way
            monitor.finish()
    finally:
        sampler_log.disabled = False


def _mark_failed(tracked: TrackedRun) -> None:
    """Record FAILED if the store lets us; the stage's own error is what the user must see."""
    try:
        tracked.terminate("FAILED")
    except Exception as err:  # noqa: BLE001 - best effort, the original error is re-raised
        log.warning("could not mark MLflow run %s FAILED: %s", tracked.run_id, err)
