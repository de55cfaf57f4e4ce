"""Train/validation/test discipline, made impossible to break by construction and then checked.

Rules (documented in README and the split report):

1. The official test set is the test set. Datasets without one get a seeded, stratified hold-out
   of ``test_fraction`` of the training pool.
2. Images are grouped by exact content (byte equality of the uint8 pixels). A training image whose
   content also occurs in the test set is removed from training and validation: the test set must
   stay unseen, and dropping a handful of training images costs nothing.
3. Within the training pool, all copies of one image go to the same side (train or validation),
   so no content is shared between the two.
4. Validation is a seeded hold-out of ``val_fraction`` per class (stratified on the label of the
   group's first image).
5. Label-fraction subsets are per-class prefixes of one seeded permutation of the training set,
   hence stratified and nested (the 1 % subset lies inside the 10 % one), with at least one image
   per class.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.errors import MissingInputError
from pipeline.io import sha256_file


def content_groups(*image_sets: np.ndarray) -> list[np.ndarray]:
    """Group ids by exact content, shared across the given image arrays (same id = same bytes)."""
    rows = [np.ascontiguousarray(images).reshape(len(images), -1) for images in image_sets]
    width = rows[0].shape[1]
    if any(r.shape[1] != width for r in rows):
        raise ValueError("image arrays differ in image shape")
    stacked = np.concatenate(rows) if rows else np.empty((0, width), np.uint8)
    keys = stacked.view(np.dtype((np.void, width))).ravel()
    _, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64)
    out, start = [], 0
    for r in rows:
        out.append(inverse[start : start + len(r)])
        start += len(r)
    return out


def group_holdout(
    indices: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held out), stratified by class, whole content groups at once.

    ``labels`` and ``groups`` are indexed by the same positions as ``indices`` refers to. Each
    group is represented by its first index; per class, groups are taken in a seeded random order
    until the held-out images reach ``round(fraction * class size)``.
    """
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    group_of = groups[indices]
    _, first = np.unique(group_of, return_index=True)
    members: dict[int, list[int]] = {}
    for index, group in zip(indices.tolist(), group_of.tolist(), strict=True):
        members.setdefault(group, []).append(index)
    held: list[int] = []
    for cls in np.unique(labels[indices]):
        reps = indices[first][labels[indices[first]] == cls]
        class_size = int(np.sum(labels[indices] == cls))
        target = int(round(fraction * class_size))
        taken = 0
        for rep in rng.permutation(reps):
            if taken >= target:
                break
            group = members[int(groups[rep])]
            held.extend(group)
            taken += len(group)
    held_arr = np.sort(np.asarray(held, dtype=np.int64))
    kept = np.setdiff1d(indices, held_arr, assume_unique=True)
    return kept, held_arr


def nested_label_fractions(
    train: np.ndarray, labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator
) -> dict[float, np.ndarray]:
    """Stratified subsets of ``train`` for each fraction, each inside the next larger one."""
    order = {int(c): rng.permutation(train[labels[train] == c]) for c in np.unique(labels[train])}
    subsets = {}
    for fraction in sorted(fractions):
        parts = [perm[: max(1, int(round(fraction * len(perm))))] for perm in order.values()]
        subsets[fraction] = np.sort(np.concatenate(parts)).astype(np.int64)
    return subsets


@dataclass
class SplitResult:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_source: str  # "test" (official) or "train" (held out from the training pool)
    label_subsets: dict[float, np.ndarray]
    duplicates: dict


def make_split(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    label_fractions: tuple[float, ...],
    seed: int,
) -> SplitResult:
    """Apply the rules in this module's docstring."""
    val_rng, test_rng, fraction_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    train_labels = np.asarray(train_labels)
    if test_images is not None:
        train_groups, test_groups = content_groups(train_images, test_images)
    else:
        (train_groups,) = content_groups(train_images)
        test_groups = np.empty(0, np.int64)
    pool = np.arange(len(train_images), dtype=np.int64)
    if test_images is not None:
        test = np.arange(len(test_images), dtype=np.int64)
        test_source = "test"
        seen_in_test = np.isin(train_groups, test_groups)
        removed = pool[seen_in_test]
        pool = pool[~seen_in_test]
    else:
        pool, test = group_holdout(pool, train_labels, train_groups, test_fraction, test_rng)
        test_source = "train"
        removed = np.empty(0, np.int64)
    train, val = group_holdout(pool, train_labels, train_groups, val_fraction, val_rng)
    subsets = nested_label_fractions(train, train_labels, label_fractions, fraction_rng)
    duplicates = _duplicate_report(train_groups, test_groups, train_labels, removed)
    return SplitResult(train, val, test, test_source, subsets, duplicates)


def _duplicate_report(
    train_groups: np.ndarray, test_groups: np.ndarray, labels: np.ndarray, removed: np.ndarray
) -> dict:
    counts = np.bincount(train_groups)
    repeated = np.flatnonzero(counts > 1)
    group_label_pairs = np.unique(np.stack([train_groups, labels]), axis=1)
    conflicting = int(np.sum(np.bincount(group_label_pairs[0]) > 1))
    test_counts = np.bincount(test_groups) if len(test_groups) else np.zeros(0, np.int64)
    examples = [np.flatnonzero(train_groups == g).tolist() for g in repeated[:5].tolist()]
    return {
        "rule": (
            "exact-content groups; training images equal to a test image are removed; all copies "
            "of an image stay on one side of the train/validation split"
        ),
        "train_groups_with_copies": int(len(repeated)),
        "train_images_in_those_groups": int(counts[repeated].sum()) if len(repeated) else 0,
        "train_groups_with_conflicting_labels": int(conflicting),
        "train_images_equal_to_a_test_image": int(len(removed)),
        "removed_train_indices": removed.tolist(),
        "test_groups_with_copies": int(np.sum(test_counts > 1)),
        "examples_train_indices": examples,
    }


def disjointness(
    result: SplitResult,
    train_images: np.ndarray,
    test_images: np.ndarray | None,
) -> dict:
    """Check, after the fact, that no index and no image content is shared between two sets."""
    test_pool = test_images if result.test_source == "test" else train_images
    sets = {
        "train": train_images[result.train],
        "val": train_images[result.val],
        "test": test_pool[result.test],
    }
    groups = dict(zip(sets, content_groups(*sets.values()), strict=True))
    content = {}
    index = {}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        content[f"{a}&{b}"] = int(len(np.intersect1d(groups[a], groups[b])))
        same_source = b != "test" or result.test_source == "train"
        ids_a = getattr(result, a)
        ids_b = getattr(result, b)
        index[f"{a}&{b}"] = int(len(np.intersect1d(ids_a, ids_b))) if same_source else 0
    fractions = sorted(result.label_subsets)
    nested = all(
        np.isin(result.label_subsets[small], result.label_subsets[big]).all()
        for small, big in zip(fractions, fractions[1:], strict=False)
    ) and all(np.isin(s, result.train).all() for s in result.label_subsets.values())
    return {
        "shared_indices": index,
        "shared_content_groups": content,
        "label_subsets_nested_inside_train": bool(nested),
        "disjoint": not any(index.values()) and not any(content.values()) and bool(nested),
    }


#: The split's report, which also holds the sha256 of every other file of the split.
REPORT = "report.json"
#: Key of the report's own checksum: sha256 of the report written without this key.
_SEAL = "report_sha256"


def seal_report(report: dict, folder: Path) -> dict:
    """``report`` plus the sha256 of every file already in ``folder`` and of the report itself.

    Why: an index file that was edited still loads as valid indices, so only a checksum shows the
    change; and the report (which says where the test indices point) checks itself, so no file of
    the split can change unnoticed. Written last, into the folder from io.atomic_dir.
    """
    plain = json.loads(json.dumps(report))  # the form it will have on disk (lists, str keys)
    plain.pop(_SEAL, None)
    plain["checksums"] = {
        p.name: sha256_file(p)
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name != REPORT
    }
    plain[_SEAL] = _digest(plain)
    return plain


def _digest(report: dict) -> str:
    body = {k: v for k, v in report.items() if k != _SEAL}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode()).hexdigest()


def _rerun(dataset: str) -> str:
    return f"re-run the split stage (python -m pipeline split --dataset {dataset})"


def verified_report(dataset: str) -> dict:
    """The split report of ``dataset``, checked against its own checksum.

    Raises MissingInputError naming the report and the command that remakes it when it is missing,
    truncated, edited or from a version of the split stage that wrote no checksums.
    """
    path = paths.splits_dir(dataset) / REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MissingInputError(
            f"{path} is missing or unreadable ({err}); {_rerun(dataset)}"
        ) from None
    if not isinstance(report, dict) or not isinstance(report.get("checksums"), dict):
        raise MissingInputError(
            f"{path} holds no checksums (corrupted, or written by an older version); "
            f"{_rerun(dataset)}"
        )
    if report.get(_SEAL) != _digest(report):
        raise MissingInputError(
            f"{path} does not match its own checksum (corrupted or edited); {_rerun(dataset)}"
        )
    return report


def load_indices(dataset: str, name: str) -> np.ndarray:
    """Indices of one set (``train``, ``val``, ``test``, ``labeled-0.1``) from the split stage.

    The file must match its checksum in the report: a truncated, altered or foreign file is a
    MissingInputError naming it and the command that remakes it, never silently wrong indices.
    """
    path = paths.splits_dir(dataset) / f"{name}.npy"
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; {_rerun(dataset)}")
    expected = verified_report(dataset)["checksums"].get(path.name)
    try:
        actual = sha256_file(path)
        if expected is None:
            raise MissingInputError(
                f"{path} is not part of the split in {path.parent / REPORT} (the split made "
                f"other sets); {_rerun(dataset)}"
            )
        if actual != expected:
            raise MissingInputError(
                f"{path} does not match its checksum in {path.parent / REPORT} "
                f"(corrupted or edited); {_rerun(dataset)}"
            )
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise MissingInputError(
            f"{path} is missing or unreadable ({err}); {_rerun(dataset)}"
        ) from None


def test_source(dataset: str) -> str:
    """Where a split's test indices point: ``test`` (official arrays) or ``train``."""
    report = verified_report(dataset)
    if report.get("test_source") not in ("test", "train"):
        raise MissingInputError(
            f"{paths.splits_dir(dataset) / REPORT} names no test source; {_rerun(dataset)}"
        )
    return report["test_source"]
