"""Snakemake and DVC run the same stages with the same commands, and agree on what is up to date.

These tests run both tools for real on a copy of the project configured for a tiny image folder
plus an unlabeled pool (tests/conftest.py's ``project``), so both runners also carry the pool from
data.unlabeled_path through download and split into pretraining (issue 25).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import re
import shutil
import socket
import stat
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import dag
from tests.conftest import REPO, TINY_POOL_FILES, run, run_env
from tests.test_visualize import CHROMIUM, assert_opens_as_a_page

# Imported by each `python -m pipeline <stage>` process; it records the modules the stage loaded.
TRACE_HOOK = """
import atexit, os, sys
def _dump():
    if not sys.argv or not sys.argv[0].endswith(os.path.join("pipeline", "__main__.py")):
        return
    files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
    name = sys.argv[1]
    def value(flag):
        return sys.argv[sys.argv.index(flag) + 1]
    if "--method" in sys.argv:
        name += "@" + value("--method")
    if "--init" in sys.argv:
        name += "@" + "-".join(value(f) for f in ("--init", "--mode", "--fraction"))
    out = os.path.join(os.environ["PIPELINE_IMPORT_TRACE"], name + ".txt")
    with open(out, "w") as handle:
        handle.write("\\n".join(files))
atexit.register(_dump)
"""


def snakemake_jobs(project: Path) -> dict[str, dict]:
    """Rule name -> inputs, outputs, shell command, from a forced dry run with -p."""
    text = run(["snakemake", "-n", "-p", "--forceall"], project).stdout
    jobs = {}
    for block in re.split(r"\n(?=rule |localrule )", text):
        header = re.match(r"(?:local)?rule (\w+):", block)
        if not header or header.group(1) == "all":
            continue
        field = dict(re.findall(r"^    (input|output|wildcards): (.*)$", block, re.M))
        name = header.group(1)
        wildcards = dict(re.findall(r"(\w+)=([\w.]+)", field.get("wildcards", "")))
        if "method" in wildcards:  # one job per pretraining method: DVC's foreach names it
            name += f"@{wildcards['method']}"
        if "init" in wildcards:  # one job per cell: DVC's matrix names it init-mode-fraction
            name += f"@{wildcards['init']}-{wildcards['mode']}-{wildcards['fraction']}"
        jobs[name] = {
            "deps": set(field.get("input", "").split(", ")) - {""},
            "outs": set(field["output"].split(", ")),
            "cmd": re.search(r"^Shell command: (.*)$", block, re.M).group(1).strip(),
        }
    return jobs


def _as_dvc_declares(deps: set[str], stage: str) -> set[str]:
    """DVC cannot list a matrix's or foreach's outputs one by one in another stage's deps: the
    stages that gather them (evaluate, visualize) depend on their folders (models/finetune,
    metrics/finetune, models/pretrain, metrics/pretrain), which Snakemake lists job by job."""
    if stage not in ("evaluate", "visualize"):
        return deps
    folders = ("models/finetune/", "metrics/finetune/", "models/pretrain/", "metrics/pretrain/")
    kept = {d for d in deps if not d.startswith(folders)}
    return kept | {f.rstrip("/") for f in folders if any(d.startswith(f) for d in deps)}


def dvc_stages(project: Path) -> dict[str, dict]:
    """Stage name -> deps, outs, cmd, params as DVC resolves dvc.yaml against params.yaml."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        stages = {}
        for stage in repo.index.stages:
            files = [d for d in stage.deps if not hasattr(d, "params")]
            params = [p for d in stage.deps if hasattr(d, "params") for p in d.params]
            stages[stage.name] = {
                "deps": {str(d.def_path) for d in files},
                "outs": {str(o.def_path) for o in stage.outs},
                "cmd": stage.cmd,
                "params": params,
            }
    return stages


def stage_of(name: str) -> str:
    """The pipeline stage a rule or DVC stage runs: finetune_baseline and finetune_semi are the
    finetune stage for the feature baselines and the semi cells (each a rule and a stage of its
    own, with the same command)."""
    return dag.stage(name.split("@")[0]).command


def nothing_to_do(project: Path) -> bool:
    return "Nothing to be done" in run(["snakemake", "-n"], project).stdout


def snakemake_would_run(project: Path) -> set[str]:
    out = run(["snakemake", "-n"], project).stdout
    return set(re.findall(r"^(?:local)?rule (\w+):", out, re.M)) - {"all"}


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


def linked_outputs(project: Path) -> list[str]:
    """Outputs that are links into DVC's cache instead of files of their own: symlinks (Chromium
    shows a linked report as source text, issue 24) and read-only or multiply linked files (DVC's
    hard links, which Snakemake refuses to replace)."""
    linked = []
    for top in ("data", "models", "metrics", "reports"):
        for path in sorted((project / top).rglob("*")):
            if path.is_symlink() or (
                path.is_file()
                and (path.stat().st_nlink > 1 or not path.stat().st_mode & stat.S_IWUSR)
            ):
                linked.append(str(path.relative_to(project)))
    return linked


def dvc_changed(project: Path) -> set[str]:
    out = run(["dvc", "status"], project).stdout
    return set(re.findall(r"^([\w@.\-]+):$", out, re.M))


def assert_pretrained_on_training_and_pool(project: Path) -> None:
    """The trained methods learned from the training split and every pool image (none is a copy
    of a validation or test image), and the log, the metrics and the report all say so."""
    training = len(np.load(project / "data/splits/imagefolder/train.npy"))
    split = json.loads((project / "data/splits/imagefolder/report.json").read_text())
    assert split["pool"]["kept"] == TINY_POOL_FILES, split["pool"]
    report = (project / "reports/index.html").read_text()
    for method in ("simclr", "gan"):
        log = (project / f"logs/pretrain/{method}.log").read_text()
        line = (
            f"{method}: pretraining on {training} training images + {TINY_POOL_FILES} pool images"
        )
        assert line in log, log
        final = json.loads((project / f"metrics/pretrain/{method}.json").read_text())
        assert final["images_seen"] == training + TINY_POOL_FILES, final
        assert final["pool_images"] == TINY_POOL_FILES, final
        said = f"{method} learned from {training} training + {TINY_POOL_FILES} pool images."
        assert said in report, method
    # scratch is the untrained initialization: a pool changes nothing it saw.
    assert "scratch learned from no images" in report
    assert "pool images" not in (project / "logs/pretrain/scratch.log").read_text()


def assert_chose_on_the_scarce_validation_set(project: Path) -> None:
    """The README's split.val_labels_per_class (4, set by the ``project`` fixture): the split
    kept 4 validation images per class, fine-tuning chose on them, and the report says so."""
    split = project / "data/splits/imagefolder"
    val, chosen_on = np.load(split / "val.npy"), np.load(split / "val-labeled.npy")
    assert len(chosen_on) == 4 * 4 and np.isin(chosen_on, val).all() and len(val) > len(chosen_on)
    cell = json.loads((project / "metrics/finetune/simclr-linear-all.json").read_text())
    assert cell["validation"] == {"file": "val-labeled", "labels_per_class": 4, "size": 16}
    report = (project / "reports/index.html").read_text()
    assert "made on 4 labeled validation images per class" in report


def test_both_runners_declare_the_same_stages_commands_deps_and_outs(project: Path):
    snakemake = snakemake_jobs(project)
    dvc = dvc_stages(project)
    assert set(snakemake) == set(dvc)
    for name, job in snakemake.items():
        assert job["cmd"] == dvc[name]["cmd"], name
        assert _as_dvc_declares(job["deps"], name) == dvc[name]["deps"], name
        assert job["outs"] == dvc[name]["outs"], name
        assert job["cmd"].startswith(f"python -m pipeline {stage_of(name)} ")


def test_dvc_params_are_the_keys_each_stage_declares(project: Path):
    for name, stage in dvc_stages(project).items():
        stage_name, method = stage_of(name), name.partition("@")[2]
        module = importlib.import_module(f"pipeline.stages.{stage_name}")
        keys = module.params_for(method) if stage_name == "pretrain" else module.PARAMS
        assert stage["params"] == list(keys), name


def test_snakemake_runs_the_pipeline_and_dvc_then_sees_it_up_to_date(project: Path, tmp_path: Path):
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "sitecustomize.py").write_text(TRACE_HOOK)
    env = run_env() | {"PYTHONPATH": str(trace), "PIPELINE_IMPORT_TRACE": str(trace)}
    run(["snakemake", "--cores", "2"], project, env=env)
    report = yaml.safe_load((project / "data/splits/imagefolder/report.json").read_text())
    assert report["disjointness"]["disjoint"] is True
    assert_pretrained_on_training_and_pool(project)
    assert_chose_on_the_scarce_validation_set(project)
    # The GAN (its own optimizers, its own monitors) trained and fine-tuned like any method.
    assert "d_fake" in (project / "metrics/pretrain/gan.csv").read_text().splitlines()[0]
    assert (project / "models/pretrain/gan/samples.npy").is_file()
    assert (project / "metrics/finetune/gan-linear-all.json").is_file()

    # A rule's declared code deps are exactly the pipeline files its jobs imported (the union
    # over its jobs: the scratch "method" never imports the training code the others need).
    declared = snakemake_jobs(project)
    imported_by_rule: dict[str, set[str]] = {}
    declared_by_rule: dict[str, set[str]] = {}
    for stage, job in declared.items():
        loaded = (trace / f"{stage}.txt").read_text().split("\n")
        imported = {
            str(Path(f).relative_to(project))
            for f in loaded
            if Path(f).is_relative_to(project / "pipeline")
        }
        code = {d for d in job["deps"] if d.startswith("pipeline/")}
        rule = stage.split("@")[0]
        assert imported <= code, stage
        imported_by_rule.setdefault(rule, set()).update(imported)
        declared_by_rule.setdefault(rule, code)
        assert declared_by_rule[rule] == code, stage  # every job of a rule declares the same
        assert "schemas/params.schema.yaml" in job["deps"]  # read by pipeline/config.py
    assert imported_by_rule == declared_by_rule

    # Snakemake's own report holds the study's page, its figure and its tables.
    run(["snakemake", "--report", "report.zip"], project)
    with zipfile.ZipFile(project / "report.zip") as archive:
        names = {Path(name).name for name in archive.namelist()}
    assert {
        "report.html",
        "index.html",
        "label_efficiency.png",
        "summary.csv",
        "label_efficiency.csv",
        "preview.png",
    } <= names, names
    (project / "report.zip").unlink()

    run(["dvc", "commit", "--force", "--quiet"], project)  # what `make run` does after snakemake
    assert dvc_changed(project) == set()
    # As `make run` leaves it (cache.type reflink,copy), every output is a file of its own, and
    # the report opens in a real browser as a page, figures loaded, not as its source text.
    assert linked_outputs(project) == []
    if CHROMIUM is None:
        warnings.warn(
            "chromium is not installed: reports/index.html was not opened after dvc "
            "commit (make test installs it as root)",
            stacklevel=1,
        )
    else:
        (tmp_path / "browser").mkdir()
        assert_opens_as_a_page(project / "reports/index.html", tmp_path / "browser")
    # The study's numbers and plots through DVC's own commands, no flags needed.
    assert "metrics/summary.json" in run(["dvc", "metrics", "show"], project).stdout
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], project)
    assert (tmp_path / "plots" / "index.html").is_file()
    skipped = run(["dvc", "repro"], project).stdout.count("didn't change, skipping")
    assert skipped == len(declared)
    assert nothing_to_do(project)

    # A re-run over the committed outputs replaces them with new files and never writes through
    # one into the cache: the cached copy keeps its content, under its checksum's name.
    summary = project / "metrics/summary.json"
    before = summary.read_bytes()
    digest = hashlib.md5(before).hexdigest()
    cached = project / ".dvc/cache/files/md5" / digest[:2] / digest[2:]
    assert cached.read_bytes() == before
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["bootstrap"] = 60
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert snakemake_would_run(project) == {"evaluate", "visualize"}
    run(["snakemake", "--cores", "2"], project)
    assert summary.read_bytes() != before
    assert cached.read_bytes() == before
    run(["dvc", "commit", "--force", "--quiet"], project)
    assert dvc_changed(project) == set()
    assert linked_outputs(project) == []

    # A fine-tuning param re-runs the fine-tuning cells and what reads them, nothing upstream.
    params["finetune"]["label_smoothing"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert {name.split("@")[0] for name in dvc_changed(project)} == {"finetune"}
    assert snakemake_would_run(project) == {"finetune", "evaluate", "visualize"}


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


def test_the_repository_dvc_yaml_and_rules_exist_side_by_side():
    assert (REPO / "dvc.yaml").is_file() and (REPO / "Snakefile").is_file()
