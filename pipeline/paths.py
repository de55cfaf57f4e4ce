"""Where each stage's artifacts live, relative to the repository root (the working directory).

Snakemake rules and dvc.yaml spell the same paths; tests/test_runners.py checks that they agree.
"""

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


def fraction_name(fraction: float | str) -> str:
    """The spelling of a label fraction in file names and wildcards: 0.01, 0.1, 1.0.

    Python's shortest round-trip form of the float, which is also how DVC renders the YAML
    floats of params.yaml in ``${...}``, so both runners name the same files.
    """
    return repr(float(fraction))
