"""augment stage: the resolved policies for training, a preview to look at, an optional pool.

Outputs in ``data/augment/<dataset>/``:

- ``policy.json``: every named policy with defaults filled in, plus the image size, channels and
  the per-channel mean/std of the *training split* (never validation or test) used to normalize.
  Pretraining and fine-tuning read it, so a policy change re-runs them and nothing else.
- ``preview.png``: fixed training images (the first of each class in the training split), each
  followed by augmented views under every policy, side by side.
- ``pool/``: when ``augment.offline_copies > 0``, that many augmented uint8 copies of the training
  split (``images.npy``, ``indices.npy`` into the prepared training arrays); else only its
  ``manifest.json``. Deterministic for a given seed on a given device type.

Augmentation runs batched on the GPU when there is one, else on the CPU (pipeline.augment). The
folder is built beside the old one and swapped in when all three are complete (io.atomic_dir).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import paths
from pipeline.config import Config
from pipeline.data import prepared
from pipeline.data.split import load_indices
from pipeline.io import atomic_dir, save_npy, write_bytes, write_json

if TYPE_CHECKING:  # torch is imported where it is used: the CLI imports this module
    import torch

log = logging.getLogger(__name__)

#: params.yaml keys that change this stage's outputs.
PARAMS = ("augment",)

_POOL_BATCH = 4096
_PREVIEW_ZOOM = 3
_GAP = 2


def run(config: Config, dataset: str | None = None) -> dict:
    """Resolve policies, draw the preview, materialize the pool; return the policy document."""
    from pipeline import tracking

    dataset = dataset or config.data.dataset
    data = prepared.load(paths.prepared_dir(dataset), only=("train_images", "train_labels"))
    train = load_indices(dataset, "train")
    out = paths.augment_dir(dataset)
    with tracking.stage_run("augment", config, dataset, PARAMS) as tracked:
        tracked.set_tags({"dataset_checksum": data.checksum})
        document = policy_document(config, dataset, data, train)
        # One folder swapped in whole: a failure (a full disk in the pool) leaves the previous
        # policy, preview and pool together rather than a new policy beside an old pool.
        with atomic_dir(out) as tmp:
            write_json(tmp / "policy.json", document)
            write_bytes(tmp / "preview.png", preview_png(config, document, data, train))
            seconds = write_pool(config, document, data, train, tmp / "pool")
        if seconds is not None:
            n = config.augment.offline_copies * len(train)
            tracked.log_metrics({"pool_images": float(n), "pool_images_per_s": n / seconds})
        tracked.log_artifact(out / "policy.json")
        tracked.log_artifact(out / "preview.png")
    return document


def policy_document(
    config: Config, dataset: str, data: prepared.Prepared, train: np.ndarray
) -> dict[str, Any]:
    """Resolved policies and the normalization statistics of the training split."""
    images = np.asarray(data.train_images)[train]
    return document_of(images, config.augment.policies, dataset)


def document_of(images: np.ndarray, policies: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """policy.json's content for uint8 training images (N x H x W x C) and the named policies.

    Also what benchmarks/gpu.py builds its data from, where no augment stage has run.
    """
    from pipeline.augment import resolve_policy

    height, width, channels = images.shape[1:]
    pixels = images.reshape(-1, channels).astype(np.float64) / 255.0
    return {
        "dataset": dataset,
        "image_size": [int(height), int(width)],
        "channels": int(channels),
        "mean": [round(float(m), 6) for m in pixels.mean(axis=0)],
        "std": [round(float(s), 6) for s in pixels.std(axis=0)],
        "policies": {
            name: {k: _plain(v) for k, v in resolve_policy(policy).items()}
            for name, policy in policies.items()
        },
    }


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Tuples to lists so the JSON (and its hash) is the same whoever writes it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def to_nchw(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 N x H x W x C (the prepared layout) to a uint8 N x C x H x W tensor on ``device``."""
    import torch

    return (
        torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous()
    )


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def preview_images(labels: np.ndarray, train: np.ndarray, count: int) -> np.ndarray:
    """The first training-split image of each class, cycling through classes up to ``count``."""
    by_class = [train[labels[train] == c] for c in np.unique(labels[train])]
    chosen: list[int] = []
    rank = 0
    while len(chosen) < count and rank < max(len(b) for b in by_class):
        chosen.extend(int(b[rank]) for b in by_class if rank < len(b) and len(chosen) < count)
        rank += 1
    return np.asarray(chosen, dtype=np.int64)


def preview_png(
    config: Config, document: dict[str, Any], data: prepared.Prepared, train: np.ndarray
) -> bytes:
    """One block per policy: a row per fixed image, the original first, then its views."""
    import torch
    from PIL import Image, ImageDraw

    from pipeline.augment import from_policy_document

    device = _device()
    chosen = preview_images(np.asarray(data.train_labels), train, config.augment.preview_images)
    originals = to_nchw(np.asarray(data.train_images)[chosen], device)
    views = config.augment.preview_views
    blocks = []
    for index, name in enumerate(document["policies"]):
        augment = from_policy_document(document, name, normalize=False).to(device)
        generator = _generator(config.augment.seed + index, device)
        repeated = originals.repeat_interleave(views, dim=0)
        with torch.no_grad():
            out = augment(repeated, generator)
        out = (out.clamp(0, 1) * 255).round().to(torch.uint8)
        out = out.view(len(chosen), views, *out.shape[1:])
        rows = torch.cat([originals.unsqueeze(1), out], dim=1)  # N x (1+V) x C x H x W
        blocks.append((name, _tile(rows.cpu().numpy())))
    height = max(b.shape[0] for _, b in blocks)
    header = 14
    width = sum(b.shape[1] for _, b in blocks) + 4 * _GAP * (len(blocks) - 1)
    canvas = Image.new("RGB", (width, height + header), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, block in blocks:
        canvas.paste(Image.fromarray(block), (x, header))
        draw.text((x + 2, 1), f"{name} (first column: original)", fill=(0, 0, 0))
        x += block.shape[1] + 4 * _GAP
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _tile(rows: np.ndarray) -> np.ndarray:
    """N x K x C x H x W uint8 to one RGB image with gaps, each image zoomed for visibility."""
    n, k, c, h, w = rows.shape
    zh, zw = h * _PREVIEW_ZOOM, w * _PREVIEW_ZOOM
    grid = np.full((n * (zh + _GAP), k * (zw + _GAP), 3), 255, np.uint8)
    for i in range(n):
        for j in range(k):
            image = rows[i, j].transpose(1, 2, 0)
            image = np.repeat(image, 3, axis=2) if c == 1 else image
            image = image.repeat(_PREVIEW_ZOOM, 0).repeat(_PREVIEW_ZOOM, 1)
            top, left = i * (zh + _GAP), j * (zw + _GAP)
            grid[top : top + zh, left : left + zw] = image
    return grid


def write_pool(
    config: Config,
    document: dict[str, Any],
    data: prepared.Prepared,
    train: np.ndarray,
    folder: Path,
) -> float | None:
    """Materialize ``offline_copies`` augmented copies of the training split; return seconds."""
    import torch

    from pipeline.augment import from_policy_document

    copies = config.augment.offline_copies
    with atomic_dir(folder) as tmp:
        manifest = {"copies": copies, "policy": config.augment.offline_policy, "files": {}}
        seconds = None
        if copies:
            device = _device()
            augment = from_policy_document(document, config.augment.offline_policy, normalize=False)
            augment = augment.to(device)
            images = np.asarray(data.train_images)
            pool = np.empty((copies * len(train), *images.shape[1:]), np.uint8)
            started = time.perf_counter()
            for copy in range(copies):
                generator = _generator(config.augment.seed * 1000 + copy, device)
                for start in range(0, len(train), _POOL_BATCH):
                    index = train[start : start + _POOL_BATCH]
                    with torch.no_grad():
                        out = augment(to_nchw(images[index], device), generator)
                    out = (out.clamp(0, 1) * 255).round().to(torch.uint8)
                    row = copy * len(train) + start
                    pool[row : row + len(index)] = out.permute(0, 2, 3, 1).cpu().numpy()
            seconds = time.perf_counter() - started
            save_npy(tmp / "images.npy", pool)
            save_npy(tmp / "indices.npy", np.tile(train, copies))
            manifest["files"] = {"images.npy": list(pool.shape), "indices.npy": [len(pool)]}
            log.info("offline pool: %d images in %.1f s on %s", len(pool), seconds, device)
        write_json(tmp / "manifest.json", manifest)
    return seconds
