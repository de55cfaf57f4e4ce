"""Mode ``semi`` (FixMatch, issue 25 item 3) through the fine-tuning stage: which images its
unlabeled stream holds, a tiny cell end to end, resume after ``kill -9``, and the semi cells'
own block of the study (finetune.semi.inits x finetune.semi.fractions: config, DVC's matrix,
Snakemake's rule). The objective itself is tests/test_semi.py's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import paths
from pipeline.config import ConfigError, from_dict
from pipeline.data import prepared
from pipeline.data.pool import pool_images
from pipeline.data.split import content_groups, load_indices
from pipeline.data.split import test_source as where_test_is  # not a test: pytest collects test_*
from pipeline.errors import MissingInputError
from pipeline.models import classifier
from pipeline.models.finetune import unlabeled_positions
from pipeline.stages import augment, download, finetune, pretrain, split
from pipeline.stages.finetune import unlabeled_indices
from tests.conftest import REPO, params_for, run, sync_matrix, tiny_images, write_params
from tests.test_finetune import TestSplitNeverOpened as OpenedFiles
from tests.test_finetune import tiny_params
from tests.test_resume import (
    assert_same_weights,
    finish,
    kill_when,
    prepare,
    resume_params,
    stage,
    weights,
)


def semi_params(tiny_idx: Path, **finetune_overrides: object) -> dict:
    """test_finetune's tiny study with a semi cell from every init at every label fraction."""
    params = tiny_params(tiny_idx, **finetune_overrides)
    finetune = params["finetune"]
    finetune["semi"].update(inits=list(finetune["inits"]), fractions=list(finetune["fractions"]))
    return params


@pytest.fixture
def pretrained_tiny(workdir: Path, tiny_idx: Path) -> Path:
    """The tiny data through split and augment, with the scratch encoder."""
    config = from_dict(semi_params(tiny_idx))
    download.run(config)
    split.run(config)
    augment.run(config)
    pretrain.run(config, method="scratch")
    return tiny_idx


# ------------------------------------------------------------------------- the unlabeled stream


@pytest.mark.parametrize("held_out_test", [False, True], ids=["official-test", "held-out-test"])
def test_the_unlabeled_stream_holds_no_validation_test_or_labeled_image(
    workdir: Path, tiny_idx: Path, held_out_test: bool
):
    if held_out_test:  # no t10k files: the test set is held out of the training images
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            (tiny_idx / name).unlink()
    config = from_dict(semi_params(tiny_idx))
    download.run(config)
    split.run(config)
    assert where_test_is("idx") == ("train" if held_out_test else "test")
    data = prepared.load(paths.prepared_dir("idx"))
    train_images = np.asarray(data.train_images)
    test_images = train_images if held_out_test else np.asarray(data.test_images)
    val, test = load_indices("idx", "val"), load_indices("idx", "test")
    for fraction in ("0.25", "1.0"):
        labeled = load_indices("idx", f"labeled-{fraction}")
        unlabeled = finetune.unlabeled_indices("idx", f"labeled-{fraction}")
        images = finetune.unlabeled_images("idx", f"labeled-{fraction}")
        np.testing.assert_array_equal(images, train_images[unlabeled])
        # By index: the training split minus the labeled subset (at all labels, where nothing
        # is left, the whole split: FixMatch's own setup), nothing of validation or test.
        outside = unlabeled if fraction != "1.0" else np.array([], dtype=np.int64)
        assert not np.intersect1d(outside, labeled).size
        assert not np.intersect1d(unlabeled, val).size
        if held_out_test:
            assert not np.intersect1d(unlabeled, test).size
        expected_train = np.concatenate([outside, labeled])
        np.testing.assert_array_equal(np.sort(expected_train), load_indices("idx", "train"))
        if fraction == "1.0":
            np.testing.assert_array_equal(unlabeled, load_indices("idx", "train"))
        # By content: no unlabeled image equals a validation or a test image.
        pool, val_groups, test_groups = content_groups(images, train_images[val], test_images[test])
        assert not np.isin(pool, val_groups).any() and not np.isin(pool, test_groups).any()
    assert len(finetune.unlabeled_images("idx", "labeled-0.25")) > 100
    assert len(finetune.unlabeled_images("idx", "labeled-1.0")) == len(load_indices("idx", "train"))
    if not held_out_test:  # tiny_idx's test image 0 is a copy of training image 2
        assert 2 not in finetune.unlabeled_indices("idx", "labeled-0.25")


def test_the_pool_joins_the_unlabeled_stream_without_its_copies_of_scored_images(
    workdir: Path, tiny_idx: Path, tmp_path: Path
):
    from PIL import Image

    from pipeline.data.formats import read_idx

    # A pool of every training image (some are validation images after the split), test image
    # 5 and three new images: only copies of validation or test images may not be trained on.
    train = read_idx(tiny_idx / "train-images-idx3-ubyte.gz")
    new, _ = tiny_images(3, 1, 8, seed=99)
    folder = tmp_path / "pool"
    folder.mkdir()
    pool = [*train, read_idx(tiny_idx / "t10k-images-idx3-ubyte.gz")[5], *new]
    for i, image in enumerate(pool):
        Image.fromarray(image, "L").save(folder / f"{i:03d}.png")
    params = semi_params(tiny_idx)
    params["data"]["unlabeled_path"] = str(folder)
    config = from_dict(params)
    assert ("scratch", "semi", 1.0) in config.finetune.cells()
    download.run(config)
    split.run(config)
    data = prepared.load(paths.prepared_dir("idx"))
    val = np.asarray(data.train_images)[load_indices("idx", "val")]
    test = np.asarray(data.test_images)[load_indices("idx", "test")]
    rest = len(finetune.unlabeled_indices("idx", "labeled-0.25"))
    train = len(load_indices("idx", "train"))
    for fraction, before_pool in (("0.25", rest), ("1.0", train)):
        images = finetune.unlabeled_images("idx", f"labeled-{fraction}")
        np.testing.assert_array_equal(images[before_pool:], pool_images(data, "idx"))
        groups, val_groups, test_groups = content_groups(images, val, test)
        assert not np.isin(groups, val_groups).any() and not np.isin(groups, test_groups).any()
        stream, new_groups = content_groups(images, new[..., None])
        assert np.isin(new_groups, stream).all()  # the new images are in
    # The 404 pool images less the copies of validation images, of test image 5 and of training
    # image 2 (which equals test image 0).
    assert len(images) - train == 404 - len(val) - 2


def test_the_unlabeled_batches_are_a_function_of_seed_and_step_covering_each_pass():
    size, count = 10, 4
    stream = torch.cat([unlabeled_positions(size, count, seed=3, step=s) for s in range(5)])
    assert len(stream) == 20
    for start in (0, 10):  # every pass over the unlabeled set draws each image once
        assert sorted(stream[start : start + size].tolist()) == list(range(size))
    assert not torch.equal(stream[:size], stream[size:])  # each pass its own order
    # A resumed run asks for step 3 with nothing else restored, and gets the same images.
    torch.testing.assert_close(unlabeled_positions(size, count, 3, 3), stream[12:16])
    assert not torch.equal(unlabeled_positions(size, count, 4, 0), stream[:4])  # another seed
    wide = unlabeled_positions(3, 7, seed=0, step=1)  # a batch longer than the set
    assert len(wide) == 7 and set(wide.tolist()) == {0, 1, 2}


# ------------------------------------------------------------------------------ a tiny semi cell


@pytest.mark.parametrize("init", ["scratch", "rotation"])
def test_a_semi_cell_trains_from_any_init_logs_its_mask_rate_and_never_opens_test(
    pretrained_tiny: Path, init: str
):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri

    # A low threshold so that pseudo-labels are taken within a few tiny epochs; 8 labeled
    # images a step (finetune.semi.batch_size) where the other modes take finetune.batch_size.
    semi = {"threshold": 0.3, "batch_size": 8}
    config = from_dict(semi_params(pretrained_tiny, seeds=[0], semi=semi))
    assert config.finetune.batch_size != 8
    assert (init, "semi", 0.25) in config.finetune.cells()
    if init != "scratch":  # self-supervision, then FixMatch
        pretrain.run(config, method=init)
    audit = OpenedFiles()
    try:
        summary = finetune.run(config, init=init, mode="semi", fraction="0.25")
    finally:
        audit.active = False
    assert not [
        p for p in audit.opened if p.endswith(("test.npy", "test_images.npy", "test_labels.npy"))
    ]
    cell = f"{init}-semi-0.25"
    saved = json.loads(Path(f"metrics/finetune/{cell}.json").read_text())
    assert saved["mode"] == "semi" and saved["val_acc_mean"] == summary["val_acc_mean"]
    labeled = np.load(paths.splits_dir("idx") / f"{paths.labeled_set(0.25)}.npy")
    assert saved["budget"]["pass_steps"] == len(labeled) // 8  # a pass at the semi batch size
    history = saved["seeds"]["0"]["history"]
    assert len(history) == saved["seeds"]["0"]["epochs_run"] >= 1
    for row in history:
        assert 0.0 <= row["mask_rate"] <= 1.0 and row["unsupervised_loss"] >= 0.0
    assert any(row["mask_rate"] > 0 for row in history)  # some pseudo-labels were taken
    assert Path(f"metrics/finetune/{cell}.csv").read_text().startswith("epoch,train_loss,val_acc")
    model, description = classifier.load(Path(f"models/finetune/{cell}"))
    assert description["mode"] == "semi"
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)

    client = MlflowClient(tracking_uri())
    (run,) = client.search_runs(
        [client.get_experiment_by_name(config.tracking.experiment).experiment_id],
        f"tags.cell = '{cell}'",
    )
    logged = {key for key in run.data.metrics if key.endswith(("mask_rate", "unsupervised_loss"))}
    assert logged == {"seed0-mask_rate", "seed0-unsupervised_loss"}
    rates = client.get_metric_history(run.info.run_id, "seed0-mask_rate")
    assert [r.value for r in rates] == pytest.approx([row["mask_rate"] for row in history])


def test_semi_at_all_labels_learns_from_the_labeled_images_views(pretrained_tiny: Path):
    config = from_dict(semi_params(pretrained_tiny, seeds=[0]))
    # A semi cell may run at every budget (finetune.semi.fractions): at all labels nothing of the
    # split is left unlabeled, so the labeled images' views serve, as in FixMatch's own setup.
    assert ("scratch", "semi", 1.0) in config.finetune.cells()
    train = np.sort(load_indices("idx", "train"))
    assert np.array_equal(unlabeled_indices("idx", "labeled-1.0"), train)
    # Below all labels the stream stays outside the labeled subset.
    smallest = f"labeled-{config.split.label_fractions[0]}"
    assert not set(unlabeled_indices("idx", smallest)) & set(load_indices("idx", smallest))


def test_the_semi_policies_must_exist_when_semi_runs(tiny_idx: Path):
    params = semi_params(tiny_idx)
    params["finetune"]["semi"]["strong_policy"] = "randaugment"
    with pytest.raises(ConfigError, match="finetune.semi.strong_policy = 'randaugment' is not"):
        from_dict(params)
    params["finetune"]["semi"]["inits"] = []  # no semi cell: only semi cells read them
    assert from_dict(params).finetune.semi.strong_policy == "randaugment"


# --------------------------------------------------------------------------------------- resume


def test_a_semi_cell_killed_mid_run_resumes_to_the_same_weights(workdir: Path, tiny_idx: Path):
    params = resume_params(tiny_idx)
    params["split"]["label_fractions"] = [0.25, 1.0]
    # 4 epochs of 2 steps; a low threshold, so that pseudo-labels train from the first epochs.
    semi = {"threshold": 0.3, "inits": ["scratch"], "fractions": [0.25]}  # the one semi cell
    params["finetune"].update(modes=["finetune"], seeds=[0], min_steps=8, semi=semi)
    prepare(workdir, sync_matrix(params))
    command = stage("finetune", "--init", "scratch", "--mode", "semi", "--fraction", "0.25")
    finish(command, workdir)
    outputs = ("models/finetune/scratch-semi-0.25", "metrics/finetune/scratch-semi-0.25.json")
    reference = weights(workdir / outputs[0] / "seed0.pt")
    summary = (workdir / outputs[1]).read_text()
    shutil.rmtree(workdir / outputs[0])

    kill_when(command, workdir, "checkpoints/finetune/scratch-semi-0.25-*/seed0/last.ckpt")
    log = finish(command, workdir)

    assert "resuming seed 0" in log and "(after epoch 0)" not in log
    history = json.loads(summary)["seeds"]["0"]["history"]
    assert len(history) == 4  # every epoch ran: the kill came before the end
    assert any(row["mask_rate"] > 0 for row in history)  # the pseudo-labels' path ran too
    assert_same_weights(reference, weights(workdir / outputs[0] / "seed0.pt"))
    assert (workdir / outputs[1]).read_text() == summary  # mask rates and losses too


# ------------------------------------------------------------------ the semi cells of the study


def test_the_semi_cells_are_the_study_s_last_block_semi_inits_by_semi_fractions():
    params = params_for()  # params.yaml: semi from scratch and from SimCLR at 4 per class
    cells = from_dict(params).finetune.cells()
    assert cells[-2:] == [("scratch", "semi", "4pc"), ("simclr", "semi", "4pc")]
    assert [c for c in cells if c[1] == "semi"] == cells[-2:]
    # Any init pretraining makes, listed in finetune.inits or not; budgets smallest first.
    params["pretrain"]["methods"].append("rotation")
    params["finetune"]["semi"].update(inits=["rotation", "scratch"], fractions=["all", "4pc"])
    config = from_dict(params)
    assert "rotation" not in config.finetune.inits
    assert [c for c in config.finetune.cells() if c[1] == "semi"] == [
        ("rotation", "semi", "4pc"),
        ("rotation", "semi", "all"),
        ("scratch", "semi", "4pc"),
        ("scratch", "semi", "all"),
    ]
    params["finetune"]["semi"]["inits"] = []  # allowed: no semi cell at all
    semi_free = from_dict(params).finetune.cells()
    assert semi_free == [c for c in cells if c[1] != "semi"]


@pytest.mark.parametrize("key", ["modes", "baseline_modes"])
def test_semi_in_a_mode_list_is_one_line_saying_where_semi_cells_are_set(key: str):
    params = params_for()
    params["finetune"][key].append("semi")
    with pytest.raises(ConfigError) as err:
        from_dict(params)
    message = str(err.value)
    assert message.startswith(f"params.yaml: finetune.{key} has 'semi', which is not a mode")
    assert "set by finetune.semi.inits and finetune.semi.fractions" in message
    assert "\n" not in message


def test_a_semi_budget_outside_finetune_fractions_is_one_line_naming_the_allowed():
    params = params_for()
    params["finetune"]["fractions"] = ["25pc", "all"]  # 4pc, semi's default, is left out
    with pytest.raises(ConfigError) as err:
        from_dict(params)
    assert str(err.value) == (
        "params.yaml: finetune.semi.fractions has 4pc, which is not in finetune.fractions; "
        "allowed: 25pc, all"
    )
    params = params_for("fashion_mnist", split={"label_fractions": [0.1, 1.0]})
    params["finetune"]["semi"].update(inits=["scratch"], fractions=[0.5])
    with pytest.raises(ConfigError, match=r"semi.fractions has 0.5, .*; allowed: 0.1, 1$"):
        from_dict(params)


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        ("vae", "finetune.semi.inits has 'vae' but pretrain.methods does not make that encoder; "),
        ("pixels", "finetune.semi.inits has 'pixels', which has no weights to fine-tune; "),
    ],
)
def test_a_semi_init_needs_an_encoder_with_weights_that_pretraining_makes(init, expected):
    params = params_for()
    params["finetune"]["semi"]["inits"] = ["scratch", init]
    with pytest.raises(ConfigError, match=re.escape(expected)):
        from_dict(params)


def test_the_stage_refuses_a_semi_cell_the_study_does_not_list(workdir: Path, tiny_idx: Path):
    params = tiny_params(tiny_idx)
    params["finetune"]["semi"].update(inits=["scratch"], fractions=[0.25])
    config = from_dict(params)
    expected = "cell scratch-semi-1.0 is not a semi cell of the study: finetune.semi.inits is "
    with pytest.raises(MissingInputError, match=re.escape(f"{expected}scratch and")):
        finetune.run(config, init="scratch", mode="semi", fraction="1.0")
    with pytest.raises(MissingInputError, match="cell rotation-semi-0.25 is not a semi cell"):
        finetune.run(config, init="rotation", mode="semi", fraction="0.25")
    assert not Path("models").exists() and not Path("mlruns").exists()  # before any work


def _semi_study(folder: Path) -> dict:
    """params.yaml's study with semi cells from two inits at two budgets, written to ``folder``."""
    params = params_for()
    params["finetune"]["semi"].update(inits=["simclr", "scratch"], fractions=["4pc", "all"])
    write_params(folder, params)
    return params


def test_snakemake_plans_a_finetune_semi_job_for_exactly_each_semi_cell(tmp_path: Path):
    shutil.copy(REPO / "Snakefile", tmp_path / "Snakefile")
    for folder in ("rules", "schemas", "pipeline"):  # the jobs' code is among their inputs
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__py*"))
    config = from_dict(_semi_study(tmp_path))
    plan = run(["snakemake", "-n"], tmp_path).stdout
    jobs: dict[str, set[tuple[str, str, str]]] = {}
    for rule, wildcards in re.findall(
        r"^rule (\w+):\n(?:    .*\n)*?    wildcards: (.*)$", plan, re.M
    ):
        cell = dict(re.findall(r"(\w+)=([\w.]+)", wildcards))
        if "init" in cell:
            jobs.setdefault(rule, set()).add((cell["init"], cell["mode"], cell["fraction"]))
    named = {(i, m, paths.fraction_name(f)) for i, m, f in config.finetune.cells()}
    semi = {c for c in named if c[1] == "semi"}
    assert (
        jobs["finetune_semi"]
        == semi
        == {(init, "semi", budget) for init in ("simclr", "scratch") for budget in ("4pc", "all")}
    )
    assert jobs["finetune"] | jobs["finetune_baseline"] == named - semi
    assert not any(mode == "semi" for _, mode, _ in jobs["finetune"])


def test_dvc_makes_one_finetune_semi_stage_per_semi_cell_and_none_for_empty_lists(tmp_path: Path):
    from dvc.repo import Repo

    run(["dvc", "init", "--no-scm", "-q"], tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = _semi_study(tmp_path)

    def semi_stages() -> set[str]:
        with Repo(str(tmp_path)) as repo:
            return {s.name for s in repo.index.stages if s.name.startswith("finetune_semi")}

    assert semi_stages() == {
        f"finetune_semi@{init}-semi-{budget}"
        for init in ("simclr", "scratch")
        for budget in ("4pc", "all")
    }
    params["finetune"]["semi"]["inits"] = []
    write_params(tmp_path, params)
    assert semi_stages() == set()
