"""The canonical on-disk form of a dataset, written by download and read by every later stage.

``data/prepared/<dataset>/`` holds ``{train,test,unlabeled}_images.npy`` (uint8 N x H x W x C),
``{train,test}_labels.npy`` (int64), ``classes.json`` and ``manifest.json`` (shapes and sha256 of
every array). The manifest's own hash is the dataset checksum that tags tracked runs.

``unlabeled_images.npy`` is the unlabeled pool, present only when the dataset has one (STL-10's
unlabeled split, the images of ``data.unlabeled_path``, or both): :func:`unlabeled_images` reads
it. Which of its images a stage may train on is the split's business (``pipeline.data.pool``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.formats import Arrays
from pipeline.errors import MissingInputError
from pipeline.io import read_json, save_npy, sha256_file, write_json

ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels", "unlabeled_images")


def write(arrays: Arrays, folder: Path, dataset: str) -> dict:
    """Write ``arrays`` into ``folder`` (empty, from io.atomic_dir); return the manifest."""
    entries = {}
    for name in ARRAY_NAMES:
        array = getattr(arrays, name)
        if array is None:
            continue
        path = Path(folder) / f"{name}.npy"
        save_npy(path, array)
        entries[name] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "sha256": sha256_file(path),
        }
    write_json(Path(folder) / "classes.json", list(arrays.classes))
    manifest = {
        "dataset": dataset,
        "num_classes": len(arrays.classes),
        "arrays": entries,
        "notes": list(arrays.notes),
    }
    write_json(Path(folder) / "manifest.json", manifest)
    return manifest


@dataclass
class Prepared:
    """A loaded dataset; arrays are memory-mapped, so loading costs almost nothing."""

    folder: Path
    manifest: dict
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    unlabeled_images: np.ndarray | None = None  # the pool; None when absent or not asked for

    @property
    def has_test(self) -> bool:
        return self.test_images is not None

    @property
    def has_pool(self) -> bool:
        """The dataset has an unlabeled pool (whether or not this load opened it)."""
        return "unlabeled_images" in self.manifest["arrays"]

    @property
    def checksum(self) -> str:
        return dataset_checksum(self.folder)


def dataset_checksum(folder: Path) -> str:
    """sha256 of the manifest, which holds the sha256 of every array."""
    return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()


def load(folder: Path, verify: bool = True, only: tuple[str, ...] | None = None) -> Prepared:
    """Load a prepared dataset, checking it against its manifest.

    ``only`` names the arrays to open (e.g. the training arrays); the others are not even read,
    which is how stages that must not see the test set stay away from it. A missing or altered
    file raises MissingInputError naming the file and the stage that makes it.
    """
    folder = Path(folder)
    hint = f"run the download stage (python -m pipeline download) to make {folder}"
    manifest_path = folder / "manifest.json"
    manifest = _read_document(manifest_path, dict, hint)
    if not isinstance(manifest.get("arrays"), dict):
        raise MissingInputError(f"{manifest_path} lists no arrays (corrupted or edited); {hint}")
    classes = _read_document(folder / "classes.json", list, hint)
    arrays: dict[str, np.ndarray | None] = {}
    for name in ARRAY_NAMES:
        entry = manifest["arrays"].get(name)
        if entry is None or (only is not None and name not in only):
            arrays[name] = None
            continue
        if not isinstance(entry, dict) or not {"sha256", "shape"} <= entry.keys():
            raise MissingInputError(
                f"{manifest_path}: the entry of {name} is malformed (corrupted or edited); {hint}"
            )
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise MissingInputError(f"{path} is missing; {hint}")
        if verify and sha256_file(path) != entry["sha256"]:
            raise MissingInputError(
                f"{path} does not match its checksum in {manifest_path} "
                f"(corrupted or edited); {hint}"
            )
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise MissingInputError(f"{path} is not a readable .npy file ({err}); {hint}") from None
        if list(array.shape) != entry["shape"]:
            raise MissingInputError(
                f"{path} has shape {array.shape}, manifest says {entry['shape']}; {hint}"
            )
        arrays[name] = array
    return Prepared(
        folder=folder,
        manifest=manifest,
        classes=classes,
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        unlabeled_images=arrays["unlabeled_images"],
    )


def unlabeled_images(folder: Path, verify: bool = True) -> np.ndarray | None:
    """The unlabeled pool as prepared (uint8 N x H x W x C, memory-mapped), or None without one.

    Checked against the manifest like every array. These are all of the pool's images: the ones a
    stage may train on are ``pipeline.data.pool.pool_images`` (copies of validation and test
    images removed by the split).
    """
    return load(folder, verify, only=("unlabeled_images",)).unlabeled_images


def _read_document(path: Path, kind: type, hint: str) -> dict | list:
    """A JSON file of the prepared folder; a missing, truncated or edited one names itself."""
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; {hint}")
    try:
        document = read_json(path)
    except (OSError, ValueError) as err:
        raise MissingInputError(f"{path} is not readable JSON ({err}); {hint}") from None
    if not isinstance(document, kind):
        raise MissingInputError(f"{path} does not hold a JSON {kind.__name__}; {hint}")
    return document
