"""The study on a real SLURM cluster through Snakemake's own executor (profiles/slurm).

The fixture stands up a single-node cluster from Debian's packages (munge, slurmctld, slurmd) in
a folder of its own, writes /etc/slurm/slurm.conf (never over one it did not write), and stops
every daemon it started at the end. The cluster keeps no accounting, so the run passes
``--slurm-status-command squeue``: without it the plugin asks ``sacct`` for job states, every
query fails and Snakemake waits for ever. The tests are skipped, with
the reason, only where the packages are missing and cannot be installed.

The main test is also the pipeline's determinism check: a SLURM run and a local run of two fresh
copies of the project, with the same seeds, must write the same bytes.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cluster import Node, problem_with
from tests.conftest import PROJECT_FILES, REPO, params_for, run, run_env, write_params

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# a throw-away test cluster, written by tests/test_slurm.py"


def _installed() -> bool:
    return all(Path(d).exists() for d in DAEMONS) and shutil.which("sbatch") is not None


def _install() -> str | None:
    """Install the packages if they are missing; the reason they cannot be, else None."""
    if _installed():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM is not installed and cannot be (needs root and apt-get): " + " ".join(
            PACKAGES
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for command in (["apt-get", "update", "-qq"], install):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return f"installing {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    return None if _installed() else "the SLURM packages installed but their daemons are missing"


def _config(root: Path, host: str) -> str:
    cpus = os.cpu_count() or 1
    with open("/proc/meminfo") as handle:
        total_mb = int(handle.readline().split()[1]) // 1024
    return "\n".join(
        [
            "ClusterName=pipeline-test",
            f"SlurmctldHost={host}",
            "SlurmUser=slurm",
            "AuthType=auth/munge",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/slurmctld.log",
            f"SlurmdLogFile={root}/slurmd.log",
            "SlurmctldPort=16817",
            "SlurmdPort=16818",
            f"NodeName={host} CPUs={cpus} RealMemory={int(total_mb * 0.8)} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A running one-node SLURM cluster; yields the environment its clients need.

    Its folder is outside pytest's (root-only) temporary tree: the munge and slurm users
    must reach it.
    """
    reason = _install()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="pipeline-slurm-"))
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    shutil.chown(root / "state", "slurm", "slurm")
    shutil.chown(root / "munge", "munge", "munge")
    root.chmod(0o755)
    host = socket.gethostname().split(".")[0]
    # The system path: the plugin's job step drops SLURM_CONF (with every SLURM_* variable)
    # before its srun, so a configuration elsewhere is not found inside a job.
    conf = SYSTEM_CONF
    if conf.exists() and MARKER not in conf.read_text():
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"{conf} belongs to a SLURM set-up of this machine; not replacing it")
    conf.parent.mkdir(parents=True, exist_ok=True)
    env = run_env()
    socket_path = root / "munge" / "munge.socket"
    started: list[Path] = []
    try:
        subprocess.run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                DAEMONS[0],
                f"--socket={socket_path}",
                f"--pid-file={root}/munge/munged.pid",
                f"--log-file={root}/munge/log",
                f"--seed-file={root}/munge/seed",
            ],
            check=True,
        )
        started.append(root / "munge" / "munged.pid")
        conf.write_text(f"{MARKER}\n{_config(root, host)}AuthInfo=socket={socket_path}\n")
        subprocess.run([DAEMONS[1], "-f", str(conf)], check=True, env=env)
        started.append(root / "slurmctld.pid")
        subprocess.run([DAEMONS[2], "-f", str(conf)], check=True, env=env)
        started.append(root / "slurmd.pid")
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                break
            assert time.monotonic() < deadline, f"the node never became idle ({state!r})"
            time.sleep(0.5)
        yield {**env, "SLURM_ROOT": str(root)}
    finally:
        for pid_file in reversed(started):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), 15)
        time.sleep(0.5)  # let them exit before their folder goes
        conf.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def tiny_project(root: Path, tiny_idx: Path) -> Path:
    """The pipeline project (its runner files) configured for the tiny data, one init."""
    root.mkdir()
    for name in (*PROJECT_FILES, "profiles"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    params = params_for("idx", split={"label_fractions": [1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(backbone="lenet5", width=8)
    # A trained init beside scratch: the byte comparison then covers SimCLR's training too.
    params["pretrain"].update(methods=["scratch", "simclr"], epochs=1, batch_size=64)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["finetune"].update(
        inits=["scratch", "simclr"],
        baselines=[],
        modes=["linear"],
        seeds=[0],
        max_passes=1,
        min_steps=1,
        batch_size=64,
        min_steps_per_epoch=1,
    )
    params["evaluate"]["bootstrap"] = 50
    for stage in params["resources"]:  # this node's memory, not a GPU server's
        params["resources"][stage]["mem_mb"] = 1000
    write_params(root, params)
    return root


TARGET = "metrics/summary.json"  # download to evaluation: every kind of job, no report
# The plugin first checks a job this long after submitting it, then 10 s more each time. A job
# here takes up to about 18 s (two Snakemake start-ups, then the stage; SimCLR's pretraining the
# longest), so nearly every job is seen done at the first check: 143 s at 20, 167 s at 16 (the
# pretraining level then waits 16 + 26 s), 138 s at 12 for a lighter project.
INIT_SECONDS = "20"


def test_the_pipeline_through_slurm_matches_a_local_run(
    cluster: dict[str, str], tmp_path: Path, tiny_idx: Path
):
    on_slurm = tiny_project(tmp_path / "slurm", tiny_idx)
    local = tiny_project(tmp_path / "local", tiny_idx)
    store = tmp_path / "mlflow.db"
    env = {**cluster, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    submitted_before = _submitted(cluster)

    # The local run goes side by side on one core: the SLURM run mostly waits for status checks.
    local_run = subprocess.Popen(
        ["snakemake", "--cores", "1", TARGET],
        cwd=local,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        result = run(
            [
                "snakemake",
                "--profile",
                "profiles/slurm",
                "--jobs",
                "2",
                "--slurm-status-command",
                "squeue",
                # first status check INIT_SECONDS after submitting, then every 10 s more
                "--slurm-init-seconds-before-status-checks",
                INIT_SECONDS,
                TARGET,
            ],
            on_slurm,
            env=env,
            timeout=600,
        )
    finally:
        _, local_err = local_run.communicate(timeout=600)
    assert local_run.returncode == 0, local_err[-3000:]

    # Every job went through the scheduler: one sbatch submission per job Snakemake ran.
    jobs = [line for line in result.stderr.splitlines() if "SLURM jobid" in line]
    assert len(jobs) >= 6, result.stderr[-3000:]
    assert _submitted(cluster) - submitted_before == len(jobs)

    # ... and made what a local run makes, byte for byte: this is also the check that two clean
    # runs with the same seeds give the same bytes (split indices, curves, validation and test
    # metrics with their intervals, encoder and classifier weights; docs/reliability.md).
    for folder in ("data/splits", "models", "metrics"):
        compared = filecmp.dircmp(on_slurm / folder, local / folder)
        assert not compared.left_only and not compared.right_only, folder
        _assert_same_files(on_slurm / folder, local / folder)
    assert (on_slurm / "models/finetune/simclr-linear-1.0/seed0.pt").is_file()
    assert (on_slurm / "metrics/eval/simclr-linear-1.0.json").is_file()

    # The jobs logged to MLFLOW_TRACKING_URI, one run per job.
    with sqlite3.connect(store) as db:
        stages = [s for (s,) in db.execute("SELECT value FROM tags WHERE key = 'stage'")]
    assert sorted(set(stages)) == [
        "augment",
        "download",
        "evaluate",
        "finetune",
        "pretrain",
        "split",
    ]
    assert len(stages) == len(jobs)
    # ... nested under the one parent run that the Snakemake process opened for the execution.
    with sqlite3.connect(store) as db:
        parents = db.execute(
            "SELECT run_uuid FROM tags WHERE key = 'role' AND value = 'execution'"
        ).fetchall()
        nested = db.execute("SELECT value FROM tags WHERE key = 'mlflow.parentRunId'").fetchall()
    assert len(parents) == 1 and {v for (v,) in nested} == {parents[0][0]}
    assert len(nested) == len(jobs)


def _assert_same_files(left: Path, right: Path) -> None:
    files = [path for path in sorted(left.rglob("*")) if path.is_file()]
    assert files, left
    for path in files:
        twin = right / path.relative_to(left)
        assert twin.is_file(), twin
        assert path.read_bytes() == twin.read_bytes(), path.relative_to(left)


def _submitted(cluster: dict[str, str]) -> int:
    log = Path(cluster["SLURM_ROOT"]) / "slurmctld.log"
    return log.read_text().count("_slurm_rpc_submit_batch_job: JobId=") if log.exists() else 0


def test_a_job_no_node_can_run_is_one_line_before_anything_is_submitted(
    cluster: dict[str, str], tmp_path: Path, tiny_idx: Path
):
    project = tiny_project(tmp_path / "too_big", tiny_idx)
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("mem_mb: 1000", "mem_mb: 9000000", 1))
    submitted_before = _submitted(cluster)
    result = run(
        ["snakemake", "--profile", "profiles/slurm", "--slurm-status-command", "squeue", TARGET],
        project,
        env=cluster,
        check=False,
        timeout=300,
    )
    assert result.returncode != 0
    assert "error: no node of this cluster can run the download stage's jobs" in result.stderr
    assert "lower resources.download in params.yaml" in result.stderr
    assert _submitted(cluster) == submitted_before


def test_the_check_names_the_first_job_no_node_can_hold():
    params = {
        "resources": {
            stage: {"cpus": 1, "mem_mb": 100}
            for stage in ("download", "split", "augment", "evaluate", "visualize")
        }
    }
    params["resources"]["pretrain"] = {"cpus": 1, "mem_mb": 100, "gpus": 1}
    params["resources"]["finetune"] = {"cpus": 1, "mem_mb": 100, "gpus": 0}
    gpu_node, cpu_node = Node("a", 8, 1000, 4), Node("b", 8, 1000, 0)
    assert problem_with(params, [gpu_node, cpu_node]) is None
    assert "1 GPU(s)" in problem_with(params, [cpu_node, cpu_node])
    assert "resources.pretrain" in problem_with(params, [cpu_node])
    params["resources"]["evaluate"]["mem_mb"] = 2000
    assert "run the evaluate stage's jobs" in problem_with(params, [gpu_node])
