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
   per class. Per-class budgets (``labels_per_class``, e.g. 4, 25, 400) are prefixes of the same
   permutations: exactly k images of every class, nested, and an error when a class has fewer.
6. Draw d of the labeled subsets permutes with its own random stream from (seed, d); draw 0 is
   the stream the split has always used, so its subsets never change. Train, validation and
   test do not depend on the draw.
7. An unlabeled pool keeps no exact copy of a validation or test image; the copies are counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.errors import DataError, MissingInputError, PipelineError
from pipeline.io import sha256_file


def content_groups(*image_sets: np.ndarray) -> list[np.ndarray]:
    """Group ids by exact content, shared across the given image arrays (same id = same bytes)."""
    # An explicit width, not -1: numpy cannot infer it for an empty array (an empty pool or split).
    rows = [
        np.ascontiguousarray(images).reshape(len(images), int(np.prod(images.shape[1:])))
        for images in image_sets
    ]
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


#: The per-class budget that keeps every training label (``labels_per_class: [4, 25, "all"]``).
ALL_LABELS = "all"

#: A per-class label budget: a count of images per class, or ALL_LABELS.
Budget = int | str


class LabelBudgetError(PipelineError, ValueError):
    """A per-class label budget the training split cannot give, or that is not a budget."""


def label_rng(seed: int, draw: int = 0) -> np.random.Generator:
    """The random stream that orders the labeled subsets of draw ``draw`` of split seed ``seed``.

    Draw 0 is the third stream of ``SeedSequence(seed).spawn(3)``, the one the label subsets have
    always used, so existing subsets stay byte-identical. Draw d >= 1 is that stream's child d
    (spawn key ``(2, d)``): independent of the validation and test streams and of other draws.
    """
    if isinstance(draw, bool) or not isinstance(draw, int | np.integer) or draw < 0:
        raise LabelBudgetError(f"label draw must be a whole number >= 0, got {draw!r}")
    key = (2,) if draw == 0 else (2, int(draw))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _class_permutations(
    train: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """One seeded permutation of each class's training indices, in class order.

    Every labeled subset is a per-class prefix of these, which is what makes subsets stratified
    and nested; fractions and budgets of one draw share them, so they nest with each other too.
    """
    return {int(c): rng.permutation(train[labels[train] == c]) for c in np.unique(labels[train])}


def nested_label_fractions(
    train: np.ndarray, labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator
) -> dict[float, np.ndarray]:
    """Stratified subsets of ``train`` for each fraction, each inside the next larger one."""
    order = _class_permutations(train, labels, rng)
    subsets = {}
    for fraction in sorted(fractions):
        parts = [perm[: max(1, int(round(fraction * len(perm))))] for perm in order.values()]
        subsets[fraction] = np.sort(np.concatenate(parts)).astype(np.int64)
    return subsets


def nested_label_budgets(
    train: np.ndarray,
    labels: np.ndarray,
    budgets: tuple[Budget, ...],
    rng: np.random.Generator,
    classes: list[str] | None = None,
) -> dict[Budget, np.ndarray]:
    """Subsets of ``train`` with exactly k images of every class for each budget k, nested.

    ``ALL_LABELS`` in ``budgets`` gives the whole training split. Raises LabelBudgetError naming
    the class when a budget is larger than what a class has: silently giving that class fewer
    labels would make the subset unbalanced while its name promises k per class.
    ``classes`` (class names by label) only makes that message readable.
    """
    order = _class_permutations(train, labels, rng)
    counts = [int(size) for size in map(_checked_budget, budgets) if size != float("inf")]
    if counts and order and max(counts) > min(len(p) for p in order.values()):
        _raise_budget_too_large(max(counts), order, classes)
    subsets: dict[Budget, np.ndarray] = {}
    for budget in sorted(set(budgets), key=_checked_budget):
        parts = [perm if budget == ALL_LABELS else perm[:budget] for perm in order.values()]
        subsets[budget] = np.sort(np.concatenate(parts)).astype(np.int64)
    return subsets


def _checked_budget(budget: Budget) -> int | float:
    """``budget`` as a sortable size (ALL_LABELS is infinite); LabelBudgetError if invalid."""
    if budget == ALL_LABELS:
        return float("inf")
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
        raise LabelBudgetError(
            f"labels_per_class holds {budget!r}; each budget must be a whole number of labeled "
            f"images per class >= 1, or {ALL_LABELS!r} for every training label"
        )
    return int(budget)


def _raise_budget_too_large(
    budget: int, order: dict[int, np.ndarray], classes: list[str] | None
) -> None:
    """Stop with the class that cannot give ``budget`` images and what to do about it."""
    cls = min(order, key=lambda c: len(order[c]))
    have = len(order[cls])
    name = f" ({classes[cls]!r})" if classes is not None and cls < len(classes) else ""
    raise LabelBudgetError(
        f"labels_per_class asks for {budget} labeled images per class, but class {cls}{name} "
        f"has only {have} in the training split (after the validation hold-out); lower the "
        f"budget to at most {have}, or use split.label_fractions instead"
    )


@dataclass
class SplitResult:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_source: str  # "test" (official) or "train" (held out from the training pool)
    label_subsets: dict[float, np.ndarray] | dict[Budget, np.ndarray]
    duplicates: dict


def make_split(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    label_fractions: tuple[float, ...],
    seed: int,
    *,
    draw: int = 0,
    labels_per_class: tuple[Budget, ...] | None = None,
    classes: list[str] | None = None,
) -> SplitResult:
    """Apply the rules in this module's docstring.

    ``labels_per_class`` replaces ``label_fractions`` (give one of the two, the other empty);
    ``draw`` picks the labeled subsets (label_rng) and changes nothing else.
    """
    if labels_per_class is not None and label_fractions:
        raise LabelBudgetError(
            "both label_fractions and labels_per_class are set; keep one (labels_per_class for "
            "k labeled images per class, label_fractions for a share of each class)"
        )
    # Streams 0 and 1 of SeedSequence(seed).spawn(3); stream 2 is label_rng(seed, 0).
    val_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    fraction_rng = label_rng(seed, draw)
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
    if labels_per_class is not None:
        subsets = nested_label_budgets(train, train_labels, labels_per_class, fraction_rng, classes)
    else:
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
    # By size, not by key: fraction and budget keys ("all") do not sort together.
    by_size = sorted(result.label_subsets.values(), key=len)
    nested = all(
        np.isin(small, big).all() for small, big in zip(by_size, by_size[1:], strict=False)
    ) and all(np.isin(s, result.train).all() for s in by_size)
    return {
        "shared_indices": index,
        "shared_content_groups": content,
        "label_subsets_nested_inside_train": bool(nested),
        "disjoint": not any(index.values()) and not any(content.values()) and bool(nested),
    }


@dataclass(frozen=True)
class PoolDeduplication:
    """What de-duplicating an unlabeled pool against validation and test kept and dropped."""

    kept: np.ndarray  # sorted int64 pool indices with no exact copy in validation or test
    dropped: np.ndarray  # sorted int64 pool indices that equal a validation or test image
    equal_to_val: int  # pool images equal to some validation image
    equal_to_test: int  # pool images equal to some test image (one image may count in both)

    @property
    def mostly_dropped(self) -> bool:
        """Over half the pool were copies: the pool looks like the test (or validation) folder."""
        return 2 * len(self.dropped) > len(self.kept) + len(self.dropped)

    def report(self) -> dict:
        """JSON-ready summary for the split report."""
        return {
            "rule": "exact-content copies of a validation or test image leave the unlabeled pool",
            "pool_size": int(len(self.kept) + len(self.dropped)),
            "kept": int(len(self.kept)),
            "dropped": int(len(self.dropped)),
            "equal_to_a_val_image": self.equal_to_val,
            "equal_to_a_test_image": self.equal_to_test,
            "over_half_dropped": self.mostly_dropped,
        }


def deduplicate_pool(pool: np.ndarray, val: np.ndarray, test: np.ndarray) -> PoolDeduplication:
    """Drop the pool images whose bytes equal a validation or test image, and count them.

    Why: an unlabeled pool that holds test images lets pretraining see the test set, which
    inflates test scores exactly as a shared labeled image would (§2.2 of docs/science.md).
    All three are uint8 arrays of one image shape (N x H x W x C); exact equality uses the
    content groups of the split itself.
    """
    for name, images in (("pool", pool), ("validation", val), ("test", test)):
        if images.dtype != np.uint8:
            raise DataError(
                f"{name} images are {images.dtype}, expected uint8 pixels; pass the prepared "
                f"arrays, before any normalization"
            )
        if images.shape[1:] != pool.shape[1:]:
            raise DataError(
                f"{name} images have shape {images.shape[1:]} but pool images {pool.shape[1:]}; "
                f"de-duplicate against the same dataset's prepared arrays"
            )
    pool_groups, val_groups, test_groups = content_groups(pool, val, test)
    as_val = np.isin(pool_groups, val_groups)
    as_test = np.isin(pool_groups, test_groups)
    dropped = as_val | as_test
    every = np.arange(len(pool), dtype=np.int64)
    return PoolDeduplication(
        kept=every[~dropped],
        dropped=every[dropped],
        equal_to_val=int(as_val.sum()),
        equal_to_test=int(as_test.sum()),
    )


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
