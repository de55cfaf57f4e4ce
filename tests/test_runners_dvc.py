"""DVC makes the run, then Snakemake agrees it is up to date, and the results travel.

The DVC direction of tests/test_runners.py (which has the helpers), on the same tiny project
(tests/conftest.py's ``project``): ``dvc repro`` makes the whole run, a fresh clone pulls it
through a local remote and through an S3 one (moto's server on 127.0.0.1), ``dvc exp run``
changes one param and re-runs only what reads it. A file of its own because its run costs
minutes: ``pytest -n`` gives it to one process while the other makes test_runners.py's run.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run, run_env
from tests.test_runners import (
    assert_pretrained_on_training_and_pool,
    dvc_changed,
    nothing_to_do,
    snakemake_would_run,
)


@contextlib.contextmanager
def s3_server() -> Iterator[tuple[str, dict[str, str]]]:
    """An S3-compatible server on 127.0.0.1 (moto) with an empty bucket ``study``; yields its URL
    and the environment (test credentials) a client needs."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        credentials = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            **{
                "aws_access_key_id": "test",
                "aws_secret_access_key": "test",
                "region_name": "us-east-1",
            },
        ).create_bucket(Bucket="study")
        yield endpoint, run_env() | credentials
    finally:
        server.stop()


def test_dvc_repro_and_exp_run_then_snakemake_agrees_and_a_change_reruns_only_it(project: Path):
    """One DVC-made pipeline serves every DVC-direction check (each full run costs a minute)."""
    run(["dvc", "repro", "--quiet"], project)
    assert_pretrained_on_training_and_pool(project)
    assert nothing_to_do(project)
    # Sharing the run: without a remote, make says how to add one; with one, a fresh clone
    # pulls the results, and neither runner has anything left to do there.
    shutil.copy2(REPO / "Makefile", project / "Makefile")
    refused = run(["make", "push"], project, check=False)
    assert refused.returncode != 0 and "dvc remote add -d" in refused.stderr
    run(["dvc", "remote", "add", "-d", "shared", str(project.parent / "remote")], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)  # dvc.lock and the remote travel in git
    run(["make", "push"], project)
    clone = project.parent / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], project.parent)
    run(["make", "pull"], clone)
    summary = "metrics/summary.json"
    assert (clone / summary).read_bytes() == (project / summary).read_bytes()
    assert dvc_changed(clone) == set() and nothing_to_do(clone)

    # The same through an S3 remote: moto's S3 server on 127.0.0.1, DVC's own S3 client.
    with s3_server() as (endpoint, env):
        s3_clone = project.parent / "s3_clone"
        for repo in (project, s3_clone):
            if repo == s3_clone:
                run(["git", "clone", "-q", str(project), str(repo)], project.parent)
            run(["dvc", "remote", "add", "--local", "s3", "s3://study/cache"], repo)
            run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", endpoint], repo)
        run(["dvc", "push", "-r", "s3"], project, env=env)
        run(["dvc", "pull", "-r", "s3"], s3_clone, env=env)
    assert (s3_clone / summary).read_bytes() == (project / summary).read_bytes()
    assert dvc_changed(s3_clone) == set()

    # A changed value: DVC names exactly the stage that reads it.
    params_file = project / "params.yaml"
    baseline = params_file.read_text()
    params = yaml.safe_load(baseline)
    params["split"]["val_fraction"] = 0.25
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert dvc_changed(project) == {"split"}
    params_file.write_text(baseline)

    # An experiment sets a value from the command line and re-runs what reads it, and only that
    # (an evaluation param: the test split's bootstrap, so the check costs one stage, not all).
    out = run(["dvc", "exp", "run", "-S", "evaluate.bootstrap=60"], project).stdout
    assert yaml.safe_load(params_file.read_text())["evaluate"]["bootstrap"] == 60
    ran = set(re.findall(r"Running stage '([\w@.\-]+)'", out))
    assert ran == {"evaluate", "visualize"}, out
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["evaluate"]
    assert lock["params"]["params.yaml"]["evaluate"]["bootstrap"] == 60
    # dvc exp show lists each cell's validation accuracy and its test accuracy, one column each.
    table = run(["dvc", "exp", "show", "--csv", "--no-pager"], project).stdout
    header = table.splitlines()[0].split(",")
    for cell in ("scratch-linear", "simclr-knn"):
        assert any(h.endswith("val_acc_mean") and cell in h for h in header) or (
            "val_acc_mean" in header
        ), header
        assert f"test_accuracy.{cell}.all.mean" in header, header
    assert "evaluate.bootstrap" in header
    # dvc metrics diff names what the change moved: the bootstrap intervals, not the means.
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], project).stdout)
    changed = {key for per_file in diff.values() for key in per_file}
    assert any(k.endswith(".ci_low") or k.endswith(".ci_high") for k in changed), changed
    assert not any(k.endswith(".mean") for k in changed), changed
    run(["snakemake", "--touch", "--cores", "1", "--quiet"], project)  # what `make repro` does
    assert nothing_to_do(project)

    with open(project / "pipeline/stages/split.py", "a") as handle:
        handle.write("\n# a code change\n")
    assert dvc_changed(project) == {"split"}
    # Snakemake lists the stage and what is downstream of it; download is upstream and stays.
    assert snakemake_would_run(project) == {
        "split",
        "augment",
        "pretrain",
        "finetune",
        "evaluate",
        "visualize",
    }
