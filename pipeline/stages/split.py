"""split stage: train/validation/test indices, nested label-fraction subsets, duplicate report.

Output ``data/splits/<dataset>/``: ``train.npy``, ``val.npy``, ``test.npy`` (sorted int64 indices;
train and val index the prepared training arrays, test indexes the set named by ``test_source``
in the report), ``labeled-<fraction>.npy`` per label fraction, ``report.json`` and ``report.md``.
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
    PoolDeduplication,
    SplitResult,
    deduplicate_pool,
    disjointness,
    make_split,
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
        )
        test_labels = (
            train_labels if result.test_source == "train" else np.asarray(data.test_labels)
        )
        report = _report(config, dataset, data, result, train_labels, test_labels)
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
            for fraction, subset in result.label_subsets.items():
                save_npy(tmp / f"labeled-{paths.fraction_name(fraction)}.npy", subset)
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


def _report(config, dataset, data, result, train_labels, test_labels) -> dict:
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
        paths.fraction_name(f): {
            "file": f"labeled-{paths.fraction_name(f)}.npy",
            "size": int(len(subset)),
            "per_class": _per_class(subset, train_labels, n_classes),
        }
        for f, subset in sorted(result.label_subsets.items())
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
    for name, entry in report["label_fractions"].items():
        lines.append(
            f"| labeled {name} | {entry['size']} | "
            + " | ".join(map(str, entry["per_class"]))
            + " |"
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
