"""Untrusted files: no model file can run code, and the documented MLflow server stays local.

A pickled file can run any code when it is loaded. Every checkpoint and encoder the pipeline
reads goes through ``torch.load(weights_only=True)``, which accepts tensors and plain containers
only. These tests plant a real payload (it creates a marker file when unpickled) where each kind
of file lives, check that the file is refused with a message naming it, and check that the
payload never ran; one control loads the same file the unsafe way to show the payload is live.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline.errors import MissingInputError
from tests.conftest import REPO, VENV_BIN, run_env

PYTHON_SOURCES = sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("benchmarks/*.py")])


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> Path:
    """A real torch checkpoint (zip format) whose pickle carries the payload beside tensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, path)
    return path


def test_the_payload_is_live_when_loaded_the_unsafe_way(tmp_path: Path):
    marker = tmp_path / "pwned"
    torch.load(plant(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def _encoder(folder: Path, marker: Path) -> None:
    from pipeline.models.encoders import load_encoder

    (folder / "models/pretrain/evil").mkdir(parents=True)
    (folder / "models/pretrain/evil/encoder.json").write_text("{}")
    plant(folder / "models/pretrain/evil/encoder.pt", marker)
    load_encoder("evil", folder / "models/pretrain/evil")


def _classifier(folder: Path, marker: Path) -> None:
    from pipeline.models import classifier

    cell = folder / "models/finetune/evil-linear-1.0"
    cell.mkdir(parents=True)
    (cell / "model.json").write_text(json.dumps({"mode": "linear", "files": {"0": "seed0.pt"}}))
    plant(cell / "seed0.pt", marker)
    classifier.load(cell)


def _checkpoint(folder: Path, marker: Path) -> None:
    from pipeline.training import load_checkpoint

    load_checkpoint(plant(folder / "checkpoints/finetune/x/seed0/last.ckpt", marker), "a test")


@pytest.mark.parametrize(
    "load",
    [_encoder, _classifier, _checkpoint],
    ids=["encoder", "classifier", "training checkpoint"],
)
def test_a_file_carrying_code_is_refused_and_the_code_never_runs(tmp_path: Path, load):
    marker = tmp_path / "pwned"
    with pytest.raises(MissingInputError, match=r"\.(pt|ckpt)\b.*(corrupt|unsafe|not a plain)"):
        load(tmp_path, marker)
    assert not marker.exists()


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    def name(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else ""

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and name(n.func) == dotted]


def _keyword(call: ast.Call, key: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == key and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_every_load_in_the_code_is_weights_only():
    """torch.load, Lightning's resume and np.load never unpickle; nothing imports pickle to load."""
    loads = 0
    for path in PYTHON_SOURCES:
        tree = ast.parse(path.read_text())
        for call in _calls(tree, "torch.load"):
            loads += 1
            assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"
        for call in _calls(tree, "np.load"):
            assert _keyword(call, "allow_pickle") is not True, f"{path}:{call.lineno}"
        for fit in _calls(tree, "trainer.fit"):
            if any(k.arg == "ckpt_path" for k in fit.keywords):
                assert _keyword(fit, "weights_only") is True, f"{path}:{fit.lineno}"
        for unsafe in (
            "pickle.load",
            "pickle.loads",
            "mlflow.pytorch.log_model",
            "mlflow.pytorch.load_model",
        ):
            assert not _calls(tree, unsafe), f"{path} calls {unsafe}"
    assert loads >= 3  # the scan finds the real ones: encoders, classifiers, checkpoints


def documented_mlflow_commands() -> list[str]:
    """Every `mlflow server` / `mlflow ui` command line shown in the docs."""
    lines = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if re.match(r"^\s*(\.venv/bin/)?mlflow (server|ui)\b", line):
                lines.append(line.strip())
    return lines


def test_the_documented_mlflow_commands_bind_to_localhost():
    commands = documented_mlflow_commands()
    assert any(" server " in c for c in commands) and any(" ui " in c for c in commands)
    for command in commands:
        assert "--host 127.0.0.1" in command and "0.0.0.0" not in command, command


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses in LISTEN state on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_documented_mlflow_server_listens_on_loopback_only(tmp_path: Path):
    (command,) = [c for c in documented_mlflow_commands() if " server " in c]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = shlex.split(command.replace("--port 5000", f"--port {port}"))
    argv[0] = str(VENV_BIN / "mlflow")
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [*argv, "--workers", "1"],
            cwd=tmp_path,
            env=run_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, (
                        tmp_path / "server.log"
                    ).read_text()
                    time.sleep(0.5)
            assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert (tmp_path / "mlflow.db").exists()  # it used the documented store
