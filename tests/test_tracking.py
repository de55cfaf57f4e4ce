"""Every stage execution is one MLflow run with its tags, params and artifacts."""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import from_dict
from pipeline.stages import download, split
from tests.conftest import VENV_BIN, params_for, run, run_env, write_params


def _runs(uri: str, experiment: str = "label-efficiency") -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {uri}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def _idx_config(tiny_idx: Path):
    params = params_for("idx", split={"label_fractions": [0.5, 1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    return from_dict(params)


def test_stage_runs_land_in_the_default_sqlite_store_with_tags(workdir: Path, tiny_idx: Path):
    config = _idx_config(tiny_idx)
    download.run(config)
    split.run(config)
    assert tracking.tracking_uri() == f"sqlite:///{workdir / 'mlflow.db'}"
    runs = _runs(tracking.tracking_uri())
    assert [r.data.tags["stage"] for r in runs] == ["download", "split"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["dataset"] == "idx"
        assert r.data.tags["pipeline_id"].endswith(config.params_hash[:12])
        assert len(r.data.tags["dataset_checksum"]) == 64
    assert runs[0].data.tags["dataset_checksum"] == runs[1].data.tags["dataset_checksum"]
    assert runs[1].data.params["split.label_fractions"] == "[0.5, 1.0]"
    assert runs[1].data.metrics["n_test"] == 100
    # What each execution cost, for the benchmarks: in-process pytest counts from its start.
    cost = runs[1].data.metrics
    assert 0 < cost["stage_seconds"] <= cost["process_seconds"]
    assert 50 < cost["peak_rss_mb"] < 64 * 1024
    artifacts = MlflowClient(tracking.tracking_uri()).list_artifacts(runs[1].info.run_id)
    assert {a.path for a in artifacts} == {"report.json", "report.md"}
    assert (workdir / "mlartifacts").is_dir()


def test_a_failing_stage_is_recorded_as_failed(workdir: Path, tiny_idx: Path):
    config = _idx_config(tiny_idx)
    with pytest.raises(ValueError, match="boom"), tracking.stage_run("split", config, "idx", []):
        raise ValueError("boom")
    (failed,) = _runs(tracking.tracking_uri())
    assert failed.info.status == "FAILED"
    assert failed.data.tags["stage"] == "split"


def test_mlflow_tracking_uri_is_honoured(workdir: Path, tiny_idx: Path, monkeypatch, tmp_path):
    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    monkeypatch.setenv("PIPELINE_EXECUTION", "exec-1")
    download.run(_idx_config(tiny_idx))
    assert not (workdir / "mlflow.db").exists()
    (only,) = _runs(other)
    assert only.data.tags["execution"] == "exec-1"


def test_a_wrapped_runner_is_one_execution_ending_as_its_command_does(
    workdir: Path, tiny_idx: Path
):
    """What `make repro` does: python -m pipeline execution dvc repro (here: a command that
    starts a stage, then one that fails)."""
    write_params(workdir, params_for("idx", data={"local_path": str(tiny_idx)}))
    stage = "python -m pipeline download --dataset idx"
    ok = run(["python", "-m", "pipeline", "execution", "sh", "-c", stage], workdir)
    assert ok.returncode == 0
    failed = run(
        ["python", "-m", "pipeline", "execution", "sh", "-c", "exit 3"], workdir, check=False
    )
    assert failed.returncode == 3  # the command's own exit code

    runs = _runs(f"sqlite:///{workdir / 'mlflow.db'}")
    parents = sorted(
        (r for r in runs if r.data.tags.get("role") == "execution"), key=lambda r: r.info.start_time
    )
    assert [p.info.status for p in parents] == ["FINISHED", "FAILED"]
    (download_run,) = [r for r in runs if r.data.tags.get("stage") == "download"]
    assert download_run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert download_run.data.tags["execution"] == parents[0].data.tags["execution"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1, stopped after the test."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=run_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log')}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_stages_log_to_a_real_mlflow_server(mlflow_server: str, tiny_idx: Path, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    # Shares of each class: the tiny data has too few images per class for params.yaml's 100.
    params = params_for("idx", split={"label_fractions": [0.01, 0.1, 1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    write_params(work, params)
    env = run_env() | {"MLFLOW_TRACKING_URI": mlflow_server}
    run(["python", "-m", "pipeline", "download"], work, env=env)
    run(["python", "-m", "pipeline", "split"], work, env=env)
    assert not (work / "mlflow.db").exists()
    runs = _runs(mlflow_server)
    assert [r.data.tags["stage"] for r in runs] == ["download", "split"]
    artifacts = MlflowClient(mlflow_server).list_artifacts(runs[1].info.run_id)
    assert "report.json" in {a.path for a in artifacts}


def test_the_experiment_opens_on_mlflows_training_view(workdir: Path, tiny_idx: Path):
    """The experiment says it is model training (mlflow.experimentKind, which MLflow 3's UI reads
    to open it on its runs, not on the GenAI traces overview), also when made without the tag."""
    download.run(_idx_config(tiny_idx))
    client = MlflowClient(tracking.tracking_uri())
    made = client.get_experiment_by_name("label-efficiency")
    assert made.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    older = client.create_experiment("made-before-the-tag")
    genai = client.create_experiment(
        "chosen-by-a-user", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"}
    )
    assert tracking.ensure_experiment(client, "made-before-the-tag") == older
    assert tracking.ensure_experiment(client, "chosen-by-a-user") == genai
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == (
        "custom_model_development"
    )
    assert client.get_experiment(genai).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


class _Refusing(http.server.BaseHTTPRequestHandler):
    """What an authenticating proxy in front of an MLflow server answers without a token."""

    def refuse(self) -> None:
        body = b"<html><body>403 Forbidden: sign in first</body></html>"
        self.send_response(403)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = refuse

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every request 403; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("server", ["refuses with 403", "is not listening"])
def test_a_tracking_server_that_refuses_ends_the_stage_in_one_line(
    server: str, refusing_server: str, tiny_idx: Path, tmp_path: Path
):
    uri = refusing_server if server == "refuses with 403" else f"http://127.0.0.1:{_free_port()}"
    work = tmp_path / "work"
    work.mkdir()
    write_params(work, params_for("idx", data={"local_path": str(tiny_idx)}))
    # No retries: MLflow's client would otherwise retry a silent port for about four minutes.
    env = run_env() | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = run(["python", "-m", "pipeline", "download"], work, env=env, check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"MLflow store {uri} cannot be written while finding the experiment" in line
    assert "the server did not take the request" in line
    assert ("403" in line) == (server == "refuses with 403")
    assert f"check that the server at {uri} runs" in line
    assert "The stage did no work" in line
    assert not (work / "data").exists()
