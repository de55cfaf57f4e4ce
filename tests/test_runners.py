"""Snakemake and DVC run the same stages with the same commands, and agree on what is up to date.

These tests run both tools for real on a copy of the project configured for a tiny image folder
plus an unlabeled pool (tests/conftest.py's ``project``), so both runners also carry the pool from
data.unlabeled_path through download and split into pretraining (issue 25).

A whole run costs minutes, so one Snakemake run serves two tests here (the ``measured`` fixture):
the pipeline benchmark's harness (benchmarks/pipeline.py) makes it from a clean clone, with its
no-op re-runs, ``dvc commit`` and a changed param, and both the runner checks and the harness's
own checks read it. The DVC direction (``dvc repro`` makes the run) is tests/test_runners_dvc.py,
a file of its own so that ``pytest -n`` can give it to another process.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline import dag
from tests.conftest import REPO, TINY_POOL_FILES, make_project, run, sync_matrix
from tests.test_visualize import CHROMIUM, assert_opens_as_a_page

#: What benchmarks/report.py reads of the machine a benchmark ran on, for rendering a result.
MACHINE = {
    "date": "2025-01-01 00:00 UTC",
    "cpu": "Test CPU",
    "cores": 2,
    "gpu": None,
    "python": "3.11",
    "torch": "2.x",
    "command": "python -m benchmarks.pipeline",
}
#: Where each stage process writes the modules it loaded (not PIPELINE_...: the benchmark harness
#: passes its environment on to the stages without the PIPELINE_ and MLFLOW_ variables).
TRACE_VARIABLE = "IMPORT_TRACE_DIR"
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
    out = os.path.join(os.environ["IMPORT_TRACE_DIR"], name + ".txt")
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


@dataclass(frozen=True)
class MeasuredRun:
    """The module's one Snakemake run: ``project`` is the clean clone the benchmark harness ran
    in, ``result`` what it measured, ``trace`` the folder of each stage process's imports and
    ``figure`` the copy of the label-efficiency figure it was asked for."""

    project: Path
    result: dict[str, Any]
    trace: Path
    figure: Path


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> MeasuredRun:
    """The pipeline from a clean clone of the ``project`` repository, run and measured once by
    benchmarks.pipeline for both tests that read it: Snakemake, a no-op Snakemake, ``dvc commit``
    (what ``make run`` does), a no-op ``dvc repro``, then evaluate.bootstrap 50 -> 60 and
    Snakemake again (the re-run measurement), with every stage process's imports traced."""
    from benchmarks import pipeline

    tmp = tmp_path_factory.mktemp("measured")
    source = make_project(tmp)
    params = yaml.safe_load((source / "params.yaml").read_text())
    # A second, scarce budget, so that every quality key of the harness has a cell (4 per class
    # is both the smallest budget and the second largest); the runner checks read "all".
    params["split"]["labels_per_class"] = [4, "all"]
    trace = tmp / "trace"
    trace.mkdir()
    (trace / "sitecustomize.py").write_text(TRACE_HOOK)
    figure = tmp / "results" / "label_efficiency.png"
    with pytest.MonkeyPatch.context() as patch:  # the harness passes its environment on
        patch.setenv("PYTHONPATH", str(trace))
        patch.setenv(TRACE_VARIABLE, str(trace))
        result = pipeline.run(
            source=source,
            cores=2,
            workdir=tmp / "bench",
            params=sync_matrix(params),
            figure_to=figure,
            change=("evaluate", "bootstrap", 60),
        )
    return MeasuredRun(tmp / "bench" / "project", result, trace, figure)


def committed_md5(project: Path, stage: str, path: str) -> str:
    """The checksum dvc.lock records for ``path``, an output of ``stage``."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    (out,) = [out for out in lock["stages"][stage]["outs"] if out["path"] == path]
    return out["md5"]


def test_snakemake_runs_the_pipeline_and_dvc_then_sees_it_up_to_date(
    measured: MeasuredRun, tmp_path: Path
):
    project, trace = measured.project, measured.trace
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

    # The harness committed the run (dvc commit, as `make run` does after snakemake), after which
    # neither runner had anything to do; then evaluate.bootstrap changed, and Snakemake re-ran
    # the evaluation and the report, nothing upstream.
    reruns = measured.result["reruns"]
    assert reruns["snakemake_noop_nothing_to_do"] and reruns["dvc_noop_skipped_all"]
    assert reruns["param_change_jobs"] == {"evaluate": 1, "visualize": 1}
    # That re-run over the committed outputs replaced them with new files and never wrote through
    # one into the cache: the cached copy keeps its content, under its checksum's name.
    summary = project / "metrics/summary.json"
    digest = committed_md5(project, "evaluate", "metrics/summary.json")
    cached = project / ".dvc/cache/files/md5" / digest[:2] / digest[2:]
    assert hashlib.md5(cached.read_bytes()).hexdigest() == digest
    assert summary.read_bytes() != cached.read_bytes()
    run(["dvc", "commit", "--force", "--quiet"], project)
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

    # A fine-tuning param re-runs the fine-tuning cells and what reads them, nothing upstream.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["label_smoothing"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert {name.split("@")[0] for name in dvc_changed(project)} == {"finetune"}
    assert snakemake_would_run(project) == {"finetune", "evaluate", "visualize"}


def test_pipeline_benchmark_measures_a_clean_run_its_reruns_and_the_targets(
    measured: MeasuredRun,
):
    """benchmarks.pipeline on the tiny project (no timing is asserted: the machine is shared):
    what `make benchmarks` measures of a whole run, its re-runs and the study's targets."""
    from benchmarks import pipeline, report

    result = measured.result
    assert measured.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| scratch | knn |" in result["summary_markdown"]

    assert list(result["stages"]) == list(pipeline.STAGES)
    jobs = {stage: cost["jobs"] for stage, cost in result["stages"].items()}
    assert jobs == {
        "download": 1,
        "split": 1,
        "augment": 1,
        "pretrain": 3,
        "finetune": 12,  # 3 inits x 2 modes x 2 budgets
        "evaluate": 1,
        "visualize": 1,
    }
    for cost in result["stages"].values():
        assert 0 < cost["slowest_job_seconds"] <= cost["seconds"] < result["total_seconds"]
        assert 50 < cost["peak_rss_mb"] < 64 * 1024
    reruns = result["reruns"]
    assert reruns["snakemake_noop_nothing_to_do"] and reruns["dvc_noop_skipped_all"]
    assert reruns["param_change"] == "evaluate.bootstrap: 50 -> 60"
    assert reruns["param_change_jobs"] == {"evaluate": 1, "visualize": 1}

    quality = result["quality"]
    assert quality["budgets"] == ["4pc", "all"]
    assert quality["largest"]["cell"].endswith("-all")
    # The cells best on validation, read from the cells' own files: at two budgets the second
    # largest is the smallest; the self-supervised side is simclr or the GAN, the baseline scratch.
    val = {
        path.stem: json.loads(path.read_text())["val_acc_mean"]
        for path in (measured.project / "metrics/finetune").glob("*-4pc.json")
    }
    assert len(val) == 6
    ssl, baseline = quality["smallest_ssl"], quality["smallest_baseline"]
    assert quality["second_ssl"] == ssl
    assert ssl["cell"].split("-")[0] in ("simclr", "gan") and ssl["cell"] in val
    assert ssl["val"] == max(v for cell, v in val.items() if not cell.startswith("scratch-"))
    assert baseline["cell"].split("-")[0] == "scratch"
    assert baseline["val"] == max(v for cell, v in val.items() if cell.startswith("scratch-"))
    assert quality["smallest_gain"] == pytest.approx(ssl["test"] - baseline["test"])
    for chosen in (quality["largest"], ssl, baseline):
        assert 0 <= chosen["ci"][0] <= chosen["test"] <= chosen["ci"][1] <= 1
    # summary.json's answer as the evaluate stage wrote it: the same cells as chosen here.
    answer = quality["answer"]
    assert list(answer) == ["4pc", "all"]
    assert (f"{answer['4pc']['ssl_cell']}-4pc", f"{answer['4pc']['baseline_cell']}-4pc") == (
        ssl["cell"],
        baseline["cell"],
    )
    assert answer["4pc"]["ci_low"] <= answer["4pc"]["difference"] <= answer["4pc"]["ci_high"]
    models = [
        f"{init}-{mode}" for init in ("scratch", "simclr", "gan") for mode in ("linear", "knn")
    ]
    assert {model: list(steps) for model, steps in quality["gains"].items()} == {
        model: ["4pc->all"] for model in sorted(models)
    }
    knn = quality["knn"]
    assert set(knn["per_method"]) == {"scratch", "simclr", "gan"}
    assert knn["best_ssl"] == max(("simclr", "gan"), key=knn["per_method"].get)
    assert len(result["commit"]) == 40
    text = "\n".join(report._pipeline({**result, "machine": MACHINE, "targets": pipeline.TARGETS}))
    assert f"| 4 labels per class, best self-supervised or semi cell | {ssl['cell']} " in text
    assert f"| 4 labels per class | {answer['4pc']['ssl_cell']} " in text
    assert "| init-mode | 4 per class → all |" in text


def test_the_repository_dvc_yaml_and_rules_exist_side_by_side():
    assert (REPO / "dvc.yaml").is_file() and (REPO / "Snakefile").is_file()
