"""`kill -9` in the middle of training loses at most the epoch in progress.

Each test trains once without interruption, then runs the same stage as a real process, kills it
with SIGKILL as soon as it has written a checkpoint, and runs it again. The second run must say it
resumed and must end with the same numbers as the uninterrupted run. Tolerance: none. On the CPU
training is deterministic and every random draw is seeded by (seed, epoch or step), so the
resumed run is bit-identical (weights compared with atol=0, metric files compared byte for byte).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from pipeline import training
from pipeline.config import from_dict
from pipeline.stages import augment, download, pretrain, split
from tests.conftest import params_for, run_env, sync_matrix, write_params

TIMEOUT_S = 120


def resume_params(tiny_idx: Path) -> dict:
    """Tiny data but many short epochs, so a kill lands part-way through training."""
    params = params_for("idx", split={"label_fractions": [1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(backbone="lenet5", width=8)
    params["pretrain"].update(
        methods=["scratch", "rotation", "byol"],
        epochs=12,
        batch_size=64,
        max_images=128,
        warmup_epochs=0,
    )
    params["pretrain"]["monitor"]["knn_max_train"] = 100
    params["finetune"].update(
        modes=["finetune"],
        seeds=[0, 1],
        max_passes=1,
        min_steps=30,
        patience=100,
        batch_size=32,
        min_steps_per_epoch=2,
        max_images=96,
    )
    return sync_matrix(params)


def prepare(workdir: Path, params: dict) -> Path:
    """Write ``params`` into ``workdir``, run the data stages and make the scratch encoder."""
    write_params(workdir, params)
    config = from_dict(params)
    download.run(config)
    split.run(config)
    augment.run(config)
    pretrain.run(config, method="scratch")
    return workdir


@pytest.fixture
def prepared(workdir: Path, tiny_idx: Path) -> Path:
    """A working folder with params.yaml, the data stages done and the scratch encoder made."""
    return prepare(workdir, resume_params(tiny_idx))


def stage(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args, "--dataset", "idx"]


def finish(cmd: list[str], cwd: Path) -> str:
    """Run a stage to the end; its log (stderr) is returned."""
    done = subprocess.run(
        cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def kill_when(cmd: list[str], cwd: Path, pattern: str) -> None:
    """Start a stage and SIGKILL it as soon as a file matching ``pattern`` exists."""
    with open(cwd / "killed.log", "w") as log:
        process = subprocess.Popen(cmd, cwd=cwd, env=run_env(), stdout=log, stderr=log)
        deadline = time.monotonic() + TIMEOUT_S
        while not list(cwd.glob(pattern)):
            assert process.poll() is None, f"finished before {pattern} appeared"
            assert time.monotonic() < deadline, f"no {pattern} after {TIMEOUT_S} s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        torch.testing.assert_close(right[name], tensor, rtol=0, atol=0, msg=name)


# BYOL's teacher is no parameter of the optimizer: the student only ends bit-identical if the
# checkpoint brought the teacher back too (its targets steer every step after the resume).
@pytest.mark.parametrize("method", ["rotation", "byol"])
def test_pretraining_killed_mid_run_resumes_to_the_same_encoder(prepared: Path, method: str):
    command = stage("pretrain", "--method", method)
    finish(command, prepared)
    reference = weights(prepared / f"models/pretrain/{method}/encoder.pt")
    curve = (prepared / f"metrics/pretrain/{method}.csv").read_text()
    for output in (f"models/pretrain/{method}/encoder.pt", f"metrics/pretrain/{method}.csv"):
        (prepared / output).unlink()

    kill_when(command, prepared, f"checkpoints/pretrain/{method}-*/last.ckpt")
    assert not (prepared / f"models/pretrain/{method}/encoder.pt").exists()
    log = finish(command, prepared)

    assert "resuming from" in log and "(after epoch 0)" not in log
    assert_same_weights(reference, weights(prepared / f"models/pretrain/{method}/encoder.pt"))
    assert (prepared / f"metrics/pretrain/{method}.csv").read_text() == curve
    assert not list(prepared.glob(f"checkpoints/pretrain/{method}-*"))  # removed after success


def test_fine_tuning_killed_in_its_second_seed_keeps_the_first_and_resumes(prepared: Path):
    command = stage("finetune", "--init", "scratch", "--mode", "finetune", "--fraction", "1.0")
    finish(command, prepared)
    reference = {
        seed: weights(prepared / f"models/finetune/scratch-finetune-1.0/seed{seed}.pt")
        for seed in (0, 1)
    }
    summary = (prepared / "metrics/finetune/scratch-finetune-1.0.json").read_text()
    curve = (prepared / "metrics/finetune/scratch-finetune-1.0.csv").read_text()

    kill_when(command, prepared, "checkpoints/finetune/scratch-finetune-1.0-*/seed1/last.ckpt")
    log = finish(command, prepared)

    assert "seed 0 already trained" in log and "resuming seed 1" in log
    history = json.loads(summary)["seeds"]["1"]["history"]
    assert len(history) == 10  # every epoch ran: the kill came before the end
    for seed in (0, 1):
        resumed = weights(prepared / f"models/finetune/scratch-finetune-1.0/seed{seed}.pt")
        assert_same_weights(reference[seed], resumed)
    assert (prepared / "metrics/finetune/scratch-finetune-1.0.json").read_text() == summary
    assert (prepared / "metrics/finetune/scratch-finetune-1.0.csv").read_text() == curve
    assert not list(prepared.glob("checkpoints/finetune/*"))


def test_a_checkpoint_damaged_after_the_kill_is_named_with_the_folder_to_delete(prepared: Path):
    command = stage("finetune", "--init", "scratch", "--mode", "finetune", "--fraction", "1.0")
    kill_when(command, prepared, "checkpoints/finetune/scratch-finetune-1.0-*/seed0/last.ckpt")
    (last,) = prepared.glob("checkpoints/finetune/scratch-finetune-1.0-*/seed0/last.ckpt")
    last.write_bytes(last.read_bytes()[:200])
    failed = subprocess.run(
        command, cwd=prepared, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert failed.returncode == 1
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    folder = last.parent.relative_to(prepared)
    assert str(last.relative_to(prepared)) in line and f"delete {folder}" in line
    assert "Traceback" not in failed.stderr


class DieAtTheEnd(L.Callback):
    """Fails after the last epoch's checkpoint is written, before the seed's result is kept."""

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        raise RuntimeError("killed after the last epoch")


def test_a_run_stopped_after_its_last_checkpoint_trains_nothing_more(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
):
    from pipeline.stages import finetune

    params = resume_params(prepared.parent / "tiny_idx")
    params["finetune"].update(seeds=[0], min_steps=9)
    config = from_dict(params)
    finetune.run(config, init="scratch", mode="finetune", fraction="1.0")
    summary = (prepared / "metrics/finetune/scratch-finetune-1.0.json").read_text()

    make_trainer = training.make_trainer
    monkeypatch.setattr(
        training,
        "make_trainer",
        lambda *args, **kwargs: make_trainer(
            *args[:4], [*args[4], DieAtTheEnd()], *args[5:], **kwargs
        ),
    )
    with pytest.raises(RuntimeError, match="killed after the last epoch"):
        finetune.run(config, init="scratch", mode="finetune", fraction="1.0")
    monkeypatch.setattr(training, "make_trainer", make_trainer)
    assert list(prepared.glob("checkpoints/finetune/scratch-finetune-1.0-*/seed0/last.ckpt"))

    finetune.run(config, init="scratch", mode="finetune", fraction="1.0")
    assert (prepared / "metrics/finetune/scratch-finetune-1.0.json").read_text() == summary
