"""download stage: fetch a dataset's original files, verify them, and write canonical arrays.

Outputs (both replaced only when everything succeeded, see pipeline.io.atomic_dir):
``data/raw/<dataset>/`` the original files and ``manifest.json`` with their checksums, and
``data/prepared/<dataset>/`` (see pipeline.data.prepared).

With ``data.unlabeled_path`` set, the images of that folder (any depth) become the unlabeled
pool, ``unlabeled_images.npy``, converted to the dataset's own image size and channels as an
image folder's are; STL-10's unlabeled split is its pool without it, and with it the folder's
images follow STL-10's. Their checksums go into the raw manifest (``unlabeled``); the files are
not copied, the checksummed array is their record.

Files already in ``data/raw/<dataset>/`` serve as a local cache: they are verified and reused, and
a cached file that fails verification stops the stage with an error that names it, because a file
that changed on disk is news the user should hear about rather than have silently replaced.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.config import Config
from pipeline.data import datasets, formats, prepared
from pipeline.data.datasets import DatasetSpec, RemoteFile
from pipeline.data.sources import Checksums, checksums, fetch
from pipeline.errors import ChecksumError, DataError
from pipeline.io import atomic_dir, write_json

log = logging.getLogger(__name__)

#: params.yaml keys that change this stage's outputs (data.mirrors does not: checksums pin content).
PARAMS = (
    "data.dataset",
    "data.local_path",
    "data.unlabeled_path",
    "data.image_size",
    "data.channels",
    "data.on_bad_image",
)

#: Decodes a published release's fetched files in ``raw`` (see DECODERS).
Decoder = Callable[[DatasetSpec, Path], formats.Arrays]
#: Copies a local format from data.local_path into ``raw``: its raw manifest and its arrays.
LocalReader = Callable[[Config, Path], tuple[dict, formats.Arrays]]


def run(config: Config, dataset: str | None = None) -> dict:
    """Download (or copy) and decode ``dataset``; return the prepared manifest."""
    from pipeline import tracking

    dataset = dataset or config.data.dataset
    spec = datasets.spec(dataset)
    raw_final = paths.raw_dir(dataset)
    with tracking.stage_run("download", config, dataset, PARAMS) as tracked:
        with atomic_dir(raw_final) as raw_tmp, atomic_dir(paths.prepared_dir(dataset)) as prep_tmp:
            raw_manifest, arrays = _read(spec, config, raw_final, raw_tmp)
            pool = _add_pool(config, arrays)
            if pool is not None:
                raw_manifest["unlabeled"] = pool
            write_json(raw_tmp / "manifest.json", {"dataset": dataset, **raw_manifest})
            manifest = prepared.write(arrays, prep_tmp, dataset)
        checksum = prepared.dataset_checksum(paths.prepared_dir(dataset))
        tracked.set_tags({"dataset_checksum": checksum})
        tracked.log_metrics(
            {
                f"n_{name}": float(entry["shape"][0])
                for name, entry in manifest["arrays"].items()
                if name.endswith("_images")
            }
        )
        tracked.log_artifact(raw_final / "manifest.json", "raw")
        tracked.log_artifact(paths.prepared_dir(dataset) / "manifest.json", "prepared")
    shapes = {k: v["shape"] for k, v in manifest["arrays"].items()}
    log.info("prepared %s: %s", dataset, shapes)
    return manifest


def _read(spec: DatasetSpec, config: Config, cache: Path, raw: Path) -> tuple[dict, formats.Arrays]:
    """The raw manifest and the arrays of ``spec``, by its registry entry: a local format is read
    from data.local_path, a published one fetched (or taken from ``cache``) and decoded."""
    if spec.local:
        return LOCAL_READERS[spec.reader](config, raw)
    raw_manifest = _fetch_all(spec, config.data.mirrors_for(spec.name), cache, raw)
    arrays = DECODERS[spec.reader](spec, raw)
    _check(arrays, spec.name)
    return raw_manifest, arrays


def _fetch_all(spec: DatasetSpec, mirrors: tuple[str, ...], cache: Path, dest: Path) -> dict:
    """Every file of ``spec`` into ``dest``, reusing verified copies from ``cache``."""
    files = {}
    for expected in spec.files:
        cached = cache / expected.name
        if cached.is_file():
            sums = _verify_cached(cached, expected)
            _link_or_copy(cached, dest / expected.name)
        else:
            sums = fetch(expected, mirrors, dest)
        files[expected.name] = _entry(sums, sums.verified_by(expected))
    return {"files": files}


def _verify_cached(path: Path, expected: RemoteFile) -> Checksums:
    try:
        sums = checksums(path)
        sums.verified_by(expected)
    except ChecksumError as err:
        raise ChecksumError(
            f"{path}: {err}. The file was changed or corrupted on disk; delete it (or its folder) "
            "and run the download stage again to fetch a fresh copy"
        ) from None
    return sums


def _entry(sums: Checksums, verified_by: str) -> dict:
    return {
        "md5": sums.md5,
        "decoded_md5": sums.decoded_md5,
        "size": sums.size,
        "verified_by": verified_by,
    }


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _idx_release(spec: DatasetSpec, raw: Path) -> formats.Arrays:
    """The four IDX files in the registry's order: training images, labels, test images, labels."""
    train_images, train_labels, test_images, test_labels = (raw / f.name for f in spec.files)
    images, labels = formats.read_idx_pair(train_images, train_labels)
    test = formats.read_idx_pair(test_images, test_labels)
    return formats.Arrays(images, labels, list(spec.classes), *test)


def _archive(read: Callable[[Path], tuple[dict, list[str]]]) -> Decoder:
    """A decoder for a one-archive release whose reader names its classes (else the registry)."""

    def decode(spec: DatasetSpec, raw: Path) -> formats.Arrays:
        parts, classes = read(raw / spec.files[0].name)
        return formats.Arrays(classes=classes or list(spec.classes), **parts)

    return decode


def _check(arrays: formats.Arrays, where: str) -> None:
    n_classes = len(arrays.classes)
    formats.check_labels(arrays.train_labels, n_classes, f"{where} training labels")
    if arrays.test_labels is not None:
        formats.check_labels(arrays.test_labels, n_classes, f"{where} test labels")
        if arrays.test_images.shape[1:] != arrays.train_images.shape[1:]:
            raise DataError(
                f"{where}: test images are {arrays.test_images.shape[1:]} but training images are "
                f"{arrays.train_images.shape[1:]}"
            )


#: A local IDX folder's file stems (gzipped or not), by the array each one holds.
_IDX_NAMES = dict(
    zip(
        ("train_images", "train_labels", "test_images", "test_labels"),
        datasets.IDX_STEMS,
        strict=True,
    )
)


def _local_idx(config: Config, raw: Path) -> tuple[dict, formats.Arrays]:
    """A folder of MNIST-style IDX files (gzipped or not); the t10k pair is optional."""
    root = Path(config.data.local_path)
    found: dict[str, Path] = {}
    for key, stem in _IDX_NAMES.items():
        for candidate in (root / stem, root / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
    missing = [f"{_IDX_NAMES[k]}[.gz]" for k in ("train_images", "train_labels") if k not in found]
    if missing:
        raise DataError(
            f"{root}: missing {', '.join(missing)}; data.local_path must hold MNIST-style IDX files"
        )
    if ("test_images" in found) != ("test_labels" in found):
        raise DataError(f"{root}: t10k images and labels must come together (found only one)")
    files = {}
    for source in found.values():
        shutil.copyfile(source, raw / source.name)
        files[source.name] = _entry(checksums(raw / source.name), "none (local files)")
    classes_file = root / "classes.txt"
    images, labels = formats.read_idx_pair(
        raw / found["train_images"].name, raw / found["train_labels"].name
    )
    test_images = test_labels = None
    if "test_images" in found:
        test_images, test_labels = formats.read_idx_pair(
            raw / found["test_images"].name, raw / found["test_labels"].name
        )
    if classes_file.is_file():
        shutil.copyfile(classes_file, raw / "classes.txt")
        classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
    else:
        top = int(max(labels.max(), test_labels.max() if test_labels is not None else 0))
        classes = [str(i) for i in range(top + 1)]
    arrays = formats.Arrays(images, labels, classes, test_images, test_labels)
    _check(arrays, str(root))
    return {"files": files}, arrays


def _imagefolder(config: Config, raw: Path) -> tuple[dict, formats.Arrays]:
    """A folder of class folders with images of any size and mode, converted to one shape.

    Every file that cannot be used is named with its reason: all of them in the log, and in the
    error (data.on_bad_image: error) or in the prepared manifest's notes (skip).
    """
    root = Path(config.data.local_path)
    size, channels = config.data.image_size, config.data.channels
    classes, samples, others = formats.list_imagefolder(root)
    rejected = {str(p.relative_to(root)): "not an image file (unknown extension)" for p in others}
    images, labels, files = [], [], {}
    for path, label in samples:
        rel = path.relative_to(root)
        try:
            images.append(formats.load_image(path, size, channels))
        except formats.BadImage as err:
            rejected[str(rel)] = err.reason
            continue
        labels.append(label)
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, raw / rel)
        files[str(rel)] = _entry(checksums(raw / rel), "none (local files)")
    for name, why in sorted(rejected.items()):
        log.warning("%s %s: %s", "cannot use" if _strict(config) else "left out", name, why)
    if rejected and _strict(config):
        raise DataError(
            f"{root}: {_listing(rejected)}. Remove or fix them, or set "
            "data.on_bad_image: skip in params.yaml to leave them out"
        )
    _check_every_class_has_images(root, classes, labels, rejected)
    arrays = formats.Arrays(
        np.stack(images),
        np.asarray(labels, dtype=np.int64),
        classes,
        notes=[f"left out {name}: {why}" for name, why in sorted(rejected.items())],
    )
    return {"files": files, "rejected": rejected}, arrays


#: At most this many rejected files are spelled out in the one-line error (all are in the log).
_LISTED = 50


def _strict(config: Config) -> bool:
    return config.data.on_bad_image == "error"


def _listing(rejected: dict[str, str]) -> str:
    """``N file(s) could not be used: a: why; b: why`` (the first _LISTED of them)."""
    items = sorted(rejected.items())
    listed = "; ".join(f"{name}: {why}" for name, why in items[:_LISTED])
    more = f" (and {len(items) - _LISTED} more, listed in the log)" if len(items) > _LISTED else ""
    return f"{len(items)} file(s) could not be used: {listed}{more}"


def _check_every_class_has_images(
    root: Path, classes: list[str], labels: list[int], rejected: dict[str, str]
) -> None:
    """A class folder left without usable images would make a dataset with a phantom class."""
    present = set(labels)
    empty = [name for index, name in enumerate(classes) if index not in present]
    if empty:
        why = f" ({_listing(rejected)})" if rejected else ""
        raise DataError(
            f"{root}: no usable images in class folder(s) {', '.join(empty)}{why}; add images "
            "there or remove the folder(s)"
        )


def _add_pool(config: Config, arrays: formats.Arrays) -> dict | None:
    """Put data.unlabeled_path's images into ``arrays`` as the pool; return their raw manifest.

    They are converted to the training images' own height, width and channels (for imagefolder
    that is data.image_size and data.channels), so every image pretraining sees has one shape. A
    dataset with an unlabeled split of its own (STL-10) keeps it first, the folder's images after.
    """
    if not config.data.unlabeled_path:
        return None
    height, width, channels = arrays.train_images.shape[1:]
    images, record = _read_pool(config, Path(config.data.unlabeled_path), (height, width), channels)
    own = arrays.unlabeled_images
    arrays.unlabeled_images = images if own is None else np.concatenate([own, images])
    arrays.notes += [
        f"left out of the pool {name}: {why}" for name, why in record["rejected"].items()
    ]
    log.info(
        "unlabeled pool: %d image(s) from %s%s",
        len(images),
        config.data.unlabeled_path,
        f" after {len(own)} of the dataset's own unlabeled split" if own is not None else "",
    )
    return record


#: The pool is read in one pass; a progress line every so many images.
_POOL_PROGRESS = 5000


def _read_pool(
    config: Config, root: Path, size: tuple[int, int], channels: int
) -> tuple[np.ndarray, dict]:
    """Every usable image under ``root`` (any depth, sorted paths), and the files' record.

    A folder with no image file, or with none PIL can read, is an error whatever
    data.on_bad_image says: pretraining on an empty pool is never what was meant.
    """
    where = f"{root} (data.unlabeled_path)"
    if not root.is_dir():
        raise DataError(
            f"{where} is not a folder; set data.unlabeled_path to a folder of unlabeled images, "
            "or to null for none"
        )
    paths_found, others = formats.list_images(root)
    if not paths_found:
        raise DataError(
            f"{where} holds no image files ({', '.join(formats.IMAGE_SUFFIXES)}, at any depth; "
            f"{len(others)} other file(s)); put the unlabeled images there, or set "
            "data.unlabeled_path: null"
        )
    rejected = {str(p.relative_to(root)): "not an image file (unknown extension)" for p in others}
    images, files = [], {}
    for count, path in enumerate(paths_found, 1):
        rel = str(path.relative_to(root))
        try:
            images.append(formats.load_image(path, size, channels))
        except formats.BadImage as err:
            rejected[rel] = err.reason
        else:
            files[rel] = _entry(checksums(path), "none (local files)")
        if count % _POOL_PROGRESS == 0:
            log.info("unlabeled pool: read %d of %d files", count, len(paths_found))
    for name, why in sorted(rejected.items()):
        verb = "cannot use" if _strict(config) else "left out"
        log.warning("%s %s of data.unlabeled_path: %s", verb, name, why)
    if not images:
        raise DataError(
            f"{where}: not one of its {len(paths_found)} image file(s) is readable "
            f"({_listing(rejected)}); replace them with readable images, or set "
            "data.unlabeled_path: null"
        )
    if rejected and _strict(config):
        raise DataError(
            f"{where}: {_listing(rejected)}. Remove or fix them, or set "
            "data.on_bad_image: skip in params.yaml to leave them out"
        )
    return np.stack(images), {"files": files, "rejected": dict(sorted(rejected.items()))}


#: The decoders of published releases, by the registry's ``reader`` (files already fetched).
DECODERS: dict[str, Decoder] = {
    "idx": _idx_release,
    "cifar10_binary": _archive(formats.read_cifar10_binary),
    "stl10_binary": _archive(formats.read_stl10_binary),
}
#: The readers of local formats (data.local_path), by the registry's ``reader``.
LOCAL_READERS: dict[str, LocalReader] = {"idx_folder": _local_idx, "image_folder": _imagefolder}
