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


def augment_dir(dataset: str) -> Path:
    """Resolved augmentation policies, the preview grid and the optional offline pool."""
    return DATA / "augment" / dataset


def pretrain_dir(method: str) -> Path:
    """A pretrained encoder: encoder.pt (state_dict), encoder.json (how to rebuild it)."""
    return Path("models") / "pretrain" / method


def metric_key(fraction: float | str) -> str:
    """A label fraction as a key of a metrics file: ``0_01``. Flattened metric names join keys
    with dots (DVC's ``test_accuracy.scratch-linear.0_01.mean``), so a key must hold none."""
    return fraction_name(fraction).replace(".", "_")


def fraction_name(fraction: float | str) -> str:
    """The spelling of a label fraction in file names and wildcards: 0.01, 0.1, 1.0.

    Python's shortest round-trip form of the float, which is also how DVC renders the YAML
    floats of params.yaml in ``${...}``, so both runners name the same files.
    """
    return repr(float(fraction))


def pretrain_metrics(method: str) -> tuple[Path, Path]:
    """A pretraining run's final metrics (JSON) and per-epoch curves (CSV)."""
    base = Path("metrics") / "pretrain"
    return base / f"{method}.json", base / f"{method}.csv"


def cell_name(init: str, mode: str, fraction: str | float) -> str:
    """One cell of the study's matrix, as named in files and in DVC's matrix: init-mode-fraction."""
    return f"{init}-{mode}-{fraction_name(float(fraction))}"


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
    """One cell of the study's matrix (init, mode, label fraction), and the files it writes."""

    init: str
    mode: str
    fraction: float

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
