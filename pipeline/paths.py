"""Where each stage's artifacts live, relative to the repository root (the working directory).

The stage declarations in pipeline/dag.py spell the same paths for both runners; the stages and
the report import them from here, so no stage imports another stage for a file name.
"""

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")


def raw_dir(dataset: str) -> Path:
    """Original files as fetched, with manifest.json (checksums of the decoded content)."""
    return DATA / "raw" / dataset


def prepared_dir(dataset: str) -> Path:
    """Canonical arrays: uint8 images N x H x W x C, int64 labels, class names."""
    return DATA / "prepared" / dataset


def splits_dir(dataset: str) -> Path:
    """Train/validation/test indices, nested label-fraction subsets and the split report."""
    return DATA / "splits" / dataset


def labeled_set(fraction: float | str, draw: int = 0) -> str:
    """The split's file (without ``.npy``) of one labeled subset: ``labeled-0.01`` for draw 0,
    ``labeled-4pc-draw2`` for another draw of the labeled images (split.label_draws)."""
    base = f"labeled-{fraction_name(fraction)}"
    return base if draw == 0 else f"{base}-draw{draw}"


#: The split's stratified validation subset (split.val_labels_per_class), without ``.npy``.
VAL_LABELED = "val-labeled"


def augment_dir(dataset: str) -> Path:
    """Resolved augmentation policies, the preview grid and the optional offline pool."""
    return DATA / "augment" / dataset


def pretrain_dir(method: str) -> Path:
    """A pretrained encoder: encoder.pt (state_dict), encoder.json (how to rebuild it)."""
    return Path("models") / "pretrain" / method


def metric_key(fraction: float | str) -> str:
    """A label budget as a key of a metrics file: ``0_01``, ``4pc``. Flattened metric names join
    keys with dots (DVC's ``test_accuracy.scratch-linear.0_01.mean``), so a key must hold none."""
    return fraction_name(fraction).replace(".", "_")


#: The budget key of every training label when budgets are per class (split.labels_per_class).
ALL_LABELS = "all"
#: A per-class budget's key ends with this: ``4pc`` is 4 labeled images per class.
PER_CLASS = "pc"


def is_per_class(budget: float | str) -> bool:
    """Whether ``budget`` is a per-class budget key (``4pc``, ``all``), not a label fraction."""
    if not isinstance(budget, str):
        return False
    count = budget.removesuffix(PER_CLASS)
    return budget == ALL_LABELS or (count != budget and count.isdigit() and int(count) > 0)


def budget_key(labels_per_class: int | str) -> str:
    """The key of one ``split.labels_per_class`` budget: 4 -> ``4pc``, ``all`` -> ``all``."""
    if labels_per_class == ALL_LABELS:
        return ALL_LABELS
    return f"{int(labels_per_class)}{PER_CLASS}"


def fraction_name(fraction: float | str) -> str:
    """The spelling of a label budget in file names and wildcards: 0.01, 0.1, 1.0, 4pc, all.

    A fraction is Python's shortest round-trip form of the float, which is also how DVC renders
    the YAML floats of params.yaml in ``${...}``, so both runners name the same files; a per-class
    key (``4pc``, ``all``) is a YAML string that DVC renders as written.
    """
    if is_per_class(fraction):
        return str(fraction)
    return repr(float(fraction))


def budget_size(fraction: float | str) -> float:
    """A number that orders budgets of one kind, smallest first (the figure's x position): the
    fraction itself, or the images per class, ``all`` last."""
    name = fraction_name(fraction)
    if name == ALL_LABELS:
        return float("inf")
    return float(name.removesuffix(PER_CLASS))


def budget_label(fraction: float | str) -> str:
    """How a budget reads in tables, titles and the figure: 1 %, 4 per class, all."""
    name = fraction_name(fraction)
    if name == ALL_LABELS:
        return "all"
    if is_per_class(name):
        return f"{name.removesuffix(PER_CLASS)} per class"
    return f"{float(name) * 100:g} %"


def pretrain_metrics(method: str) -> tuple[Path, Path]:
    """A pretraining run's final metrics (JSON) and per-epoch curves (CSV)."""
    base = Path("metrics") / "pretrain"
    return base / f"{method}.json", base / f"{method}.csv"


def cell_name(init: str, mode: str, fraction: str | float) -> str:
    """One cell of the study's matrix, as named in files and in DVC's matrix: init-mode-fraction."""
    return f"{init}-{mode}-{fraction_name(fraction)}"


def model_dir(init: str, mode: str, fraction: str | float) -> Path:
    """A cell's classifier: one state_dict per seed and classifier.json."""
    return Path("models") / "finetune" / cell_name(init, mode, fraction)


def metrics_path(init: str, mode: str, fraction: str | float) -> Path:
    """A cell's validation metrics, budget and stop reasons (JSON)."""
    return Path("metrics") / "finetune" / f"{cell_name(init, mode, fraction)}.json"


def curve_path(init: str, mode: str, fraction: str | float) -> Path:
    """A cell's per-epoch validation curve (CSV)."""
    return metrics_path(init, mode, fraction).with_suffix(".csv")


@dataclass(frozen=True)
class Cell:
    """One cell of the study's matrix (init, mode, label budget), and the files it writes."""

    init: str
    mode: str
    fraction: float | str  # a label fraction, or a per-class budget key (4pc, all)

    @property
    def name(self) -> str:
        return cell_name(self.init, self.mode, self.fraction)

    @property
    def fraction_name(self) -> str:
        return fraction_name(self.fraction)

    @property
    def model_dir(self) -> Path:
        return model_dir(self.init, self.mode, self.fraction)

    @property
    def metrics_path(self) -> Path:
        return metrics_path(self.init, self.mode, self.fraction)

    @property
    def curve_path(self) -> Path:
        return curve_path(self.init, self.mode, self.fraction)
