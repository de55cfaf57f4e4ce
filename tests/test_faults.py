"""Faults with real processes, files, sockets and signals: cut-off and killed downloads, corrupted
split and prepared files, a full disk, an MLflow store that cannot be written. Each must end in
a one-line error (or a clean restart), and no stage may ever see a half-written file or lose the
outputs of an earlier run.

Every stage runs as ``python -m pipeline ...`` in a subprocess. The tests share one MLflow store
(creating one costs seconds) and copy data made once per module instead of re-making it.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sources import RemoteFile, fetch
from pipeline.errors import FetchError
from pipeline.io import atomic_dir
from tests.conftest import (
    FASHION_MNIST_DEBIAN,
    needs_fashion_mnist,
    params_for,
    run,
    run_env,
    tiny_images,
    write_idx,
    write_params,
)

FASHION_FILES = sorted(p.name for p in FASHION_MNIST_DEBIAN.glob("*.gz"))


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Subprocess environment with one MLflow store for the whole module."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return run_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}


def cli(cwd: Path, env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipeline", *args], cwd, check=False, env=env, **kw)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit 1 and exactly one ``error:`` line, and no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative names), to compare before and after."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def temporaries(folder: Path) -> list[str]:
    """Names under ``folder`` that only an unfinished write makes."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".part")
    )


# --- a real HTTP mirror that can cut a transfer off or drip it ----------------------------------


class _Mirror(http.server.BaseHTTPRequestHandler):
    """Serves ``folder``: ``/ok/<name>`` whole, ``/cut/<name>`` half (announcing all of it, then
    closing the connection), ``/slow/<name>`` in 64 KiB pieces with a pause between them."""

    folder: Path
    pause_s = 0.02

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        mode, _, name = self.path.strip("/").partition("/")
        source = self.folder / name
        if mode not in ("ok", "cut", "slow") or not source.is_file():
            self.send_error(404)
            return
        blob = source.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        try:
            if mode == "cut":
                self.wfile.write(blob[: len(blob) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif mode == "slow":
                for start in range(0, len(blob), 1 << 16):
                    self.wfile.write(blob[start : start + (1 << 16)])
                    time.sleep(self.pause_s)
            else:
                self.wfile.write(blob)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@contextmanager
def mirror(folder: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``folder``; yields its base URL."""
    handler = type("Handler", (_Mirror,), {"folder": folder})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- data made once per module ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A folder where download and split of a tiny IDX dataset ran through the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    project = idx_project(root, tiny_images(400, 4, 8, seed=1), tiny_images(100, 4, 8, seed=2))
    ok(cli(project, env, "download"))
    ok(cli(project, env, "split"))
    return project


def idx_project(
    root: Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """``root/project``, whose params.yaml downloads ``root/source``: the IDX files of the
    ``train`` (and ``test``) images and labels. Nothing has run in it yet."""
    source = root / "source"
    for prefix, images_and_labels in (("train", train), ("t10k", test)):
        if images_and_labels is not None:
            images, labels = images_and_labels
            write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
            write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
    project = root / "project"
    project.mkdir()
    write_params(project, tiny_params(source))
    return project


def tiny_params(source: Path, **split) -> dict:
    params = params_for("idx", split={"label_fractions": [0.5, 1.0], **split})
    params["data"]["local_path"] = str(source)
    return params


def copy_project(template: Path, dest: Path, *parts: str) -> Path:
    """``params.yaml`` and the named folders of ``data/`` from ``template`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template / "params.yaml", dest / "params.yaml")
    for part in parts:
        shutil.copytree(template / "data" / part, dest / "data" / part)
    return dest


@pytest.fixture(scope="module")
def fashion_via_flaky_mirror(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> tuple[Path, subprocess.CompletedProcess]:
    """Fashion-MNIST downloaded through the CLI from a real HTTP mirror list whose first mirror
    cuts every transfer off half-way (Debian's files, served on 127.0.0.1); the run's output."""
    if not FASHION_MNIST_DEBIAN.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make setup installs it)")
    project = tmp_path_factory.mktemp("fashion")
    with mirror(FASHION_MNIST_DEBIAN) as url:
        write_params(project, fashion_params(f"{url}/cut", f"{url}/ok"))
        result = cli(project, env, "download")
    return project, result


def fashion_params(*mirrors: str) -> dict:
    params = params_for()
    params["data"]["mirrors"] = {"fashion_mnist": list(mirrors)}
    return params


# --- A: a download cut off half-way ---------------------------------------------------------------


def test_a_transfer_cut_off_half_way_is_named_and_the_next_mirror_used(tmp_path: Path):
    payload = bytes(range(256)) * 4096  # 1 MiB
    served = tmp_path / "served"
    served.mkdir()
    (served / "labels.gz").write_bytes(gzip.compress(payload, mtime=0))
    expected = RemoteFile("labels.gz", md5=hashlib.md5(payload).hexdigest())
    dest = tmp_path / "dest"
    dest.mkdir()
    with mirror(served) as url:
        with pytest.raises(FetchError) as err:
            fetch(expected, [f"{url}/cut"], dest)
        assert f"{url}/cut/labels.gz: connection cut off after" in str(err.value)
        assert "incomplete download" in str(err.value)
        assert list(dest.iterdir()) == []  # neither the file nor its .part

        fetch(expected, [f"{url}/cut", f"{url}/ok"], dest)
    assert sorted(p.name for p in dest.iterdir()) == ["labels.gz"]
    assert gzip.decompress((dest / "labels.gz").read_bytes()) == payload


@needs_fashion_mnist
def test_the_download_stage_reports_a_cut_off_mirror_in_one_line(
    tmp_path: Path, env: dict[str, str]
):
    with mirror(FASHION_MNIST_DEBIAN) as url:
        write_params(tmp_path, fashion_params(f"{url}/cut"))
        line = one_error_line(cli(tmp_path, env, "download"))
    assert f"{url}/cut/train-images-idx3-ubyte.gz: connection cut off after" in line
    assert "incomplete download" in line
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == ["prepared", "raw"]


def test_the_download_stage_goes_on_to_the_next_mirror_after_a_cut_off(fashion_via_flaky_mirror):
    project, result = fashion_via_flaky_mirror
    assert ok(result).stderr.count("connection cut off") == len(FASHION_FILES)  # a warning each
    manifest = json.loads((project / "data/raw/fashion_mnist/manifest.json").read_text())
    assert sorted(manifest["files"]) == FASHION_FILES
    assert {e["verified_by"] for e in manifest["files"].values()} == {"decoded_md5"}
    assert temporaries(project / "data") == []


# --- A: kill -9 while a file is arriving ----------------------------------------------------------


def _wait_for_part(folder: Path, process: subprocess.Popen, size: int) -> Path:
    """The ``.part`` file under ``folder`` once it holds ``size`` bytes (the fetch is under way)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        parts = [p for p in folder.rglob("*.part") if p.stat().st_size >= size]
        if parts:
            return parts[0]
        time.sleep(0.05)
    raise AssertionError("the download never started receiving")


def test_kill_9_during_a_download_leaves_only_temporaries_and_a_rerun_completes(
    tmp_path: Path, env: dict[str, str], fashion_via_flaky_mirror
):
    project = copy_project(fashion_via_flaky_mirror[0], tmp_path / "project", "prepared")
    prepared_before = digests(project / "data/prepared/fashion_mnist")
    with mirror(FASHION_MNIST_DEBIAN) as url:
        write_params(project, fashion_params(f"{url}/slow"))
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "download"],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        part = _wait_for_part(project / "data/raw", process, 1 << 20)
        os.kill(process.pid, signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL

        # Only temporaries of the killed process; the declared outputs are old or absent.
        raw_tmp = f".fashion_mnist.tmp-{process.pid}"
        assert part.parent.name == raw_tmp
        assert sorted(p.name for p in (project / "data/raw").iterdir()) == [raw_tmp]
        assert all(p.name.endswith(".part") for p in part.parent.iterdir())
        assert sorted(p.name for p in (project / "data/prepared").iterdir()) == [
            f".fashion_mnist.tmp-{process.pid}",
            "fashion_mnist",
        ]
        assert digests(project / "data/prepared/fashion_mnist") == prepared_before

        write_params(project, fashion_params(f"{url}/ok"))
        ok(cli(project, env, "download"))
    assert temporaries(project / "data") == []
    manifest = json.loads((project / "data/raw/fashion_mnist/manifest.json").read_text())
    assert sorted(manifest["files"]) == FASHION_FILES
    assert {e["verified_by"] for e in manifest["files"].values()} == {"decoded_md5"}
    assert digests(project / "data/prepared/fashion_mnist") == prepared_before


def test_a_temporary_is_removed_only_once_the_process_that_made_it_is_gone(tmp_path: Path):
    """A stale sibling of a killed writer goes; one of a writer still running stays (pulling it
    away would make that writer fail)."""
    writer = subprocess.Popen(["sleep", "60"])
    final = tmp_path / "out"
    theirs = tmp_path / f".out.tmp-{writer.pid}"
    theirs.mkdir()
    try:
        with atomic_dir(final) as folder:
            (folder / "x").write_text("x")
        assert theirs.is_dir()
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    with atomic_dir(final) as folder:
        (folder / "x").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- A: corrupted raw, prepared and split files ---------------------------------------------------


def flip_last_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01
    path.write_bytes(bytes(blob))


def shift_last_index(path: Path) -> None:
    """Change the last int64 of an index file by one: still a valid array of valid indices."""
    blob = bytearray(path.read_bytes())
    blob[-8] ^= 0x01
    path.write_bytes(bytes(blob))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_report(path: Path) -> None:
    """An edit that keeps the report valid JSON: the validation fraction it claims."""
    report = json.loads(path.read_text())
    report["val_fraction"] = 0.5
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def test_a_corrupted_cached_raw_file_is_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], fashion_via_flaky_mirror
):
    project = copy_project(fashion_via_flaky_mirror[0], tmp_path / "project", "raw", "prepared")
    cached = project / "data/raw/fashion_mnist/train-labels-idx1-ubyte.gz"
    flip_last_byte(cached)
    before = digests(project / "data")
    line = one_error_line(cli(project, env, "download"))
    assert "data/raw/fashion_mnist/train-labels-idx1-ubyte.gz" in line
    assert "delete it" in line and "run the download stage again" in line
    assert digests(project / "data") == before


# What a damaged file of each stage's output must make the next stage say: the folder, the stage
# that reads it, and the advice that names the stage to re-run.
_PREPARED = ("data/prepared/idx", "split", "python -m pipeline download")
_SPLITS = (
    "data/splits/idx",
    "augment",
    "re-run the split stage (python -m pipeline split --dataset idx)",
)


@pytest.mark.parametrize(
    ("written_by", "name", "damage", "expected"),
    [
        (_PREPARED, "train_labels.npy", flip_last_byte, "does not match its checksum"),
        (_PREPARED, "train_images.npy", truncate, "does not match its checksum"),
        (_PREPARED, "manifest.json", truncate, "is not readable JSON"),
        (_PREPARED, "classes.json", truncate, "is not readable JSON"),
        (
            _SPLITS,
            "train.npy",
            truncate,
            "does not match its checksum in data/splits/idx/report.json",
        ),
        (_SPLITS, "train.npy", shift_last_index, "does not match its checksum"),
        (_SPLITS, "report.json", truncate, "is missing or unreadable"),
        (_SPLITS, "report.json", edit_report, "does not match its own checksum"),
    ],
)
def test_a_corrupted_prepared_or_split_file_stops_the_next_stage_in_one_line(
    tmp_path: Path,
    env: dict[str, str],
    tiny_project: Path,
    written_by: tuple[str, str, str],
    name: str,
    damage: Callable[[Path], None],
    expected: str,
):
    folder, next_stage, advice = written_by
    project = copy_project(tiny_project, tmp_path / "project", "prepared", "splits")
    damage(project / folder / name)
    before = digests(project / "data")
    line = one_error_line(cli(project, env, next_stage))
    assert f"{folder}/{name} {expected}" in line
    assert advice in line
    # The refusing stage wrote nothing: no output folder of its own, no file of the inputs changed.
    assert not (project / "data/augment").exists()
    assert digests(project / "data") == before


# --- B: a full disk -----------------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs(request: pytest.FixtureRequest) -> Callable[[Path, str], Path]:
    """Mount a small tmpfs at a folder (unmounted at the end); skips where mounting is refused."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE variant runs anyway)")

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)], check=False))
        return folder

    return mount


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` with a ballast file, then free ``leave`` bytes."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush
        try:
            while handle.write(b"\0" * 4096):
                pass
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
        handle.truncate(max(0, handle.tell() - leave))
    return ballast


def augment_params(source: Path, hflip: float, copies: int) -> dict:
    params = tiny_params(source)
    params["augment"].update(preview_images=4, preview_views=2, offline_copies=copies)
    params["augment"]["policies"]["supervised"]["hflip"]["p"] = hflip
    return params


def test_a_full_disk_is_one_line_and_keeps_the_previous_outputs_together(
    tmp_path: Path, env: dict[str, str], tiny_project: Path, mount_tmpfs
):
    source = tiny_project.parent / "source"
    project = copy_project(tiny_project, tmp_path / "project", "prepared", "splits")
    augment = mount_tmpfs(project / "data/augment", "1m")
    write_params(project, augment_params(source, hflip=0.5, copies=0))
    ok(cli(project, env, "augment"))
    before = digests(augment)

    # Room for a new policy.json and preview.png, not for a pool of 8 copies (180 KiB): the
    # failure comes after the first two files of the folder were written.
    fill(augment, leave=64 << 10)
    write_params(project, augment_params(source, hflip=0.25, copies=8))
    line = one_error_line(cli(project, env, "augment"))
    assert "no space left on device while writing data/augment/idx/pool/images.npy" in line
    assert "free space on that disk" in line and "point the output elsewhere" in line
    assert {k: v for k, v in digests(augment).items() if k != "ballast"} == before
    assert temporaries(augment) == []  # removed by the failed run itself, not left for the next


def _limit_file_size(limit: int) -> Callable[[], None]:
    def limit_in_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return limit_in_child


def test_a_file_size_limit_is_one_line_and_keeps_the_previous_download(
    tmp_path: Path, env: dict[str, str]
):
    # Enough images that the raw files outgrow the MLflow store, which the stage also writes.
    project = idx_project(tmp_path, tiny_images(40_000, 4, 8, seed=5))
    source = tmp_path / "source"
    ok(cli(project, env, "download"))
    before = digests(project / "data")
    store = Path(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    limit = store.stat().st_size + (128 << 10)
    assert (source / "train-images-idx3-ubyte.gz").stat().st_size > limit + (512 << 10)

    result = cli(project, env, "download", preexec_fn=_limit_file_size(limit))
    line = one_error_line(result)
    assert "file too large" in line
    assert "while writing data/raw/idx/train-images-idx3-ubyte.gz" in line
    assert "ulimit -f" in line and "point the output elsewhere" in line
    assert digests(project / "data") == before  # raw and prepared both as they were
    assert temporaries(project / "data") == []


# --- C: a tracking store that cannot be written -------------------------------------------------


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Make a file read-only for this process: chmod for a user, the immutable attribute for
    root (whom file modes do not stop); undone at the end. Skips where neither is possible."""
    made: list[Path] = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o444)
            return
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a file read-only for root here: {done.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("file-size limit", "disk I/O error"),
        ("read-only file", "the database file is read-only"),
    ],
)
def test_a_tracking_store_that_cannot_be_written_is_one_line_and_keeps_the_outputs(
    tmp_path: Path,
    env: dict[str, str],
    tiny_project: Path,
    read_only: Callable[[Path], None],
    fault: str,
    expected: str,
):
    project = copy_project(tiny_project, tmp_path / "project", "prepared", "splits")
    # A copy of the module's store (its experiment exists and is tagged), so the stage's first
    # write is its own run: the write a full disk refuses.
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy2(Path(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")), store)
    uri = f"sqlite:///{store}"
    before, store_before = digests(project / "data"), store.read_bytes()

    if fault == "read-only file":
        read_only(store)
        result = cli(project, env | {"MLFLOW_TRACKING_URI": uri}, "split")
    else:  # 1 KiB: SQLite cannot write its rollback journal, as on a full disk (no mount needed)
        limit = _limit_file_size(1 << 10)
        result = cli(project, env | {"MLFLOW_TRACKING_URI": uri}, "split", preexec_fn=limit)

    line = one_error_line(result)
    assert f"MLflow store {uri} cannot be written while creating the run: {expected}" in line
    assert "MLFLOW_TRACKING_URI=" in line and "then run it again" in line
    assert "The stage did no work: its outputs are as they were" in line
    assert "system metrics" not in result.stderr  # nothing more from MLflow under the line
    assert digests(project / "data") == before
    assert temporaries(project / "data") == []
    assert store.read_bytes() == store_before  # SQLite refused before it changed a byte
