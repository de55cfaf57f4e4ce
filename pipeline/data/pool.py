"""The unlabeled pool as the training stages see it: the prepared pool minus what is scored.

The download stage prepares every pool image (``data/prepared/<dataset>/unlabeled_images.npy``);
the split stage removes exact copies of validation and test images and writes the kept indices
(``data/splits/<dataset>/pool.npy``, checksummed in the split report). :func:`pool_images` joins
the two, so no stage can pretrain on a pool image that validation or test will score.

A module of its own because it needs both the prepared arrays and the split: in
``pipeline.data.prepared`` it would make the download stage depend on the split's code.
"""

from __future__ import annotations

import numpy as np

from pipeline import paths
from pipeline.data import prepared as prepared_arrays
from pipeline.data.prepared import Prepared
from pipeline.data.split import load_indices, verified_report
from pipeline.errors import MissingInputError

#: The split's file of kept pool indices (int64, into unlabeled_images.npy), without ``.npy``.
POOL = "pool"


def pool_images(prepared: Prepared, dataset: str) -> np.ndarray | None:
    """The pool images a stage may train on (uint8 N x H x W x C), or None without a pool.

    ``prepared`` is the loaded dataset (its ``unlabeled_images`` are opened here when that load
    did not ask for them); ``dataset`` names the split (``data/splits/<dataset>/``) whose kept
    indices select them. A pool the split has not seen (prepared after the split ran) is an error
    that says to re-run the split: its copies of test images were never removed.
    """
    if not prepared.has_pool:
        return None
    report = verified_report(dataset)
    if POOL not in report:
        raise MissingInputError(
            f"{paths.prepared_dir(dataset)} has an unlabeled pool but the split in "
            f"{paths.splits_dir(dataset)} has none (the pool was prepared after the split); "
            f"re-run the split stage (python -m pipeline split --dataset {dataset})"
        )
    images = prepared.unlabeled_images
    if images is None:
        images = prepared_arrays.unlabeled_images(prepared.folder)
    kept = load_indices(dataset, POOL)
    if kept.ndim != 1 or (len(kept) and (kept.min() < 0 or kept.max() >= len(images))):
        raise MissingInputError(
            f"{paths.splits_dir(dataset)}/{POOL}.npy indexes images outside the pool of "
            f"{len(images)} images (the split is from other data); re-run the split stage "
            f"(python -m pipeline split --dataset {dataset})"
        )
    return np.asarray(images[kept])
