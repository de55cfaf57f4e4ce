"""The unlabeled pool, end to end up to pretraining (issue 25, item 1).

A folder of unlabeled images (data.unlabeled_path), or STL-10's unlabeled split, goes through the
real download, split, augment and pretrain stages: it is converted to the dataset's image shape,
checksummed, cleared of copies of validation and test images, and learned from by the trained
methods and PCA, never by the labeled sets. Bad pools stop with one line and write nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import from_dict
from pipeline.data import datasets, formats, prepared
from pipeline.data.datamodule import PRETRAIN_SET, UNLABELED, SplitData
from pipeline.data.pool import pool_images
from pipeline.errors import DataError, MissingInputError
from pipeline.io import read_json
from pipeline.stages import augment, download, pretrain, split
from tests.conftest import params_for, run, sync_matrix, tiny_images, write_params
from tests.test_formats import _tar

SIZE = 16
#: Pool images as people have them: another size, RGB not grayscale, nested folders, two formats.
POOL_FILES = 12


def _image_folder(root: Path) -> Path:
    """Two class folders of 15 grayscale SIZE x SIZE PNGs each (the labeled data)."""
    images, labels = tiny_images(30, 2, SIZE, seed=3)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("dark", "bright")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{i:02d}.png")
    return root


def _pool_folder(root: Path) -> Path:
    """POOL_FILES RGB images of 24 x 20 pixels, two folders deep, PNG and lossless WebP."""
    rng = np.random.default_rng(7)
    for i in range(POOL_FILES):
        folder = root / f"camera{i % 2}" / "day1"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        suffix = ".png" if i % 3 else ".webp"
        Image.fromarray(pixels, "RGB").save(folder / f"{i:02d}{suffix}", lossless=True)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module: making one takes seconds, and no test reads it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def work(workdir: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (conftest's workdir) that logs to the module's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return workdir


def _params(dataset: str, **data: object) -> dict:
    """Tiny, fast settings: lenet5 of width 8, one epoch of simclr, and PCA."""
    params = params_for(dataset, split={"label_fractions": [1.0]})
    params["data"].update(data)
    params["model"].update(backbone="lenet5", width=8)
    params["pretrain"].update(methods=["pca", "simclr"], epochs=1, batch_size=16, warmup_epochs=0)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    return sync_matrix(params)


def _imagefolder_with_pool(tmp_path: Path, **data: object) -> dict:
    """The tiny image folder with the tiny pool; ``data`` overrides data.* keys."""
    defaults = {
        "local_path": str(_image_folder(tmp_path / "labeled")),
        "unlabeled_path": str(_pool_folder(tmp_path / "unlabeled")),
        "image_size": SIZE,
        "channels": 1,
    }
    return _params("imagefolder", **(defaults | data))


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_an_image_folder_and_a_pool_of_another_size_and_mode_pretrain_together(
    work: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    params = _imagefolder_with_pool(tmp_path)
    config = from_dict(params)
    manifest = download.run(config)

    # Converted to the dataset's shape exactly as the image-folder reader converts, and checksummed.
    entry = manifest["arrays"]["unlabeled_images"]
    assert entry["shape"] == [POOL_FILES, SIZE, SIZE, 1] and entry["dtype"] == "uint8"
    folder = Path("data/prepared/imagefolder")
    assert (
        entry["sha256"]
        == hashlib.sha256((folder / "unlabeled_images.npy").read_bytes()).hexdigest()
    )
    pool = prepared.unlabeled_images(folder)
    sources = sorted(Path(params["data"]["unlabeled_path"]).rglob("*.*"))
    for row, source in zip(pool, sources, strict=True):
        np.testing.assert_array_equal(row, formats.load_image(source, SIZE, 1))
    raw = read_json(Path("data/raw/imagefolder/manifest.json"))
    assert len(raw["unlabeled"]["files"]) == POOL_FILES and raw["unlabeled"]["rejected"] == {}

    report = split.run(config)
    assert report["pool"]["kept"] == POOL_FILES and report["pool"]["dropped"] == 0
    kept = np.load("data/splits/imagefolder/pool.npy")
    assert kept.dtype == np.int64 and kept.tolist() == list(range(POOL_FILES))
    assert "## Unlabeled pool" in Path("data/splits/imagefolder/report.md").read_text()

    augment.run(config)
    with caplog.at_level(logging.INFO, logger="pipeline.stages.pretrain"):
        pretrain.run(config, method="simclr")
        pretrain.run(config, method="pca")
    n_train = report["sets"]["train"]["size"]
    for method in ("simclr", "pca"):
        line = f"{method}: pretraining on {n_train} training images + {POOL_FILES} pool images"
        assert line in caplog.messages, caplog.messages
        saved = read_json(Path(f"metrics/pretrain/{method}.json"))
        assert saved["images_seen"] == n_train + POOL_FILES
        assert saved["pool_images"] == POOL_FILES


def test_pretraining_draws_from_training_and_pool_and_labeled_sets_never_see_the_pool(
    work: Path, tmp_path: Path
):
    config = from_dict(_imagefolder_with_pool(tmp_path))
    download.run(config)
    split.run(config)
    with_pool = SplitData("imagefolder", ("train", "val"), batch_size=4, pool=True)
    with_pool.setup("fit")
    plain = SplitData("imagefolder", ("train", "val", "labeled-1.0"))
    plain.setup("fit")
    n_train = len(plain.images["train"])
    union, labels = with_pool.images[PRETRAIN_SET], with_pool.labels[PRETRAIN_SET]
    assert with_pool.train_set == PRETRAIN_SET and with_pool.pool_size == POOL_FILES
    assert len(union) == n_train + POOL_FILES
    # The labeled sets, the kNN monitor's bank included, are what they are without a pool.
    for name in ("train", "val"):
        assert torch.equal(with_pool.images[name], plain.images[name])
        assert torch.equal(with_pool.labels[name], plain.labels[name])
    assert torch.equal(union[:n_train], plain.images["train"])
    data = prepared.load(Path("data/prepared/imagefolder"))
    kept = torch.from_numpy(pool_images(data, "imagefolder")).permute(0, 3, 1, 2)
    assert torch.equal(union[n_train:], kept)
    assert (labels[n_train:] == UNLABELED).all() and (labels[:n_train] >= 0).all()
    assert PRETRAIN_SET not in plain.images and plain.train_set == "train"
    # An epoch of pretraining is a pass over training images and pool together.
    assert len(with_pool.train_dataloader()) == (n_train + POOL_FILES) // 4


def test_stl10s_unlabeled_split_is_the_pool_and_a_folder_adds_to_it(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    # A synthetic release in STL-10's binary format: 96 x 96 x 3 images stored column-major.
    rng = np.random.default_rng(0)

    def stored(n: int) -> bytes:
        return rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tobytes()

    train_labels = np.repeat(np.arange(1, 11), 6).astype(np.uint8)  # labels 1..10, 6 each
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    real = datasets.SPECS["stl10"]
    archive = _tar(
        mirror / real.files[0].name,
        {
            "stl10_binary/train_X.bin": stored(60),
            "stl10_binary/train_y.bin": train_labels.tobytes(),
            "stl10_binary/test_X.bin": stored(20),
            "stl10_binary/test_y.bin": np.repeat(np.arange(1, 11), 2).astype(np.uint8).tobytes(),
            "stl10_binary/unlabeled_X.bin": stored(30),
        },
    )
    pinned = datasets.RemoteFile(
        archive.name, archive_md5=hashlib.md5(archive.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(
        datasets.SPECS, "stl10", datasets.DatasetSpec("stl10", real.reader, (pinned,), real.classes)
    )
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(3):  # grayscale and smaller: converted to STL-10's 96 x 96 x 3
        Image.new("L", (40, 50), 60 * i).save(extra / f"{i}.png")
    params = _params("stl10", mirrors={"stl10": [str(mirror)]})
    params["pretrain"]["methods"] = ["simclr"]
    config = from_dict(sync_matrix(params))

    download.run(config)
    assert prepared.unlabeled_images(Path("data/prepared/stl10")).shape == (30, 96, 96, 3)
    split.run(config)
    augment.run(config)
    with caplog.at_level(logging.INFO, logger="pipeline.stages.pretrain"):
        pretrain.run(config, method="simclr")
    assert any(m.endswith("training images + 30 pool images") for m in caplog.messages)
    assert read_json(Path("metrics/pretrain/simclr.json"))["pool_images"] == 30

    # data.unlabeled_path on stl10: the union, STL-10's own unlabeled split first.
    params["data"]["unlabeled_path"] = str(extra)
    download.run(from_dict(params))
    pool = prepared.unlabeled_images(Path("data/prepared/stl10"))
    assert pool.shape == (33, 96, 96, 3)
    np.testing.assert_array_equal(pool[31], formats.load_image(extra / "1.png", 96, 3))


def test_a_pool_that_is_the_test_folder_is_dropped_counted_and_warned_about(
    work: Path, tmp_path: Path, tiny_idx: Path, caplog
):
    # The tiny IDX dataset's official test images, written out as PNGs, plus 5 new images.
    from pipeline.data.formats import read_idx

    test = read_idx(tiny_idx / "t10k-images-idx3-ubyte.gz")
    folder = tmp_path / "pool"
    folder.mkdir()
    for i, image in enumerate(test):
        Image.fromarray(image, "L").save(folder / f"test{i:03d}.png")
    new, _ = tiny_images(5, 1, 8, seed=99)
    for i, image in enumerate(new):
        Image.fromarray(image, "L").save(folder / f"new{i}.png")
    params = _params("idx", local_path=str(tiny_idx), unlabeled_path=str(folder))
    config = from_dict(params)
    download.run(config)
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.split"):
        report = split.run(config)
    pool = report["pool"]
    assert pool["pool_size"] == len(test) + 5 and pool["dropped"] == len(test)
    assert pool["equal_to_a_test_image"] == len(test) and pool["over_half_dropped"] is True
    assert pool["kept"] == 5
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("the pool looks like the validation/test folder: 100 of its 105")
    data = prepared.load(Path("data/prepared/idx"))
    kept = pool_images(data, "idx")
    np.testing.assert_array_equal(kept[..., 0], new)  # the 5 new images: "new*" sorts first


def test_without_a_pool_nothing_changes_and_a_pool_the_split_never_saw_is_refused(
    work: Path, tmp_path: Path
):
    params = _imagefolder_with_pool(tmp_path, unlabeled_path=None)
    download.run(from_dict(params))
    report = split.run(from_dict(params))
    assert "pool" not in report and not Path("data/splits/imagefolder/pool.npy").exists()
    data = prepared.load(Path("data/prepared/imagefolder"))
    assert data.unlabeled_images is None and pool_images(data, "imagefolder") is None
    # A pool prepared after the split: its test copies were never removed, so it is refused.
    params["data"]["unlabeled_path"] = str(_pool_folder(tmp_path / "unlabeled"))
    download.run(from_dict(params))
    data = prepared.load(Path("data/prepared/imagefolder"))
    with pytest.raises(MissingInputError, match="has an unlabeled pool but the split.*re-run"):
        pool_images(data, "imagefolder")


def _bad_pool(tmp_path: Path, case: str) -> Path:
    """A pool folder that cannot serve: empty, no image files, or every image unreadable."""
    root = tmp_path / case
    root.mkdir()
    if case == "no_images":
        (root / "notes.txt").write_text("the photos are on the other disk\n")
    elif case == "unreadable":
        (root / "empty.png").write_bytes(b"")
        (root / "text.jpg").write_text("not a JPEG\n")
        buffer = io.BytesIO()
        Image.effect_noise((32, 32), 60).convert("RGB").save(buffer, format="JPEG")
        (root / "sub").mkdir()
        (root / "sub" / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    return root


@pytest.mark.parametrize(
    ("case", "on_bad_image", "message"),
    [
        ("empty", "error", r"holds no image files .*0 other file\(s\)\); put the unlabeled"),
        ("no_images", "skip", r"holds no image files .*1 other file\(s\)"),
        ("unreadable", "skip", r"not one of its 3 image file\(s\) is readable .*sub/truncated"),
        ("unreadable", "error", r"not one of its 3 image file\(s\) is readable .*empty.png"),
        ("missing", "error", r"is not a folder; set data.unlabeled_path"),
    ],
)
def test_a_pool_that_cannot_serve_is_one_error_and_writes_nothing(
    work: Path, tmp_path: Path, case: str, on_bad_image: str, message: str
):
    root = tmp_path / case if case == "missing" else _bad_pool(tmp_path, case)
    params = _imagefolder_with_pool(tmp_path, unlabeled_path=str(root), on_bad_image=on_bad_image)
    with pytest.raises(DataError, match=message) as caught:
        download.run(from_dict(params))
    assert str(caught.value).startswith(f"{root} (data.unlabeled_path)")
    assert "\n" not in str(caught.value)
    assert _files(Path("data")) == []


def test_the_cli_reports_an_empty_pool_in_one_line(tmp_path: Path):
    params = _imagefolder_with_pool(tmp_path, unlabeled_path=str(_bad_pool(tmp_path, "empty")))
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, params)
    result = run([sys.executable, "-m", "pipeline", "download"], project, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds no image files" in errors[0], result.stderr
    assert _files(project / "data") == []


def test_some_bad_pool_files_stop_the_stage_or_are_left_out_as_on_bad_image_says(
    work: Path, tmp_path: Path
):
    root = _pool_folder(tmp_path / "unlabeled")
    (root / "camera0" / "empty.png").write_bytes(b"")
    params = _imagefolder_with_pool(tmp_path, on_bad_image="error")
    params["data"]["unlabeled_path"] = str(root)
    with pytest.raises(DataError, match=r"1 file\(s\) could not be used: camera0/empty.png: not"):
        download.run(from_dict(params))
    assert _files(Path("data")) == []
    params["data"]["on_bad_image"] = "skip"
    manifest = download.run(from_dict(params))
    assert manifest["arrays"]["unlabeled_images"]["shape"][0] == POOL_FILES
    assert manifest["notes"] == [
        "left out of the pool camera0/empty.png: not a readable image: empty file (0 bytes)"
    ]
    raw = json.loads(Path("data/raw/imagefolder/manifest.json").read_text())
    assert list(raw["unlabeled"]["rejected"]) == ["camera0/empty.png"]


def test_the_online_probe_learns_from_labeled_rows_only():
    """Pool images carry UNLABELED: the probe skips them, and a batch of them alone gives no
    loss and no NaN in the probe's weights (cross-entropy over zero rows is NaN)."""
    import torch.nn.functional as F

    from tests.test_pretrain import _module

    module = _module("autoencoder", {"loss": "mse", "noise_std": 0.1})
    module.has_unlabeled = True
    features = torch.randn(4, module.probe.in_features)
    labels = torch.tensor([2, UNLABELED, 0, UNLABELED])
    expected = F.cross_entropy(module.probe(features[[0, 2]]), labels[[0, 2]])
    torch.testing.assert_close(module.probe_loss(features, labels), expected)
    only_pool = module.probe_loss(features, torch.full((4,), UNLABELED))
    only_pool.backward()
    assert only_pool.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in module.probe.parameters())
