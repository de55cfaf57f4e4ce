"""split stage: train/validation/test indices, nested label-fraction subsets, duplicate report.

Output ``data/splits/<dataset>/``: ``train.npy``, ``val.npy``, ``test.npy`` (sorted int64 indices;
train and val index the prepared training arrays, test indexes the set named by ``test_source``
in the report), ``labeled-<budget>.npy`` per label budget (``labeled-0.01``, or with
``split.labels_per_class`` ``labeled-4pc`` ... ``labeled-all``), ``report.json`` and ``report.md``.
With ``split.label_draws`` = n > 1 also ``labeled-<budget>-draw<d>.npy`` for d = 1..n-1 (draw 0 is
the plain file; each draw's subsets are nested), and with ``split.val_labels_per_class``
``val-labeled.npy``: the stratified validation subset that every choice made on validation uses.
With an unlabeled pool also ``pool.npy``: the indices into ``unlabeled_images.npy`` of the pool
images kept after removing exact copies of validation and test images (counted in the report's
``pool``), so that pretraining never sees an image that will be scored.
The report holds the sha256 of every other file and of itself (pipeline.data.split.seal_report),
so the stages that read the split notice a truncated or edited file and name it.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline import paths
from pipeline.config import Config
from pipeline.data import prepared
from pipeline.data.pool import POOL
from pipeline.data.split import (
    REPORT,
    LabelBudgetError,
    PoolDeduplication,
    SplitResult,
    deduplicate_pool,
    disjointness,
    label_rng,
    make_split,
    nested_label_budgets,
    nested_label_fractions,
    seal_report,
)
from pipeline.errors import DataError
from pipeline.io import atomic_dir, save_npy, write_json, write_text

log = logging.getLogger(__name__)

#: params.yaml keys that change this stage's outputs.
PARAMS = ("split",)


def run(config: Config, dataset: str | None = None) -> dict:
    """Split ``dataset`` as params.yaml's ``split`` section says; return the report."""
    from pipeline import tracking

    dataset = dataset or config.data.dataset
    data = prepared.load(paths.prepared_dir(dataset))
    with tracking.stage_run("split", config, dataset, PARAMS) as tracked:
        tracked.set_tags({"dataset_checksum": data.checksum})
        train_labels = np.asarray(data.train_labels)
        result = make_split(
            np.asarray(data.train_images),
            train_labels,
            None if data.test_images is None else np.asarray(data.test_images),
            config.split.val_fraction,
            config.split.test_fraction,
            config.split.label_fractions,
            config.split.seed,
            labels_per_class=config.split.labels_per_class,
            classes=list(data.classes),
        )
        subsets = _labeled_files(config, result, train_labels, list(data.classes))
        val_labeled = _validation_subset(config, result.val, train_labels, list(data.classes))
        test_labels = (
            train_labels if result.test_source == "train" else np.asarray(data.test_labels)
        )
        report = _report(config, dataset, data, result, train_labels, test_labels, subsets)
        if val_labeled is not None:
            report["val_labeled"] = {
                "file": f"{paths.VAL_LABELED}.npy",
                "labels_per_class": config.split.val_labels_per_class,
                "size": int(len(val_labeled)),
                "per_class": _per_class(val_labeled, train_labels, len(data.classes)),
            }
        pool = _deduplicated_pool(data, result)
        if pool is not None:
            report["pool"] = {"file": f"{POOL}.npy", **pool.report()}
        if not report["disjointness"]["disjoint"]:  # a bug, never a data problem
            raise AssertionError(f"split is not disjoint: {report['disjointness']}")
        _check_each_class_labeled(result, train_labels, data.classes)
        out = paths.splits_dir(dataset)
        with atomic_dir(out) as tmp:
            for name in ("train", "val", "test"):
                save_npy(tmp / f"{name}.npy", getattr(result, name))
            for name, subset in subsets.items():
                save_npy(tmp / f"{name}.npy", subset)
            if val_labeled is not None:
                save_npy(tmp / f"{paths.VAL_LABELED}.npy", val_labeled)
            if pool is not None:
                save_npy(tmp / f"{POOL}.npy", pool.kept)
            write_text(tmp / "report.md", _markdown(report))
            report = seal_report(report, tmp)  # checksums of the files above and of itself
            write_json(tmp / REPORT, report)
        tracked.log_metrics(
            {f"n_{name}": float(report["sets"][name]["size"]) for name in ("train", "val", "test")}
        )
        tracked.log_metrics(
            {
                "duplicates_removed": float(
                    result.duplicates["train_images_equal_to_a_test_image"]
                ),
                "duplicate_groups_train": float(result.duplicates["train_groups_with_copies"]),
            }
        )
        if pool is not None:
            tracked.log_metrics(
                {"pool_kept": float(len(pool.kept)), "pool_dropped": float(len(pool.dropped))}
            )
        tracked.log_artifact(out / "report.json")
        tracked.log_artifact(out / "report.md")
    log.info("split %s: %s", dataset, {k: v["size"] for k, v in report["sets"].items()})
    return report


def _labeled_files(
    config: Config, result: SplitResult, labels: np.ndarray, classes: list[str]
) -> dict[str, np.ndarray]:
    """Every labeled subset the split writes, by file name (without .npy): draw 0 from
    ``make_split``, then draws 1..label_draws-1, each nested within itself and inside train."""
    split = config.split
    subsets = {paths.labeled_set(_key(config, b)): s for b, s in result.label_subsets.items()}
    for draw in range(1, split.label_draws):
        rng = label_rng(split.seed, draw)
        if split.labels_per_class is not None:
            drawn = nested_label_budgets(result.train, labels, split.labels_per_class, rng, classes)
        else:
            drawn = nested_label_fractions(result.train, labels, split.label_fractions, rng)
        by_size = [drawn[b] for b in sorted(drawn, key=paths.budget_size)]
        nested = all(np.isin(a, b).all() for a, b in zip(by_size, by_size[1:], strict=False))
        if not nested or not all(np.isin(s, result.train).all() for s in by_size):
            raise AssertionError(f"labeled subsets of draw {draw} are not nested inside train")
        subsets |= {paths.labeled_set(_key(config, b), draw): s for b, s in drawn.items()}
    return subsets


def _key(config: Config, budget: float | int | str) -> str:
    """A subset's budget as named in files: ``0.01`` for a fraction, ``4pc`` or ``all``."""
    if config.split.labels_per_class is not None:
        return paths.budget_key(budget)
    return paths.fraction_name(budget)


def _validation_subset(
    config: Config, val: np.ndarray, labels: np.ndarray, classes: list[str]
) -> np.ndarray | None:
    """``split.val_labels_per_class`` validation images of every class (sorted indices), or None
    when unset. Its own random stream (spawn key 3 of the split seed), so the labeled subsets,
    train, validation and test stay as they are without it.

    Why a subset at all: with 4 training labels per class, choosing epochs and k on thousands of
    labeled validation images is a choice no user with few labels could make (Oliver et al. 2018).
    """
    per_class = config.split.val_labels_per_class
    if per_class is None:
        return None
    rng = np.random.default_rng(np.random.SeedSequence(config.split.seed, spawn_key=(3,)))
    parts = []
    for cls in range(len(classes)):
        members = val[labels[val] == cls]
        if len(members) < per_class:
            raise LabelBudgetError(
                f"split.val_labels_per_class asks for {per_class} validation images per class, "
                f"but class {cls} ({classes[cls]!r}) has only {len(members)} in the validation "
                f"split; lower it to at most {len(members)}, or raise split.val_fraction"
            )
        parts.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(parts)).astype(np.int64)


def _deduplicated_pool(data: prepared.Prepared, result: SplitResult) -> PoolDeduplication | None:
    """The pool without exact copies of validation or test images; None when there is no pool.

    Logs a warning when over half the pool went: that is no pool of new images but most likely
    the validation or test folder given as data.unlabeled_path.
    """
    if data.unlabeled_images is None:
        return None
    train = np.asarray(data.train_images)
    test = train if result.test_source == "train" else np.asarray(data.test_images)
    pool = deduplicate_pool(np.asarray(data.unlabeled_images), train[result.val], test[result.test])
    if pool.mostly_dropped:
        log.warning(
            "the pool looks like the validation/test folder: %d of its %d images are exact copies "
            "of validation or test images (%d of validation, %d of test) and were dropped; "
            "pretraining uses the %d others. Check data.unlabeled_path",
            len(pool.dropped),
            len(pool.kept) + len(pool.dropped),
            pool.equal_to_val,
            pool.equal_to_test,
            len(pool.kept),
        )
    elif len(pool.dropped):
        log.info(
            "pool: dropped %d exact copies of validation or test images, kept %d",
            len(pool.dropped),
            len(pool.kept),
        )
    return pool


def _check_each_class_labeled(result: SplitResult, labels: np.ndarray, classes: list[str]) -> None:
    missing = sorted(set(range(len(classes))) - set(np.unique(labels[result.train]).tolist()))
    if missing:
        names = ", ".join(classes[i] for i in missing)
        raise DataError(
            f"no training images left for class(es) {names} after the split; lower "
            "split.val_fraction / split.test_fraction or add images of those classes"
        )


def _per_class(indices: np.ndarray, labels: np.ndarray, n_classes: int) -> list[int]:
    return np.bincount(labels[indices], minlength=n_classes).tolist()


def _report(config, dataset, data, result, train_labels, test_labels, subsets) -> dict:
    n_classes = len(data.classes)
    sets = {
        name: {
            "source": result.test_source if name == "test" else "train",
            "size": int(len(getattr(result, name))),
            "per_class": _per_class(
                getattr(result, name), test_labels if name == "test" else train_labels, n_classes
            ),
        }
        for name in ("train", "val", "test")
    }
    fractions = {
        name.removeprefix("labeled-"): {
            "file": f"{name}.npy",
            "size": int(len(subset)),
            "per_class": _per_class(subset, train_labels, n_classes),
        }
        for name, subset in subsets.items()
    }
    test_images = data.test_images if result.test_source == "test" else None
    return {
        "dataset": dataset,
        "dataset_checksum": data.checksum,
        "classes": data.classes,
        "seed": config.split.seed,
        "val_fraction": config.split.val_fraction,
        "test_fraction": config.split.test_fraction if result.test_source == "train" else None,
        "test_source": result.test_source,
        "sets": sets,
        "label_fractions": fractions,
        "duplicates": result.duplicates,
        "disjointness": disjointness(
            result,
            np.asarray(data.train_images),
            None if test_images is None else np.asarray(test_images),
        ),
    }


def _markdown(report: dict) -> str:
    classes = report["classes"]
    lines = [
        f"# Split of {report['dataset']}",
        "",
        f"Seed {report['seed']}, validation fraction {report['val_fraction']}, test set: "
        + (
            "the official test set"
            if report["test_source"] == "test"
            else f"held out from the training pool ({report['test_fraction']})"
        ),
        "",
        "| set | size | " + " | ".join(classes) + " |",
        "|---|---:|" + "---:|" * len(classes),
    ]
    for name, entry in report["sets"].items():
        lines.append(
            f"| {name} | {entry['size']} | " + " | ".join(map(str, entry["per_class"])) + " |"
        )
    subsets = [(f"labeled {n}", e) for n, e in report["label_fractions"].items()]
    if "val_labeled" in report:
        subsets.append(("validation subset (choices)", report["val_labeled"]))
    for name, entry in subsets:
        lines.append(
            f"| {name} | {entry['size']} | " + " | ".join(map(str, entry["per_class"])) + " |"
        )
    dup = report["duplicates"]
    proof = report["disjointness"]
    if "pool" in report:
        lines += _pool_markdown(report["pool"])
    lines += [
        "",
        "## Duplicates",
        f"Rule: {dup['rule']}.",
        f"- training groups with exact copies: {dup['train_groups_with_copies']} "
        f"({dup['train_images_in_those_groups']} images; "
        f"{dup['train_groups_with_conflicting_labels']} with conflicting labels)",
        f"- training images equal to a test image, removed: "
        f"{dup['train_images_equal_to_a_test_image']}",
        f"- test groups with exact copies: {dup['test_groups_with_copies']}",
        "",
        "## Disjointness (checked after the split)",
        f"- shared indices: {proof['shared_indices']}",
        f"- shared image contents: {proof['shared_content_groups']}",
        f"- label subsets nested and inside train: {proof['label_subsets_nested_inside_train']}",
        f"- disjoint: {proof['disjoint']}",
        "",
    ]
    return "\n".join(lines)


def _pool_markdown(pool: dict) -> list[str]:
    """The report's section on the unlabeled pool: what was kept for pretraining, what dropped."""
    lines = [
        "",
        "## Unlabeled pool",
        f"Rule: {pool['rule']}.",
        f"- pool images: {pool['pool_size']}; kept for pretraining ({pool['file']}): "
        f"{pool['kept']}",
        f"- dropped: {pool['dropped']} ({pool['equal_to_a_val_image']} equal to a validation "
        f"image, {pool['equal_to_a_test_image']} equal to a test image)",
    ]
    if pool["over_half_dropped"]:
        lines.append("- over half dropped: the pool looks like the validation/test folder")
    return lines
