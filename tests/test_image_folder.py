"""An image folder as people really have them, through the real download stage (a subprocess):
mixed sizes, aspect ratios, modes and formats, an EXIF-rotated photo, and files that are not
usable images (truncated, empty, text named .jpg, notes.txt). Each good file is converted to the
configured size and channels; each bad one is named, with why, in the error or in the notes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import from_dict
from pipeline.data import formats, prepared
from pipeline.errors import DataError
from pipeline.stages import download
from tests.conftest import params_for, run, run_env, write_params

SIZE = 16

#: Files that must be rejected, with the words their reason must contain.
BAD = {
    "circle/empty.png": "not a readable image: empty file (0 bytes)",
    "square/text.jpg": "not a readable image: unknown format",
    "square/truncated.jpg": "not a readable image: truncated image data",
    "square/notes.txt": "not an image file (unknown extension)",
}


def _upright_half_white(width: int, height: int) -> Image.Image:
    """Top half white, bottom half black: which way is up is visible after conversion."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, width, height // 2))
    return image


def _save_good_images(root: Path) -> dict[str, str]:
    """One file per mode and format; returns {relative path: what it is}."""
    circle, square = root / "circle", root / "square"
    circle.mkdir(parents=True)
    square.mkdir(parents=True)
    Image.new("L", (20, 20), 200).save(circle / "gray.png")
    Image.new("RGB", (64, 32), (255, 0, 0)).save(circle / "wide.jpg", quality=95)
    Image.new("RGBA", (10, 40), (0, 255, 0, 0)).save(circle / "transparent_tall.png")
    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(circle / "palette.gif", transparency=0)
    Image.new("LA", (18, 30), (90, 255)).save(circle / "gray_alpha.png")
    Image.new("CMYK", (25, 25), (0, 255, 255, 0)).save(circle / "cmyk.jpg", quality=95)
    Image.new("1", (30, 30), 1).save(circle / "bilevel.bmp")
    Image.new("RGB", (12, 50), (0, 0, 255)).save(circle / "narrow.webp", lossless=True)
    Image.new("I;16", (33, 33), 30000).save(square / "sixteen_bit.png")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(square / "small.tif")
    # A phone photo stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise").
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = _upright_half_white(20, 40).rotate(90, expand=True)
    sideways.save(square / "rotated.jpg", exif=exif, quality=95)
    return {
        "circle/gray.png": "L",
        "circle/wide.jpg": "RGB 2:1",
        "circle/transparent_tall.png": "RGBA",
        "circle/palette.gif": "P + transparency",
        "circle/gray_alpha.png": "LA",
        "circle/cmyk.jpg": "CMYK",
        "circle/bilevel.bmp": "1",
        "circle/narrow.webp": "WebP",
        "square/sixteen_bit.png": "I;16",
        "square/small.tif": "TIFF",
        "square/rotated.jpg": "EXIF orientation 6",
    }


def _save_bad_files(root: Path) -> None:
    (root / "circle" / "empty.png").write_bytes(b"")
    (root / "square" / "text.jpg").write_text("this is a text file, not a JPEG\n")
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    (root / "square" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "square" / "notes.txt").write_text("labels were checked by hand\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("images") / "images"
    good = _save_good_images(root)
    _save_bad_files(root)
    return root, good


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Subprocess environment with one MLflow store for the module (making one takes seconds)."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return run_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}


def _download(
    project: Path, env: dict[str, str], root: Path, channels: int, on_bad_image: str
) -> subprocess.CompletedProcess:
    """``python -m pipeline download`` of ``root`` as an image folder, logging to a file."""
    params = params_for("imagefolder")
    params["data"].update(
        local_path=str(root), image_size=SIZE, channels=channels, on_bad_image=on_bad_image
    )
    write_params(project, params)
    command = [sys.executable, "-m", "pipeline", "download", "--log", "logs/download.log"]
    return run(command, project, check=False, env=env)


def test_bad_files_stop_the_stage_with_one_line_naming_each(tmp_path: Path, env, folder):
    root, _ = folder
    project = tmp_path / "project"
    project.mkdir()
    result = _download(project, env, root, channels=3, on_bad_image="error")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert f"{len(BAD)} file(s) could not be used" in line
    for name, why in BAD.items():
        assert f"{name}: {why}" in line, name
    assert "data.on_bad_image: skip" in line
    assert [p for p in (project / "data").rglob("*") if p.is_file()] == []  # no output at all


def test_with_skip_good_images_are_converted_and_bad_ones_recorded(tmp_path: Path, env, folder):
    root, good = folder
    project = tmp_path / "project"
    project.mkdir()
    result = _download(project, env, root, channels=3, on_bad_image="skip")
    assert result.returncode == 0, result.stderr

    prepared = project / "data/prepared/imagefolder"
    images = np.load(prepared / "train_images.npy")
    labels = np.load(prepared / "train_labels.npy")
    assert images.shape == (len(good), SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    per_class = [sum(name.startswith(c) for name in good) for c in ("circle/", "square/")]
    assert np.bincount(labels).tolist() == per_class
    assert json.loads((prepared / "classes.json").read_text()) == ["circle", "square"]

    manifest = json.loads((prepared / "manifest.json").read_text())
    raw = json.loads((project / "data/raw/imagefolder/manifest.json").read_text())
    log = (project / "logs/download.log").read_text()
    for name, why in BAD.items():
        assert any(note.startswith(f"left out {name}: {why}") for note in manifest["notes"]), name
        assert raw["rejected"][name].startswith(why)
        assert f"left out {name}: {why}" in log
    assert sorted(raw["files"]) == sorted(good)  # only usable files are kept as originals

    order = sorted(good, key=lambda n: (n.split("/")[0], Path(n).name))  # the stage's order
    row = dict(zip(order, images, strict=True))
    assert row["circle/wide.jpg"][..., 0].mean() > 240  # red stays red
    assert row["circle/transparent_tall.png"].max() == 0  # fully transparent: black
    assert row["square/sixteen_bit.png"].mean() == pytest.approx(30000 / 257, abs=1)
    top, bottom = row["square/rotated.jpg"][:4].mean(), row["square/rotated.jpg"][-4:].mean()
    assert top > 200 and bottom < 50  # EXIF orientation applied: the white half is on top


@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_converts_to_the_configured_shape(folder, channels: int):
    root, good = folder
    for name in good:
        array = formats.load_image(root / name, SIZE, channels)
        assert array.shape == (SIZE, SIZE, channels) and array.dtype == np.uint8, name


def test_a_class_folder_left_without_images_is_named(tmp_path: Path, env):
    copy = tmp_path / "images"
    (copy / "square").mkdir(parents=True)
    (copy / "square" / "notes.txt").write_text("no images here")
    (copy / "circle").mkdir()
    Image.new("L", (9, 9)).save(copy / "circle" / "one.png")
    project = tmp_path / "project"
    project.mkdir()
    result = _download(project, env, copy, channels=1, on_bad_image="skip")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no usable images in class folder(s) square" in result.stderr
    assert "square/notes.txt: not an image file" in result.stderr


def test_the_same_folder_as_an_unlabeled_pool_is_converted_to_the_datasets_shape(
    workdir: Path, tiny_idx: Path, folder
):
    """Every mode and format the reader accepts serves as a pool, converted to the dataset's
    own 8 x 8 grayscale; the bad files are named as an image folder's are."""
    root, good = folder
    params = params_for("idx")
    params["data"].update(local_path=str(tiny_idx), unlabeled_path=str(root), on_bad_image="error")
    with pytest.raises(DataError, match=f"{len(BAD)} file\\(s\\) could not be used") as caught:
        download.run(from_dict(params))
    for name, why in BAD.items():
        assert f"{name}: {why}" in str(caught.value), name
    params["data"]["on_bad_image"] = "skip"
    manifest = download.run(from_dict(params))
    pool = prepared.unlabeled_images(Path("data/prepared/idx"))
    assert pool.shape == (len(good), 8, 8, 1) and pool.dtype == np.uint8
    for row, name in zip(pool, sorted(good), strict=True):  # sorted paths: the pool's order
        np.testing.assert_array_equal(row, formats.load_image(root / name, 8, 1), err_msg=name)
    for name, why in BAD.items():
        assert any(n.startswith(f"left out of the pool {name}: {why}") for n in manifest["notes"])
