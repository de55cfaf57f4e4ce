"""The download stage: verified originals in data/raw, canonical arrays in data/prepared."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import from_dict
from pipeline.data import datasets, prepared, sources
from pipeline.errors import ChecksumError, DataError, FetchError, MissingInputError
from pipeline.io import read_json
from pipeline.stages import download
from tests.conftest import (
    FASHION_MNIST_DEBIAN,
    needs_fashion_mnist,
    params_for,
    run,
    write_params,
)
from tests.test_formats import _tar


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@needs_fashion_mnist
def test_fashion_mnist_from_debian_becomes_canonical_arrays(workdir: Path):
    manifest = download.run(from_dict(params_for()))
    assert manifest["arrays"]["train_images"]["shape"] == [60000, 28, 28, 1]
    assert manifest["arrays"]["test_images"]["shape"] == [10000, 28, 28, 1]
    data = prepared.load(Path("data/prepared/fashion_mnist"))
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int64
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    raw = Path("data/raw/fashion_mnist")
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        [
            "manifest.json",
            *(
                f"{s}-{k}-idx{d}-ubyte.gz"
                for s in ("train", "t10k")
                for k, d in (("images", 3), ("labels", 1))
            ),
        ]
    )


@needs_fashion_mnist
def test_a_flipped_byte_in_the_source_is_an_error_and_replaces_nothing(
    workdir: Path, tmp_path: Path
):
    mirror = tmp_path / "mirror"
    shutil.copytree(FASHION_MNIST_DEBIAN, mirror)
    params = params_for()
    params["data"]["mirrors"] = {"fashion_mnist": [str(mirror)]}
    download.run(from_dict(params))
    before = snapshot(Path("data"))

    shutil.rmtree("data/raw")  # so the stage has to fetch again
    before = {k: v for k, v in before.items() if not k.startswith("raw/")}
    labels = mirror / "train-labels-idx1-ubyte.gz"
    blob = bytearray(labels.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    labels.write_bytes(bytes(blob))
    with pytest.raises(FetchError, match="train-labels-idx1-ubyte.gz: checksum mismatch"):
        download.run(from_dict(params))
    assert snapshot(Path("data")) == before  # prepared arrays untouched, no temporary leftovers


def test_a_changed_cached_raw_file_is_reported_not_silently_replaced(
    workdir: Path, tiny_idx: Path, monkeypatch: pytest.MonkeyPatch
):
    # The tiny IDX folder stands in for Fashion-MNIST, with its own checksums pinned.
    real = datasets.SPECS["fashion_mnist"]
    tiny = tuple(
        datasets.RemoteFile(f.name, md5=sources.checksums(tiny_idx / f.name).decoded_md5)
        for f in real.files
    )
    monkeypatch.setitem(
        datasets.SPECS, "fashion_mnist", datasets.DatasetSpec(real.name, "idx", tiny, real.classes)
    )
    params = params_for()
    params["data"]["mirrors"] = {"fashion_mnist": [str(tiny_idx)]}
    download.run(from_dict(params))
    cached = Path("data/raw/fashion_mnist/train-images-idx3-ubyte.gz")
    blob = bytearray(cached.read_bytes())
    blob[-10] ^= 0xFF
    cached.write_bytes(bytes(blob))
    before = snapshot(Path("data/prepared"))
    with pytest.raises(ChecksumError, match=f"{cached}: .*delete it"):
        download.run(from_dict(params))
    assert snapshot(Path("data/prepared")) == before


def test_a_published_archive_is_fetched_verified_and_decoded_by_its_registry_entry(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A tiny CIFAR-10 binary release without batches.meta.txt: the registry names the classes.
    rng = np.random.default_rng(0)
    labels = [3, 0, 9, 3]
    records = b"".join(bytes([k]) + rng.integers(0, 256, 3072, np.uint8).tobytes() for k in labels)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    real = datasets.SPECS["cifar10"]
    archive = _tar(
        mirror / real.files[0].name,
        {
            "cifar-10-batches-bin/data_batch_1.bin": records[: 3 * 3073],
            "cifar-10-batches-bin/test_batch.bin": records[3 * 3073 :],
        },
    )
    pinned = datasets.RemoteFile(
        archive.name, archive_md5=hashlib.md5(archive.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(
        datasets.SPECS,
        "cifar10",
        datasets.DatasetSpec("cifar10", real.reader, (pinned,), real.classes),
    )
    params = params_for("cifar10")
    params["data"]["mirrors"] = {"cifar10": [str(mirror)]}
    manifest = download.run(from_dict(params))
    assert manifest["arrays"]["train_images"]["shape"] == [3, 32, 32, 3]
    data = prepared.load(Path("data/prepared/cifar10"))
    assert data.test_labels.tolist() == [3] and data.classes == list(real.classes)
    raw = read_json(Path("data/raw/cifar10/manifest.json"))
    assert raw["files"][archive.name]["verified_by"] == "archive_md5"


def test_a_local_idx_folder_is_copied_and_decoded(workdir: Path, tiny_idx: Path):
    params = params_for("idx")
    params["data"]["local_path"] = str(tiny_idx)
    manifest = download.run(from_dict(params))
    assert manifest["arrays"]["train_images"]["shape"] == [400, 8, 8, 1]
    assert manifest["arrays"]["test_labels"]["shape"] == [100]
    data = prepared.load(Path("data/prepared/idx"))
    assert data.classes == ["dark", "dim", "bright", "brightest"]
    assert (Path("data/raw/idx") / "classes.txt").is_file()


def test_an_interrupted_run_leaves_only_a_temporary_folder_that_the_next_run_removes(
    workdir: Path, tiny_idx: Path
):
    params = params_for("idx")
    params["data"]["local_path"] = str(tiny_idx)
    stale = Path("data/prepared/.idx.tmp-99999")
    stale.mkdir(parents=True)
    (stale / "train_images.npy").write_bytes(b"half")
    download.run(from_dict(params))
    assert sorted(p.name for p in Path("data/prepared").iterdir()) == ["idx"]


def test_an_altered_prepared_array_is_caught_by_its_manifest(workdir: Path, tiny_idx: Path):
    params = params_for("idx")
    params["data"]["local_path"] = str(tiny_idx)
    download.run(from_dict(params))
    array = Path("data/prepared/idx/train_labels.npy")
    blob = bytearray(array.read_bytes())
    blob[-1] ^= 0x01
    array.write_bytes(bytes(blob))
    with pytest.raises(MissingInputError, match="does not match its checksum.*download stage"):
        prepared.load(Path("data/prepared/idx"))


def _folder_with_bad_files(root: Path) -> Path:
    for name, color in (("circle", 255), ("square", 0)):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(((20, 20), (64, 32), (7, 90))):
            Image.new("L", size, color).save(root / name / f"{i}.png")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "circle" / "rgb.jpg")
    jpeg = (root / "circle" / "rgb.jpg").read_bytes()
    (root / "square" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "square" / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_with_bad_files_names_each_of_them(workdir: Path, tmp_path: Path):
    root = _folder_with_bad_files(tmp_path / "images")
    params = params_for("imagefolder")
    params["data"].update(local_path=str(root), image_size=12, channels=3)
    with pytest.raises(DataError) as err:
        download.run(from_dict(params))
    message = str(err.value)
    assert "2 file(s) could not be used" in message
    assert "square/truncated.jpg" in message and "square/notes.txt" in message
    assert "data.on_bad_image: skip" in message
    assert not Path("data/prepared/imagefolder").exists()

    params["data"]["on_bad_image"] = "skip"
    manifest = download.run(from_dict(params))
    assert manifest["arrays"]["train_images"]["shape"] == [7, 12, 12, 3]
    assert "test_images" not in manifest["arrays"]
    assert any("truncated.jpg" in note for note in manifest["notes"])


def test_the_cli_reports_a_failed_download_in_one_line(tmp_path: Path):
    params = params_for()
    params["data"]["mirrors"] = {"fashion_mnist": [str(tmp_path / "nowhere")]}
    write_params(tmp_path, params)
    result = run(["python", "-m", "pipeline", "download"], tmp_path, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not fetch train-images-idx3-ubyte.gz" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "prepared" / "fashion_mnist").exists()
