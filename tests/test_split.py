"""The split: disjoint by index and by content, stratified, nested, seeded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import from_dict
from pipeline.data.split import (
    ALL_LABELS,
    LabelBudgetError,
    content_groups,
    deduplicate_pool,
    disjointness,
    label_rng,
    make_split,
)
from pipeline.errors import DataError
from pipeline.io import read_json
from pipeline.stages import download, split
from tests.conftest import needs_fashion_mnist, params_for, tiny_images


def _split(train, labels, test, seed=0, val=0.2, fractions=(0.1, 0.5, 1.0), test_fraction=0.25):
    return make_split(train, labels, test, val, test_fraction, fractions, seed)


@pytest.fixture
def data():
    train, labels = tiny_images(1000, 5, 6, seed=3)
    test, _ = tiny_images(200, 5, 6, seed=4)
    return train, labels.astype(np.int64), test


def test_exact_copies_are_grouped_across_arrays():
    a = np.zeros((3, 2, 2), np.uint8)
    a[1] = 7
    b = np.full((2, 2, 2), 7, np.uint8)
    ga, gb = content_groups(a, b)
    assert ga[0] == ga[2] != ga[1] == gb[0] == gb[1]


def test_validation_is_a_stratified_fraction_of_training(data):
    train, labels, test = data
    result = _split(train, labels, test, val=0.2)
    assert len(result.val) == 200 and len(result.train) == 800
    assert np.bincount(labels[result.val]).tolist() == [40] * 5
    np.testing.assert_array_equal(result.test, np.arange(200))


def test_label_fractions_are_nested_stratified_subsets_of_train(data):
    train, labels, test = data
    result = _split(train, labels, test)
    small, mid, full = (result.label_subsets[f] for f in (0.1, 0.5, 1.0))
    assert np.isin(small, mid).all() and np.isin(mid, full).all()
    np.testing.assert_array_equal(full, result.train)
    assert np.bincount(labels[small]).tolist() == [16] * 5  # 10 % of 160 per class
    assert not np.isin(small, result.val).any()


def test_every_class_keeps_at_least_one_labeled_image(data):
    train, labels, test = data
    result = _split(train, labels, test, fractions=(0.0001,))
    assert np.bincount(labels[result.label_subsets[0.0001]]).tolist() == [1] * 5


def test_copies_of_a_test_image_leave_training_and_copies_stay_on_one_side(data):
    train, labels, test = data
    test = test.copy()
    test[5] = train[10]  # a training image also in the test set
    for i in range(20, 40):  # twenty copies of training image 20, same class
        train[i], labels[i] = train[20], labels[20]
    result = _split(train, labels, test)
    assert 10 not in result.train and 10 not in result.val
    assert result.duplicates["train_images_equal_to_a_test_image"] == 1
    assert result.duplicates["removed_train_indices"] == [10]
    copies = set(range(20, 40))
    assert copies <= set(result.train.tolist()) or copies <= set(result.val.tolist())
    proof = disjointness(result, train, test)
    assert proof["disjoint"] and not any(proof["shared_content_groups"].values())


def test_the_disjointness_check_catches_a_shared_image(data):
    train, labels, test = data
    result = _split(train, labels, test)
    leaked = result.val[0]
    result.train = np.sort(np.append(result.train, leaked))
    proof = disjointness(result, train, test)
    assert not proof["disjoint"]
    assert proof["shared_indices"]["train&val"] == 1


def test_without_an_official_test_set_one_is_held_out_stratified(data):
    train, labels, _ = data
    result = _split(train, labels, None, val=0.2, test_fraction=0.25)
    assert result.test_source == "train"
    assert np.bincount(labels[result.test]).tolist() == [50] * 5
    assert len(np.intersect1d(result.test, np.concatenate([result.train, result.val]))) == 0
    assert disjointness(result, train, None)["disjoint"]


def test_same_seed_same_split_other_seed_other_split(data):
    train, labels, test = data
    a, b, c = (_split(train, labels, test, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.val, b.val)
    np.testing.assert_array_equal(a.label_subsets[0.1], b.label_subsets[0.1])
    assert not np.array_equal(a.val, c.val)
    assert not np.array_equal(a.train, c.train)
    assert not np.array_equal(a.label_subsets[1.0], c.label_subsets[1.0])
    # The official test set depends only on duplicates of training images, never on the seed.
    assert a.test_source == c.test_source == "test"
    np.testing.assert_array_equal(a.test, c.test)


# Per-class label budgets (labels_per_class): the 40/250/4000-label convention of SSL benchmarks.


def _budgets(train, labels, test, budgets=(4, 25, ALL_LABELS), seed=0, draw=0, classes=None):
    options = {"draw": draw, "labels_per_class": budgets, "classes": classes}
    return make_split(train, labels, test, 0.2, 0.25, (), seed, **options)


def test_a_per_class_budget_gives_exactly_k_images_of_every_class(data):
    train, labels, test = data
    result = _budgets(train, labels, test)
    assert np.bincount(labels[result.label_subsets[4]]).tolist() == [4] * 5
    assert np.bincount(labels[result.label_subsets[25]]).tolist() == [25] * 5
    np.testing.assert_array_equal(result.label_subsets[ALL_LABELS], result.train)
    assert not np.isin(result.label_subsets[25], result.val).any()


def test_per_class_budgets_are_nested_and_nest_with_fractions_of_the_same_draw(data):
    train, labels, test = data
    subsets = _budgets(train, labels, test, budgets=(100, 4, 25)).label_subsets
    assert list(subsets) == [4, 25, 100]  # smallest first, whatever order they were given in
    assert np.isin(subsets[4], subsets[25]).all() and np.isin(subsets[25], subsets[100]).all()
    # Both are prefixes of one permutation per class: 4 per class lies inside 10 % (16 per class).
    fractions = _split(train, labels, test, fractions=(0.1,)).label_subsets
    assert np.isin(subsets[4], fractions[0.1]).all()
    result = _budgets(train, labels, test)
    assert disjointness(result, train, test)["label_subsets_nested_inside_train"]


def test_a_budget_a_class_cannot_give_names_the_class_its_count_and_the_fix(data):
    train, labels, test = data
    labels = labels.copy()
    labels[np.flatnonzero(labels == 4)[:150]] = 0  # class 4 keeps 50 images, about 40 in train
    result = _split(train, labels, test, fractions=(1.0,))
    have = int(np.sum(labels[result.train] == 4))
    names = ["t-shirt", "trouser", "pullover", "dress", "boot"]
    assert _budgets(train, labels, test, budgets=(have,)).label_subsets[have].size == 5 * have
    with pytest.raises(LabelBudgetError) as err:
        _budgets(train, labels, test, budgets=(4, have + 1), classes=names)
    message = str(err.value)
    assert f"{have + 1} labeled images per class" in message
    assert f"class 4 ('boot') has only {have}" in message
    assert f"at most {have}" in message and "label_fractions" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True, "most"])
def test_a_budget_must_be_a_positive_count_or_all(data, budget):
    train, labels, test = data
    with pytest.raises(LabelBudgetError, match="whole number of labeled images per class"):
        _budgets(train, labels, test, budgets=(4, budget))


def test_budgets_and_fractions_are_exclusive(data):
    train, labels, test = data
    with pytest.raises(LabelBudgetError, match="keep one"):
        make_split(train, labels, test, 0.2, 0.25, (0.1,), 0, labels_per_class=(4,))


# Draws: each draw its own nested family of labeled subsets; train, validation and test stay put.


def test_draw_0_gives_exactly_the_subsets_the_split_always_gave(data):
    train, labels, test = data
    result = make_split(train, labels, test, 0.2, 0.25, (0.01, 0.1, 1.0), 0, draw=0)
    # Output of make_split before draws existed, on this input (seed 0): must never change,
    # or every recorded split and result would silently change with it.
    assert result.label_subsets[0.01].tolist() == [44, 90, 106, 128, 210, 348, 518, 550, 559, 997]
    digests = {
        f: hashlib.sha256(result.label_subsets[f].astype("<i8").tobytes()).hexdigest()
        for f in (0.1, 1.0)
    }
    assert digests == {
        0.1: "8b596cce23b53a51962af1180c102bb61c67d42f0826afe194add52a6880ae49",
        1.0: "425ca122500fc45c27d69855ca65a78fb83dced302d545de595060fefe69bb32",
    }
    default = _split(train, labels, test, fractions=(0.01, 0.1, 1.0))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(result, name), getattr(default, name))
    # Draw 0 is the third stream of the split seed, as it always was.
    first = np.random.default_rng(np.random.SeedSequence(7).spawn(3)[2]).integers(0, 10**9, 8)
    np.testing.assert_array_equal(label_rng(7, 0).integers(0, 10**9, 8), first)


def test_draws_differ_but_keep_train_val_test_and_stay_budgets(data):
    train, labels, test = data
    draws = [_budgets(train, labels, test, draw=d) for d in (0, 1, 2)]
    for other in draws[1:]:
        for name in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(other, name), getattr(draws[0], name))
        assert np.bincount(labels[other.label_subsets[4]]).tolist() == [4] * 5
        assert np.isin(other.label_subsets[4], other.label_subsets[25]).all()
    subsets = [d.label_subsets[25].tolist() for d in draws]
    assert subsets[0] != subsets[1] != subsets[2] != subsets[0]
    fractions = [make_split(train, labels, test, 0.2, 0.25, (0.1,), 0, draw=d) for d in (0, 1)]
    assert not np.array_equal(fractions[0].label_subsets[0.1], fractions[1].label_subsets[0.1])


def test_a_draw_is_determined_by_seed_and_draw(data):
    train, labels, test = data
    a, b = (_budgets(train, labels, test, seed=1, draw=3) for _ in range(2))
    np.testing.assert_array_equal(a.label_subsets[4], b.label_subsets[4])
    other_seed = _budgets(train, labels, test, seed=2, draw=3)
    assert not np.array_equal(a.label_subsets[ALL_LABELS], other_seed.label_subsets[ALL_LABELS])
    with pytest.raises(LabelBudgetError, match=">= 0"):
        label_rng(0, -1)


# The unlabeled pool: exact copies of validation or test images are dropped and counted.


def _colour_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)


def test_pool_copies_of_validation_and_test_images_are_dropped_and_counted():
    pool, val, test = _colour_images(50, 1), _colour_images(20, 2), _colour_images(30, 3)
    val[0] = test[0]  # one image in both validation and test
    pool[[3, 7, 11]] = val[[5, 6, 7]]  # copies of validation images
    pool[[20, 21]] = test[[9, 9]]  # two copies of one test image
    pool[40] = val[0]  # equal to a validation and a test image: dropped once, counted in both
    dedup = deduplicate_pool(pool, val, test)
    assert dedup.dropped.tolist() == [3, 7, 11, 20, 21, 40]
    np.testing.assert_array_equal(dedup.kept, np.setdiff1d(np.arange(50), dedup.dropped))
    assert (dedup.equal_to_val, dedup.equal_to_test) == (4, 3)
    assert dedup.report()["dropped"] == 6 and dedup.report()["kept"] == 44
    assert not dedup.mostly_dropped


def test_a_pool_that_is_mostly_the_test_set_is_flagged():
    test = _colour_images(30, 3)
    no_val = np.empty((0, 4, 4, 3), np.uint8)
    half = np.concatenate([test[:10], _colour_images(10, 4)])
    assert not deduplicate_pool(half, no_val, test).mostly_dropped  # exactly half: not over
    mostly = np.concatenate([test[:11], _colour_images(10, 4)])
    dedup = deduplicate_pool(mostly, no_val, test)
    assert dedup.mostly_dropped and dedup.report()["over_half_dropped"] is True
    assert (dedup.equal_to_val, dedup.equal_to_test, len(dedup.kept)) == (0, 11, 10)


def test_pool_deduplication_names_a_mismatched_array():
    pool = _colour_images(5, 1)
    with pytest.raises(DataError, match="test images have shape"):
        deduplicate_pool(pool, pool[:0], pool[:, :2])
    with pytest.raises(DataError, match="validation images are float32"):
        deduplicate_pool(pool, pool.astype(np.float32), pool)


def test_the_stage_writes_indices_and_a_report(workdir: Path, tiny_idx: Path):
    params = params_for("idx", split={"label_fractions": [0.1, 1.0], "val_fraction": 0.1})
    params["data"]["local_path"] = str(tiny_idx)
    config = from_dict(params)
    download.run(config)
    report = split.run(config)
    folder = Path("data/splits/idx")
    assert sorted(p.name for p in folder.iterdir()) == [
        "labeled-0.1.npy",
        "labeled-1.0.npy",
        "report.json",
        "report.md",
        "test.npy",
        "train.npy",
        "val.npy",
    ]
    assert read_json(folder / "report.json") == report
    assert "pool" not in report  # no unlabeled pool: no pool.npy (above) and no pool counts
    assert report["disjointness"]["disjoint"] is True
    # tiny_idx plants one training copy of a test image (index 2) and one pair of copies (0, 1).
    assert report["duplicates"]["removed_train_indices"] == [2]
    assert report["duplicates"]["train_groups_with_copies"] == 1
    assert report["sets"]["train"]["size"] + report["sets"]["val"]["size"] == 399
    assert "| labeled 0.1 |" in (folder / "report.md").read_text()


@needs_fashion_mnist
def test_fashion_mnist_split_is_deterministic_byte_for_byte(workdir: Path):
    config = from_dict(params_for())
    download.run(config)
    split.run(config)
    first = {p.name: p.read_bytes() for p in Path("data/splits/fashion_mnist").iterdir()}
    split.run(config)
    second = {p.name: p.read_bytes() for p in Path("data/splits/fashion_mnist").iterdir()}
    assert first == second
    report = read_json(Path("data/splits/fashion_mnist/report.json"))
    assert report["sets"]["val"]["per_class"] == [600] * 10
    # params.yaml's grid: k images of every class, one nested draw per fine-tuning seed
    assert report["label_fractions"]["4pc"]["per_class"] == [4] * 10
    assert report["label_fractions"]["100pc-draw1"]["per_class"] == [100] * 10
    assert report["label_fractions"]["all"]["size"] == report["sets"]["train"]["size"]
