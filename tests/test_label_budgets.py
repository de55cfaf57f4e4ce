"""Label budgets per class, per-seed draws and a scarce validation set, through the stages.

The split's functions are tested in test_split.py; here the split, finetune and evaluate stages
run on tiny IDX data (400 training images of 4 classes) as params.yaml would drive them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, check, from_dict
from pipeline.data.split import LabelBudgetError
from pipeline.stages import augment, download, evaluate, finetune, pretrain, split
from tests.conftest import params_for, sync_matrix

SPLITS = Path("data/splits/idx")


def budget_params(tiny_idx: Path, **split_keys: object) -> dict:
    """Tiny-data params with per-class budgets 2, 5 and all (and the given split keys)."""
    params = params_for("idx")
    params["split"].update(labels_per_class=[2, 5, "all"], **split_keys)
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(backbone="lenet5", width=8)
    params["pretrain"].update(methods=["scratch", "rotation"], epochs=1, batch_size=64)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["finetune"].update(
        modes=["linear", "knn"],
        max_passes=1,
        min_steps=4,
        batch_size=32,
        min_steps_per_epoch=2,
        seeds=[0, 1],
    )
    params["finetune"]["knn"] = {"ks": [1, 5], "temperatures": [0.1]}
    params["evaluate"]["bootstrap"] = 50
    return sync_matrix(params)


def indices(name: str) -> np.ndarray:
    return np.load(SPLITS / f"{name}.npy")


def per_class(index: np.ndarray) -> list[int]:
    labels = np.load("data/prepared/idx/train_labels.npy")
    return np.bincount(labels[index], minlength=4).tolist()


def test_both_label_grids_set_is_one_config_error(tiny_idx: Path):
    params = budget_params(tiny_idx)
    params["split"]["label_fractions"] = [0.1, 1.0]
    with pytest.raises(ConfigError, match="label_fractions and split.labels_per_class are both"):
        from_dict(params)


def test_labels_per_class_alone_is_one_grid_once_defaults_fill(tiny_idx: Path):
    """Snakemake checks params.yaml (filling the schema's defaults) and the stages check the
    result again: label_fractions' default must not turn up beside labels_per_class."""
    params = budget_params(tiny_idx)
    del params["split"]["label_fractions"]
    filled = check(params)
    assert filled["split"]["label_fractions"] is None
    assert from_dict(filled).finetune.fractions == from_dict(params).finetune.fractions


def test_finetune_fractions_must_name_the_per_class_keys(tiny_idx: Path):
    params = budget_params(tiny_idx)
    params["finetune"]["fractions"] = [0.1]
    with pytest.raises(ConfigError, match=r"has 0.1, .* allowed: 2pc, 5pc, all"):
        from_dict(params)


def test_draws_must_cover_the_seeds(tiny_idx: Path):
    params = budget_params(tiny_idx, label_draws=2)
    params["finetune"]["seeds"] = [0, 1, 2]
    with pytest.raises(ConfigError, match="label_draws is 2 but finetune.seeds has 3 seeds"):
        from_dict(params)
    params["split"]["label_draws"] = 1  # every seed on draw 0, as by default
    assert from_dict(params).split.draw_of((0, 1, 2), 2) == 0


def test_split_writes_exact_budgets_per_draw_and_a_validation_subset(workdir, tiny_idx):
    config = from_dict(budget_params(tiny_idx, label_draws=2, val_labels_per_class=3))
    download.run(config)
    report = split.run(config)
    train, val = indices("train"), indices("val")
    for draw in ("", "-draw1"):
        two, five, every = (indices(f"labeled-{b}{draw}") for b in ("2pc", "5pc", "all"))
        assert per_class(two) == [2] * 4 and per_class(five) == [5] * 4
        assert np.isin(two, five).all() and np.isin(five, every).all()  # nested within a draw
        assert np.array_equal(every, train)
    assert not np.array_equal(indices("labeled-5pc"), indices("labeled-5pc-draw1"))
    subset = indices("val-labeled")
    assert per_class(subset) == [3] * 4 and np.isin(subset, val).all()
    assert report["val_labeled"]["size"] == 12
    assert set(report["label_fractions"]) == {
        "2pc",
        "5pc",
        "all",
        "2pc-draw1",
        "5pc-draw1",
        "all-draw1",
    }
    assert "| validation subset (choices) | 12 |" in (SPLITS / "report.md").read_text()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"labels_per_class": [2, 500]}, r"asks for 500 labeled images per class, but class"),
        ({"val_labels_per_class": 50}, r"val_labels_per_class asks for 50 .* raise split.val_f"),
    ],
)
def test_a_budget_no_class_can_give_is_one_line_and_writes_nothing(
    workdir, tiny_idx, keys, message
):
    params = budget_params(tiny_idx)
    params["split"].update(keys)
    config = from_dict(sync_matrix(params))
    download.run(config)
    with pytest.raises(LabelBudgetError, match=message) as caught:
        split.run(config)
    assert "\n" not in str(caught.value)
    assert not SPLITS.exists()


@pytest.fixture
def budget_project(workdir: Path, tiny_idx: Path) -> dict:
    """Split, augment and pretrain (scratch, rotation) with budgets, 2 draws, 3 val per class."""
    params = budget_params(tiny_idx, label_draws=2, val_labels_per_class=3)
    config = from_dict(params)
    download.run(config)
    split.run(config)
    augment.run(config)
    for method in ("scratch", "rotation"):
        pretrain.run(config, method=method)
    return params


class Opened:
    """The files the process opens while active (an audit hook)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.active = True
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple) -> None:
        if self.active and event == "open" and isinstance(args[0], str | Path):
            self.names.append(Path(args[0]).name)


@pytest.mark.parametrize("mode", ["linear", "knn"])
def test_seed_k_reads_draw_k_and_chooses_on_the_validation_subset(budget_project, mode):
    config = from_dict(budget_project)
    opened = Opened()
    try:
        summary = finetune.run(config, init="rotation", mode=mode, fraction="5pc")
    finally:
        opened.active = False
    assert summary["seeds"]["0"]["labeled_set"] == "labeled-5pc"
    assert summary["seeds"]["1"]["labeled_set"] == "labeled-5pc-draw1"
    assert {"labeled-5pc.npy", "labeled-5pc-draw1.npy", "val-labeled.npy"} <= set(opened.names)
    assert "val.npy" not in opened.names  # no choice saw the rest of validation
    saved = json.loads(Path(f"metrics/finetune/rotation-{mode}-5pc.json").read_text())
    assert saved["validation"] == {"file": "val-labeled", "labels_per_class": 3, "size": 12}
    assert saved["fraction"] == "5pc"
    # accuracy on 12 images moves in twelfths: the choices were scored on the subset only
    for seed in saved["seeds"].values():
        assert round(seed["val_acc"] * 12, 4) == round(seed["val_acc"] * 12)


def test_a_tiny_study_with_per_class_budgets_reads_per_class(budget_project):
    config = from_dict(budget_project)
    for init, mode, fraction in config.finetune.cells():
        finetune.run(config, init=init, mode=mode, fraction=str(fraction))
    evaluate.run(config)
    summary = json.loads(Path("metrics/summary.json").read_text())
    assert set(summary["test_accuracy"]["rotation-linear"]) == {"2pc", "5pc", "all"}
    markdown = Path("metrics/summary.md").read_text()
    assert "| 2 per class | 5 per class | all |" in markdown
    assert Path("reports/figures/label_efficiency.png").stat().st_size > 0
    assert sorted(p.name for p in Path("metrics/eval").glob("rotation-knn-*.json")) == [
        "rotation-knn-2pc.json",
        "rotation-knn-5pc.json",
        "rotation-knn-all.json",
    ]


def test_the_report_states_the_validation_budget(tiny_idx: Path):
    from pipeline.stages.visualize import _validation_budget

    config = from_dict(budget_params(tiny_idx, val_labels_per_class=3))
    assert "3 labeled validation images per class" in _validation_budget(config)
