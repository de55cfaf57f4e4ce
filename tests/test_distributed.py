"""Training past one device: the real stage commands under Lightning DDP, two CPU processes (gloo).

What must hold with ``trainer.devices: 2``: SimCLR's loss takes its negatives from both ranks,
only rank zero writes outputs and MLflow (one run per stage execution), the outputs load, an
interrupted run resumes, and fine-tuning trains under DDP too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, from_dict
from pipeline.models.encoders import load_encoder
from pipeline.stages import augment, download, split
from pipeline.training import device_problem
from tests.conftest import params_for, run, run_env, sync_matrix, write_params

BATCH = 64  # the global batch: 32 images on each of the 2 processes
#: Epochs of a tiny one take a fraction of a second: enough of them that the kill lands mid-run.
EPOCHS = 6


def ddp_params(tiny_idx: Path) -> dict:
    params = params_for("idx", split={"label_fractions": [1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(backbone="lenet5", width=8)
    params["trainer"].update(devices=2, precision="32-true")
    params["pretrain"].update(methods=["simclr"], epochs=EPOCHS, batch_size=BATCH, warmup_epochs=0)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["finetune"].update(
        modes=["finetune"],
        seeds=[0],
        max_passes=2,
        min_steps=1,
        batch_size=BATCH,
        min_steps_per_epoch=1,
    )
    return sync_matrix(params)


def stage(work: Path, env: dict, *args: str, log: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipeline", *args, "--log", f"logs/{log}.log"], work, env=env)


def runs(store: Path) -> list[tuple[str, str]]:
    """(stage tag, status) of every MLflow run in the store."""
    with sqlite3.connect(store) as db:
        return db.execute(
            "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "AND t.key = 'stage' ORDER BY r.start_time"
        ).fetchall()


def kill_after_first_checkpoint(work: Path, env: dict) -> None:
    """Start the pretrain stage and SIGKILL it (every rank: one process group) once it has
    written its first epoch's checkpoint."""
    command = [sys.executable, "-m", "pipeline", "pretrain", "--method", "simclr"]
    with open(work / "killed.log", "w") as out:
        proc = subprocess.Popen(
            command, cwd=work, env=env, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while not list((work / "checkpoints/pretrain").glob("simclr-*/last.ckpt")):
        assert proc.poll() is None, (work / "killed.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_two_processes_pretrain_and_finetune_like_one_with_rank_zero_writing(
    tmp_path: Path, workdir: Path, tiny_idx: Path
):
    work = workdir
    params = ddp_params(tiny_idx)
    write_params(work, params)
    for name in (download, split, augment):  # the data stages, in this process (no DDP)
        name.run(from_dict(params))
    env = {**run_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    # A DDP run killed after its first epoch, then the same command again: it resumes.
    kill_after_first_checkpoint(work, env)
    log = (work / "killed.log").read_text()
    line = re.search(r"NT-Xent: (\d+) negatives per anchor \((\d+) images on each of (\d+)", log)
    assert line, log
    negatives, local, processes = map(int, line.groups())
    assert (local, processes) == (BATCH // 2, 2)
    assert negatives == 2 * local * processes - 2  # the other rank's views are negatives too
    stage(work, env, "pretrain", "--method", "simclr", log="resumed")
    resumed = re.search(r"\(after epoch (\d+)\)", (work / "logs/resumed.log").read_text())
    assert resumed and 1 <= int(resumed.group(1)) < EPOCHS, resumed
    load_encoder("simclr")  # complete and loadable (weights only)

    curves = (work / "metrics/pretrain/simclr.csv").read_text().splitlines()
    assert len(curves) == 1 + EPOCHS  # one row per epoch, written once (by rank zero)
    assert not list((work / "checkpoints/pretrain").glob("*"))  # cleaned up after success

    stage(
        work,
        env,
        "finetune",
        "--init",
        "simclr",
        "--mode",
        "finetune",
        "--fraction",
        "1.0",
        log="finetune",
    )
    from pipeline.models import classifier

    _, description = classifier.load(work / "models/finetune/simclr-finetune-1.0")
    assert (description["init"], description["mode"]) == ("simclr", "finetune")
    summary = json.loads((work / "metrics/finetune/simclr-finetune-1.0.json").read_text())
    assert 0.0 < summary["val_acc_mean"] <= 1.0
    assert summary["seeds"]["0"]["epochs_run"] >= 1

    # One MLflow run per stage execution (the killed one stays RUNNING: it had no chance to end).
    stages = runs(tmp_path / "mlflow.db")
    assert [s for s, _ in stages].count("pretrain") == 2
    assert [s for s, _ in stages].count("finetune") == 1
    assert [status for s, status in stages if s == "finetune"] == ["FINISHED"]
    assert [status for s, status in stages if s == "pretrain"][1:] == ["FINISHED"]


def test_a_batch_the_processes_cannot_share_equally_is_refused(tiny_idx: Path):
    params = ddp_params(tiny_idx)
    params["trainer"]["devices"] = 3
    with pytest.raises(ConfigError, match=r"pretrain.batch_size is 64, which 3 processes"):
        from_dict(params)


def test_more_machines_or_gpus_than_a_job_can_have_are_refused_before_it_starts(
    tiny_idx: Path, workdir: Path
):
    settings = from_dict(ddp_params(tiny_idx) | {"trainer": {"devices": 2, "num_nodes": 2}}).trainer
    # Nothing starts processes on a second machine here: DDP would wait for them for 30 minutes.
    assert "trainer.num_nodes is 2, but nothing starts" in device_problem(settings, environ={})
    # Under srun or torchrun with one process per device on every node, the job may go on.
    assert device_problem(settings, environ={"SLURM_NTASKS": "4"}) is None
    assert device_problem(settings, environ={"WORLD_SIZE": "4"}) is None

    # Through a stage command: one line, before any data is read or anything written.
    params = ddp_params(tiny_idx)
    params["trainer"]["num_nodes"] = 2
    write_params(workdir, params)
    result = run(
        [sys.executable, "-m", "pipeline", "pretrain", "--method", "simclr"], workdir, check=False
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: params.yaml: trainer.num_nodes is 2"), result.stderr
    assert not (workdir / "models").exists()
