"""The split: disjoint by index and by content, stratified, nested, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import from_dict
from pipeline.data.split import content_groups, disjointness, make_split
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
    assert report["label_fractions"]["0.01"]["per_class"] == [54] * 10
