# Shared helpers: params validation, the params each stage reads, the code each stage runs.
from pipeline.config import ConfigError, check
import sys

try:
    config.update(check(config, source="params.yaml"))
except ConfigError as err:
    sys.exit(f"error: {err}")


DATASET = config["data"]["dataset"]
# Inits that train (every mode) and feature baselines (frozen modes only): two finetune rules.
TRAINED_INITS = "scratch|simclr|autoencoder|rotation|inpainting|vae|pca"
BASELINE_INITS = "pixels"


wildcard_constraints:
    dataset="fashion_mnist|mnist|cifar10|stl10|idx|imagefolder",
    method="scratch|pixels|simclr|autoencoder|rotation|inpainting|vae|pca",
    mode="linear|finetune|knn",
    fraction="[0-9]+\\.[0-9]+",


# The pipeline/ modules (and schema) each stage imports: a change in any of them re-runs the
# stage. dvc.yaml lists the same files; tests/test_runners.py checks both against real imports.
_COMMON_CODE = [
    "pipeline/__init__.py",
    "pipeline/__main__.py",
    "pipeline/cli.py",
    "pipeline/config.py",
    "pipeline/errors.py",
    "pipeline/io.py",
    "pipeline/paths.py",
    "pipeline/stages/__init__.py",
    "pipeline/tracking.py",
    "schemas/params.schema.yaml",
]
_DATA_CODE = [
    "pipeline/data/__init__.py",
    "pipeline/data/formats.py",
    "pipeline/data/prepared.py",
]
# What every training stage imports: data on the device, augmentation, the networks.
_TRAIN_CODE = _DATA_CODE + [
    "pipeline/augment.py",
    "pipeline/data/datamodule.py",
    "pipeline/data/split.py",
    "pipeline/models/__init__.py",
    "pipeline/models/backbones.py",
    "pipeline/models/knn.py",
    "pipeline/models/losses.py",
    "pipeline/models/optim.py",
    "pipeline/models/pretrain.py",
]
CODE = {
    "download": _COMMON_CODE
    + _DATA_CODE
    + ["pipeline/data/sources.py", "pipeline/stages/download.py"],
    "split": _COMMON_CODE
    + _DATA_CODE
    + ["pipeline/data/split.py", "pipeline/stages/split.py"],
    "augment": _COMMON_CODE
    + _DATA_CODE
    + ["pipeline/augment.py", "pipeline/data/split.py", "pipeline/stages/augment.py"],
    "pretrain": _COMMON_CODE + _TRAIN_CODE + ["pipeline/stages/pretrain.py"],
    "finetune": _COMMON_CODE
    + _TRAIN_CODE
    + [
        "pipeline/models/classifier.py",
        "pipeline/models/encoders.py",
        "pipeline/models/finetune.py",
        "pipeline/stages/finetune.py",
        "pipeline/stages/pretrain.py",
    ],
    "evaluate": _COMMON_CODE
    + _TRAIN_CODE
    + [
        "pipeline/evaluation.py",
        "pipeline/models/classifier.py",
        "pipeline/models/encoders.py",
        "pipeline/stages/evaluate.py",
        "pipeline/stages/finetune.py",
        "pipeline/stages/pretrain.py",
    ],
    "visualize": _COMMON_CODE
    + _TRAIN_CODE
    + [
        "pipeline/models/classifier.py",
        "pipeline/models/encoders.py",
        "pipeline/stages/evaluate.py",
        "pipeline/stages/finetune.py",
        "pipeline/stages/pretrain.py",
        "pipeline/stages/visualize.py",
        "pipeline/viz/__init__.py",
        "pipeline/viz/cam.py",
        "pipeline/viz/deconv.py",
        "pipeline/viz/embedding.py",
        "pipeline/viz/features.py",
        "pipeline/viz/figures.py",
        "pipeline/viz/plots.py",
        "pipeline/viz/report.py",
        "pipeline/viz/toy.py",
    ],
}


def stage_params(stage, method=None):
    """The values of the params.yaml keys a stage declares (its PARAMS): a change re-runs it."""
    import importlib

    stage_module = importlib.import_module(f"pipeline.stages.{stage}")
    keys = stage_module.params_for(method) if method else stage_module.PARAMS
    values = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        values[key] = value
    return values


def all_targets():
    """What `snakemake` builds by default: every stage's outputs for the configured dataset."""
    return [
        f"data/splits/{DATASET}",
        f"data/augment/{DATASET}/policy.json",
        f"data/augment/{DATASET}/preview.png",
        *expand("models/pretrain/{method}", method=config["pretrain"]["methods"]),
        "metrics/summary.json",
        "reports/index.html",
    ]


def finetune_cells():
    """models/finetune/<init>-<mode>-<fraction> for every cell of the study's matrix."""
    from pipeline.config import from_dict
    from pipeline.paths import fraction_name

    cells = from_dict(config).finetune.cells()
    return [f"{init}-{mode}-{fraction_name(f)}" for init, mode, f in cells]
