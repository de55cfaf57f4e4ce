"""Decoders: each published format becomes uint8 N x H x W x C images and int64 labels."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import formats
from pipeline.errors import DataError
from tests.conftest import write_idx


def test_idx_round_trip_gzipped_or_not(tmp_path: Path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        path = write_idx(tmp_path / f"x{gz}", images, gz=gz)
        decoded = formats.idx_images(formats.read_idx(path), path)
        assert decoded.shape == (2, 3, 4, 1)
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded[..., 0], images)


def test_a_truncated_idx_file_says_so(tmp_path: Path):
    path = write_idx(tmp_path / "x", np.zeros((10, 4, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        formats.read_idx(path)


def test_labels_must_match_the_images(tmp_path: Path):
    images = write_idx(tmp_path / "i", np.zeros((3, 2, 2), np.uint8))
    labels = write_idx(tmp_path / "l", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="expected 3 labels"):
        formats.read_idx_pair(images, labels)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_binary_records_become_hwc_images(tmp_path: Path):
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)  # 3 images, CHW
    labels = np.array([7, 0, 9], np.uint8)
    records = b"".join(bytes([labels[i]]) + planes[i].tobytes() for i in range(3))
    archive = _tar(
        tmp_path / "c.tar.gz",
        {
            "cifar-10-batches-bin/data_batch_1.bin": records[: 2 * 3073],
            "cifar-10-batches-bin/test_batch.bin": records[2 * 3073 :],
            "cifar-10-batches-bin/batches.meta.txt": b"airplane\nautomobile\n\n",
        },
    )
    out, classes = formats.read_cifar10_binary(archive)
    assert out["train_images"].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(out["train_images"][1], planes[1].transpose(1, 2, 0))
    np.testing.assert_array_equal(out["test_labels"], [9])
    assert classes == ["airplane", "automobile"]


def test_stl10_column_major_images_are_transposed(tmp_path: Path):
    image = np.zeros((96, 96, 3), np.uint8)
    image[0, 5, 0] = 200  # row 0, column 5, red
    stored = image.transpose(2, 1, 0).tobytes()  # STL-10 stores C x W x H (column-major)
    archive = _tar(
        tmp_path / "s.tar.gz",
        {
            "stl10_binary/train_X.bin": stored,
            "stl10_binary/train_y.bin": bytes([3]),
            "stl10_binary/test_X.bin": stored,
            "stl10_binary/test_y.bin": bytes([10]),
        },
    )
    out, _ = formats.read_stl10_binary(archive)
    np.testing.assert_array_equal(out["train_images"][0], image)
    assert out["train_labels"].tolist() == [2] and out["test_labels"].tolist() == [9]


def _image_folder(root: Path) -> Path:
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir(parents=True)
    Image.new("RGB", (50, 30), (255, 0, 0)).save(root / "cats" / "wide.jpg")
    Image.new("RGBA", (10, 40), (0, 255, 0, 128)).save(root / "cats" / "alpha.png")
    Image.new("P", (20, 20)).save(root / "dogs" / "palette.png")
    Image.new("I;16", (33, 33), 3000).save(root / "dogs" / "sixteen.png")
    return root


def test_images_of_any_size_and_mode_are_converted(tmp_path: Path):
    root = _image_folder(tmp_path / "images")
    classes, samples, others = formats.list_imagefolder(root)
    assert classes == ["cats", "dogs"] and others == []
    for channels in (1, 3):
        for path, _ in samples:
            array = formats.load_image(path, 16, channels)
            assert array.shape == (16, 16, channels) and array.dtype == np.uint8
    red = formats.load_image(root / "cats" / "wide.jpg", 16, 3)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 30


def test_a_truncated_jpeg_is_named(tmp_path: Path):
    root = _image_folder(tmp_path / "images")
    good = (root / "cats" / "wide.jpg").read_bytes()
    (root / "cats" / "broken.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"broken.jpg: not a readable image"):
        formats.load_image(root / "cats" / "broken.jpg", 16, 1)
