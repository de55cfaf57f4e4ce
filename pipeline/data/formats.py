"""Decoders from the published file formats to canonical arrays.

Canonical form, shared by every dataset: images uint8 N x H x W x C, labels int64 N, class names.
Binary formats only (IDX, CIFAR-10 binary, STL-10 binary): nothing here unpickles downloaded data.
"""

from __future__ import annotations

import gzip
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import DataError

if TYPE_CHECKING:  # PIL is imported by load_image only: the binary formats need none of it
    from PIL import Image

_IDX_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Arrays:
    """A dataset in canonical form; ``test_*`` are None where there is no official test set."""

    train_images: np.ndarray
    train_labels: np.ndarray
    classes: list[str]
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    unlabeled_images: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file (gzipped or not), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes; the file is truncated or corrupt"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def idx_images(array: np.ndarray, path: Path) -> np.ndarray:
    """IDX images as uint8 N x H x W x C (a 3-D file is grayscale)."""
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise DataError(
            f"{path}: expected uint8 images of 3 (N,H,W) or 4 (N,H,W,C) dimensions, "
            f"got {array.dtype} with shape {array.shape}"
        )
    return array[..., None] if array.ndim == 3 else array


def idx_labels(array: np.ndarray, n_images: int, path: Path) -> np.ndarray:
    if array.ndim != 1 or len(array) != n_images:
        raise DataError(
            f"{path}: expected {n_images} labels (one per image), got shape {array.shape}"
        )
    return array.astype(np.int64)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = idx_images(read_idx(images_path), images_path)
    labels = idx_labels(read_idx(labels_path), len(images), labels_path)
    return images, labels


def check_labels(labels: np.ndarray, n_classes: int, where: str) -> None:
    """Labels must index the class list."""
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"{where}: labels range over {labels.min()}..{labels.max()} but there are "
            f"{n_classes} classes; add a classes.txt with one name per line"
        )


def read_cifar10_binary(archive: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """CIFAR-10 binary version: records of 1 label byte + 3 x 32 x 32 channel planes."""
    record = 1 + 3 * 32 * 32
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    classes: list[str] = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if name == "batches.meta.txt":
                classes = [c for c in _extract(tar, member).decode().split() if c]
            elif name.endswith(".bin"):
                raw = np.frombuffer(_extract(tar, member), dtype=np.uint8)
                if raw.size % record:
                    raise DataError(f"{archive}:{member.name}: size is not a multiple of {record}")
                parts["test" if name == "test_batch.bin" else "train"].append(
                    raw.reshape(-1, record)
                )
    if not parts["train"] or not parts["test"]:
        raise DataError(f"{archive}: no data_batch_*.bin / test_batch.bin inside")
    out = {}
    for split, chunks in parts.items():
        rows = np.concatenate(chunks)
        out[f"{split}_labels"] = rows[:, 0].astype(np.int64)
        out[f"{split}_images"] = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return out, classes


def read_stl10_binary(archive: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """STL-10 binary version: 96 x 96 x 3 images stored column-major, labels 1..10."""
    wanted = {"train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"}
    found: dict[str, bytes] = {}
    classes: list[str] = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in wanted:
                found[name] = _extract(tar, member)
            elif name == "class_names.txt":
                classes = [c.strip() for c in _extract(tar, member).decode().splitlines() if c]
    missing = sorted(wanted - {"unlabeled_X.bin"} - set(found))
    if missing:
        raise DataError(f"{archive}: missing {', '.join(missing)} inside the archive")

    def images(blob: bytes) -> np.ndarray:
        # Column-major 3 x 96 x 96 per image: transpose to H x W x C.
        return np.frombuffer(blob, np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1).copy()

    out = {
        "train_images": images(found["train_X.bin"]),
        "train_labels": np.frombuffer(found["train_y.bin"], np.uint8).astype(np.int64) - 1,
        "test_images": images(found["test_X.bin"]),
        "test_labels": np.frombuffer(found["test_y.bin"], np.uint8).astype(np.int64) - 1,
    }
    if "unlabeled_X.bin" in found:
        out["unlabeled_images"] = images(found["unlabeled_X.bin"])
    return out, classes


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise DataError(f"{tar.name}:{member.name}: not a regular file")
    return handle.read()


def list_imagefolder(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
    """Class names (sorted sub-folder names), (file, label) pairs, and files that are not images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; set data.local_path to a folder of class folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders; expected {root}/<class>/<image files>")
    samples: list[tuple[Path, int]] = []
    others: list[Path] = []
    for label, name in enumerate(classes):
        images, rest = list_images(root / name)
        samples += [(path, label) for path in images]
        others += rest
    return classes, samples, others


def list_images(root: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``root`` at any depth, and the other files, both in sorted order.

    Hidden files (``.DS_Store``, editors' ``.swp``) are neither: nobody means them as data. The
    order is the sorted paths, so a folder always becomes the same array.
    """
    images: list[Path] = []
    others: list[Path] = []
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return images, others


class BadImage(DataError):
    """A file of an image folder that cannot be used; ``reason`` says why, without the path."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.reason = f"not a readable image: {detail}"
        super().__init__(f"{path}: {self.reason}")


#: Modes with more than 8 bits per sample: PIL's own conversion clips them at 255 (a 16-bit scan
#: would come out white), so they are scaled from their 16-bit range instead.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: Path, size: int | tuple[int, int], channels: int) -> np.ndarray:
    """Decode any image (size, mode) to ``size x size x channels`` uint8.

    ``size`` may also be (height, width), for an unlabeled pool that must match a dataset's
    non-square images. The EXIF orientation is applied (phones store pictures sideways and say so
    in EXIF); the image is scaled to cover ``size`` and the centre is cropped, so the aspect ratio
    is kept; transparency is composited on black; palette, bilevel and CMYK images are converted
    and 16-bit ones scaled to 8 bits. A file that PIL cannot fully decode (empty, truncated, not
    an image, absurdly large) raises BadImage naming it and why.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    height, width = (size, size) if isinstance(size, int) else size
    if Path(path).stat().st_size == 0:
        raise BadImage(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            image = _to_mode(ImageOps.exif_transpose(image), "L" if channels == 1 else "RGB")
            image = ImageOps.fit(image, (width, height), Image.Resampling.BILINEAR)
    except UnidentifiedImageError:
        raise BadImage(path, "unknown format (not an image, or one PIL cannot read)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(path, f"too many pixels to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        what = "truncated image data" if "truncated" in str(err) else "corrupt or unsupported image"
        raise BadImage(path, f"{what} ({err})") from None
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` (L or RGB), alpha composited on black, wide samples scaled."""
    from PIL import Image

    if image.mode in _WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image.alpha_composite(rgba)
    return image.convert(mode)
