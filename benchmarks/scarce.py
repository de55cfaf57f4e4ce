"""Scarce labels, measured: the study at a few labels per class with every init x mode
(``semi`` included), and the same question asked of a user's own image folder.

python -m benchmarks.scarce study --workdir DIR [--semi-inits scratch,pca,simclr]
    [--semi-fractions 4pc,25pc,100pc] [--json benchmarks/results/scarce.json]
python -m benchmarks.scarce own-images [--json benchmarks/results/own_images.json]

``study`` adds semi-supervised cells (``finetune.semi.inits`` x ``finetune.semi.fractions``) to
a project that has already run (for example the clone ``python -m benchmarks.pipeline --keep``
left), runs Snakemake again (only the new cells, the evaluation and the report run) and reads,
per cell: the validation accuracy the choices were made on, the test accuracy with its interval
(metrics/summary.json) and the job's process seconds (its MLflow run, imports included).

``own-images`` is what a user with a folder of images and few labels does, through params
alone: it writes Fashion-MNIST's training split as an image folder of ``--labeled`` images per
class (PNG, one folder per class) plus an unlabeled folder of every other training image, takes
the overlay of README's "Your own images, few labels" section with its two paths pointed at
those folders and its image shape set to Fashion-MNIST's (28 x 28, one channel), and runs the
whole pipeline in a fresh clone.

Both report, per label budget, the best cell of four kinds, each chosen on validation: labels
only (from scratch, raw pixels or PCA), self-supervised pretraining, semi-supervised training
from scratch, and both together, and the product's own answer (metrics/summary.json's
``answer``: best self- or semi-supervised cell minus best baseline, with its paired interval).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.machine import describe, save_result
from benchmarks.pipeline import REPO, _clone, _run, stage_costs

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: The four ways to use what a user has, as the benchmark groups the cells.
KINDS = ("labels only", "self-supervised", "semi-supervised", "both")
README_SECTION = "## Your own images, few labels"


def kind(init: str, mode: str) -> str:
    """Which of KINDS a cell is: a baseline init (scratch, pixels, PCA) learns from its labels
    only unless its mode is semi; a pretrained init is self-supervised, and with semi both."""
    from pipeline.config import SEMI_SUPERVISED_MODES
    from pipeline.study import BASELINES

    semi = mode in SEMI_SUPERVISED_MODES
    if init in BASELINES:
        return "semi-supervised" if semi else "labels only"
    return "both" if semi else "self-supervised"


def cells(work: Path) -> list[dict[str, Any]]:
    """Every fine-tuning cell of the project in ``work``: validation accuracy, test accuracy
    with its interval (mean over seeds, mean of the seeds' bounds) and the job's seconds."""
    from pipeline.paths import metric_key

    summary = json.loads((work / "metrics/summary.json").read_text())["test_accuracy"]
    seconds = _cell_seconds(work)
    out = []
    for path in sorted((work / "metrics/finetune").glob("*.json")):
        cell = json.loads(path.read_text())
        init, mode, budget = cell["init"], cell["mode"], cell["fraction"]
        test = summary[f"{init}-{mode}"][metric_key(budget)]
        out.append(
            {
                "init": init,
                "mode": mode,
                "budget": budget,
                "kind": kind(init, mode),
                "val": cell["val_acc_mean"],
                "test": test["mean"],
                "test_std": test["std"],
                "ci": [test["ci_low"], test["ci_high"]],
                "seconds": seconds.get(f"{init}-{mode}-{budget}"),
            }
        )
    return out


def _cell_seconds(work: Path) -> dict[str, float]:
    """Each finished fine-tuning job's process seconds, by cell name (its MLflow run's tag)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    seconds: dict[str, float] = {}
    for found in client.search_runs(ids, "tags.stage = 'finetune'", max_results=10000):
        metrics, tags = found.data.metrics, found.data.tags
        if found.info.status == "FINISHED" and "process_seconds" in metrics and "cell" in tags:
            seconds[tags["cell"]] = metrics["process_seconds"]
    return seconds


def best_by_kind(found: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per budget and kind, the cell with the best validation accuracy (ties: the first)."""
    best: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in found:
        chosen = best.setdefault(cell["budget"], {})
        if cell["kind"] not in chosen or cell["val"] > chosen[cell["kind"]]["val"]:
            chosen[cell["kind"]] = cell
    return best


def read(work: Path) -> dict[str, Any]:
    """Everything the benchmark reports of a finished project."""
    found = cells(work)
    summary = json.loads((work / "metrics/summary.json").read_text())
    return {
        "cells": found,
        "best_by_kind": best_by_kind(found),
        "answer": summary.get("answer"),
        "stages": stage_costs(work),
        "pool": _pool_report(work),
    }


def _pool_report(work: Path) -> dict[str, Any] | None:
    reports = sorted((work / "data/splits").glob("*/report.json"))
    return json.loads(reports[0].read_text()).get("pool") if reports else None


def study(work: Path, cores: int, semi_inits: list[str], semi_fractions: list[str]) -> dict:
    """Add the semi cells to a project that already ran, run it again, read the result."""
    params_path = work / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["finetune"]["semi"].update(inits=semi_inits, fractions=semi_fractions)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    _run(["snakemake", "--cores", str(cores)], work)
    return {"rerun_seconds": time.perf_counter() - started, **read(work)}


def write_image_folder(
    root: Path, labeled_per_class: int, seed: int = 0, source: Path = FASHION_MNIST
) -> tuple[Path, Path]:
    """Fashion-MNIST's training split as a user's folders: ``labeled/<class>/`` with
    ``labeled_per_class`` PNGs of each class (a seeded draw) and ``unlabeled/`` with every
    other training image, in subfolders of 1,000 as a camera would leave them."""
    from PIL import Image

    from pipeline.data.datasets import spec
    from pipeline.data.formats import read_idx_pair

    images, labels = read_idx_pair(
        source / "train-images-idx3-ubyte.gz", source / "train-labels-idx1-ubyte.gz"
    )
    images = images.reshape(images.shape[:3])  # N x H x W x 1 -> N x H x W (grayscale)
    names = spec("fashion_mnist").classes
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:labeled_per_class] for c in range(10)]
    )
    labeled, unlabeled = root / "labeled", root / "unlabeled"
    for index in chosen:
        folder = labeled / _folder_name(int(labels[index]), names)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], "L").save(folder / f"{index:05d}.png")
    rest = np.setdiff1d(np.arange(len(images)), chosen)
    for position, index in enumerate(rest):
        folder = unlabeled / f"batch{position // 1000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], "L").save(folder / f"{index:05d}.png")
    return labeled, unlabeled


def _folder_name(label: int, names: tuple[str, ...]) -> str:
    """Class folders sort in label order (the image-folder reader numbers them sorted)."""
    return f"{label}_{re.sub(r'[^a-z0-9]+', '_', names[label].lower()).strip('_')}"


def readme_overlay(readme: Path = REPO / "README.md") -> dict[str, Any]:
    """The params overlay README's "Your own images, few labels" section tells a user to write."""
    text = readme.read_text()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    section = text[start : end if end != -1 else len(text)]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    if block is None:
        raise ValueError(f"README.md's section {README_SECTION!r} holds no ```yaml block")
    return yaml.safe_load(block.group(1))


def own_images(cores: int, labeled_per_class: int, workdir: Path | None = None) -> dict:
    """The pipeline on Fashion-MNIST written as a user's labeled + unlabeled folders."""
    owned = workdir is None
    base = Path(workdir or tempfile.mkdtemp(prefix="own-images-benchmark-"))
    try:
        labeled, unlabeled = write_image_folder(base / "my-images", labeled_per_class)
        overlay = readme_overlay()
        # The user's images are Fashion-MNIST's: 28 x 28 grayscale, which they would say.
        overlay["data"].update(
            local_path=str(labeled), unlabeled_path=str(unlabeled), image_size=28, channels=1
        )
        params = _merged(yaml.safe_load((REPO / "params.yaml").read_text()), overlay)
        work = base / "project"
        _clone(REPO, work, params)
        started = time.perf_counter()
        _run(["snakemake", "--cores", str(cores)], work)
        total = time.perf_counter() - started
        return {"overlay": overlay, "total_seconds": total, **read(work)}
    finally:
        if owned:
            shutil.rmtree(base, ignore_errors=True)


def _merged(params: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """What `python -m pipeline profile` does: mappings merge, lists and values replace."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            _merged(params[key], value)
        else:
            params[key] = value
    if (params.get("split") or {}).get("labels_per_class") is not None:
        params["split"]["label_fractions"] = None
    return params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("study", help="add semi cells to a finished project and read it")
    one.add_argument("--workdir", type=Path, required=True, help="a project that has run")
    one.add_argument("--semi-inits", default="scratch,pca,simclr")
    one.add_argument("--semi-fractions", default="4pc,25pc,100pc")
    two = sub.add_parser("own-images", help="Fashion-MNIST as a user's folders, end to end")
    two.add_argument("--labeled", type=int, default=100, help="labeled images per class")
    two.add_argument("--workdir", type=Path, help="keep the folders and project here")
    for each in (one, two):
        each.add_argument("--json", type=Path, help="write the result here")
        each.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "study":
        result = study(
            args.workdir, args.cores, args.semi_inits.split(","), args.semi_fractions.split(",")
        )
    else:
        result = own_images(args.cores, args.labeled, args.workdir)
    result = {"machine": describe("benchmarks.scarce"), **result}
    save_result(args.json, result)
    print(json.dumps(result["best_by_kind"], indent=2))
    print(json.dumps(result["answer"], indent=2))


if __name__ == "__main__":
    main()
