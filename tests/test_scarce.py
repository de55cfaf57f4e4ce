"""benchmarks/scarce.py: how it groups the cells, the folders it writes as a user's, the README
overlay it runs, and the BENCHMARKS.md sections it renders. (The benchmark runs themselves take
tens of minutes; BENCHMARKS.md records them.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import report, scarce
from pipeline.data.formats import list_imagefolder, list_images
from tests.conftest import tiny_images, write_idx


def test_each_cell_is_one_of_four_kinds():
    assert scarce.kind("scratch", "finetune") == "labels only"
    assert scarce.kind("pixels", "knn") == "labels only"
    assert scarce.kind("pca", "linear") == "labels only"
    assert scarce.kind("simclr", "linear") == "self-supervised"
    assert scarce.kind("scratch", "semi") == "semi-supervised"  # plain FixMatch
    assert scarce.kind("simclr", "semi") == "both"


def _cell(init: str, mode: str, budget: str, val: float, test: float) -> dict:
    return {
        "init": init,
        "mode": mode,
        "budget": budget,
        "kind": scarce.kind(init, mode),
        "val": val,
        "test": test,
        "test_std": 0.01,
        "ci": [test - 0.02, test + 0.02],
        "seconds": 12.0,
    }


CELLS = [
    _cell("scratch", "finetune", "4pc", 0.60, 0.61),
    _cell("pixels", "knn", "4pc", 0.62, 0.58),  # best on validation, worse on test: chosen
    _cell("simclr", "finetune", "4pc", 0.65, 0.64),
    _cell("scratch", "semi", "4pc", 0.66, 0.65),
    _cell("simclr", "semi", "4pc", 0.70, 0.71),
    _cell("scratch", "finetune", "all", 0.88, 0.87),
]


def test_the_best_of_each_kind_is_chosen_on_validation_not_test():
    best = scarce.best_by_kind(CELLS)
    assert best["4pc"]["labels only"]["init"] == "pixels"
    assert best["4pc"]["both"]["mode"] == "semi" and best["4pc"]["both"]["init"] == "simclr"
    assert set(best["all"]) == {"labels only"}


def test_fashion_mnist_becomes_labeled_class_folders_and_an_unlabeled_folder(tmp_path: Path):
    source = tmp_path / "fm"
    images, labels = tiny_images(200, 10, 28, seed=3)
    write_idx(source / "train-images-idx3-ubyte.gz", images)
    write_idx(source / "train-labels-idx1-ubyte.gz", labels)
    labeled, unlabeled = scarce.write_image_folder(tmp_path / "mine", 3, source=source)
    classes, files, _ = list_imagefolder(labeled)
    assert len(classes) == 10 and sorted(classes)[0].startswith("0_t_shirt")
    assert np.bincount([label for _, label in files], minlength=10).tolist() == [3] * 10
    pool, _ = list_images(unlabeled)
    assert len(pool) == 200 - 30  # every other training image, none of the labeled ones
    labeled_pixels = {Image.open(path).tobytes() for path, _ in files}
    assert not labeled_pixels & {Image.open(path).tobytes() for path in pool}


def test_the_overlay_is_readmes_and_merges_as_the_profile_command_does():
    overlay = scarce.readme_overlay()
    assert overlay["data"]["dataset"] == "imagefolder"
    assert {"local_path", "unlabeled_path"} <= set(overlay["data"])
    merged = scarce._merged(
        {"split": {"label_fractions": [0.1], "seed": 1}, "data": {"dataset": "mnist"}}, overlay
    )
    assert merged["split"]["label_fractions"] is None and merged["split"]["seed"] == 1
    assert merged["split"]["labels_per_class"] == overlay["split"]["labels_per_class"]


def test_both_sections_render_every_cell_and_the_best_of_each_kind():
    machine = {"date": "d", "cpu": "c", "cores": 2, "gpu": None, "torch": "t", "command": "x"}
    answer = {
        "4pc": {
            "budget": "4pc",
            "ssl_cell": "simclr-semi",
            "baseline_cell": "pixels-knn",
            "difference": 0.13,
            "ci_low": 0.11,
            "ci_high": 0.15,
        }
    }
    result = {
        "machine": machine,
        "cells": CELLS,
        "best_by_kind": scarce.best_by_kind(CELLS),
        "answer": answer,
        "rerun_seconds": 60.0,
    }
    text = "\n".join(report._scarce(result))
    assert "| simclr | semi | 71.00 [69.0, 73.0] · 12 s | — |" in text
    assert "| 4 labels per class | 58.00 [56.0, 60.0] pixels-knn |" in text
    assert "simclr-semi vs pixels-knn: +13.00 points [+11.00, +15.00]" in text
    own = {**result, "overlay": {"data": {"dataset": "imagefolder"}}, "total_seconds": 600.0}
    own["pool"] = {"kept": 58900}
    assert "(10.0 min)" in "\n".join(report._own_images(own))
