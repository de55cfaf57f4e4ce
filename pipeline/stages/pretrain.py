"""pretrain stage: learn an encoder without labels, one method per run (``--method``).

Outputs: ``models/pretrain/<method>/encoder.pt`` (a plain state_dict: ``torch.load(...,
weights_only=True)`` reads it) with ``encoder.json`` (how to rebuild the encoder), for the VAE
also ``samples.npy`` and ``reconstructions.npy`` (uint8 N x H x W x C);
``metrics/pretrain/<method>.json`` (final monitors) and ``metrics/pretrain/<method>.csv`` (one
row per epoch).

With an unlabeled pool (``data.unlabeled_path``, STL-10's unlabeled split), every trained method
and PCA learn from the training images followed by the split's kept pool images; the monitors
still compare labeled training images with validation. The metrics JSON then records
``images_seen`` (training + pool images) and ``pool_images``.

Training checkpoints go to ``checkpoints/pretrain/<method>-<key>/`` outside the declared outputs
(the runners delete outputs before a re-run), keyed by everything that shapes the run, so a re-run
after an interruption resumes from the last epoch and a re-run with other settings starts afresh.
They are removed once the run has finished.
"""

from __future__ import annotations

import io
import logging
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import methods, paths, training
from pipeline.config import Config
from pipeline.documents import EncoderDescription, PolicyDocument
from pipeline.errors import MissingInputError
from pipeline.io import atomic_dir, save_npy, write_bytes, write_json, write_text

if TYPE_CHECKING:  # torch and Lightning are imported only to train: the CLI imports this module
    import argparse

    from torch import nn

    from pipeline.augment import BatchAugment
    from pipeline.data.datamodule import SplitData
    from pipeline.models.backbones import Backbone
    from pipeline.models.pretrain import PCAEncoder, PixelsEncoder
    from pipeline.tracking import TrackedRun

log = logging.getLogger(__name__)

#: params.yaml keys every method reads; each method also reads its own ``pretrain.<method>``.
COMMON_PARAMS = (
    "model",
    "trainer",
    "pretrain.seed",
    "pretrain.epochs",
    "pretrain.batch_size",
    "pretrain.max_images",
    "pretrain.policy",
    "pretrain.optimizer",
    "pretrain.warmup_epochs",
    "pretrain.monitor",
)
PARAMS = COMMON_PARAMS  # the CLI's view; params_for(method) is the full list
CURVE_COLUMNS = ("epoch", "train_loss", "val_knn_acc", "val_probe_acc")
_PICTURES = 64  # images in a method's picture grids (the VAE's)


def params_for(method: str) -> tuple[str, ...]:
    return (*COMMON_PARAMS, f"pretrain.{method}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", required=True, choices=methods.NAMES, help="which pretraining method to run"
    )


def run(
    config: Config, dataset: str | None = None, method: str = "simclr", callbacks: tuple = ()
) -> dict:
    """Pretrain one method; ``callbacks`` are extra Lightning callbacks (tests use them)."""
    training.require_devices(config)
    dataset = dataset or config.data.dataset
    if method not in config.pretrain.methods:
        raise MissingInputError(
            f"pretraining method {method!r} is not in pretrain.methods "
            f"({', '.join(config.pretrain.methods)}) in params.yaml"
        )
    document = PolicyDocument.read(dataset)
    with training.stage_run("pretrain", config, dataset, params_for(method)) as tracked:
        tracked.set_tags({"method": method, "dataset_checksum": _checksum(dataset)})
        if method in _REFERENCES:  # the encoders the study compares against: no objective
            result = _REFERENCES[method](config, dataset, document)
        else:
            result = _train(config, dataset, method, document, tracked, callbacks)
        if not training.is_rank_zero():  # a DDP rank: it trained its share; rank zero writes
            return result["metrics"]
        _write_outputs(method, result)
        tracked.log_metrics(
            {
                f"final_{k}": v
                for k, v in result["metrics"].items()
                if isinstance(v, float) and v == v
            }
        )  # NaN: no such monitor
        for path in (*paths.pretrain_metrics(method), paths.pretrain_dir(method) / "encoder.json"):
            tracked.log_artifact(path)
    log.info("pretrained %s: %s", method, result["metrics"])
    return result["metrics"]


def _checksum(dataset: str) -> str:
    from pipeline.data.prepared import dataset_checksum

    return dataset_checksum(paths.prepared_dir(dataset))


def hparams_for(
    config: Config, method: str, document: PolicyDocument, num_classes: int, steps: int
) -> dict:
    pre = config.pretrain
    policy = pre.policy_for(method)
    if policy not in document.policies:
        raise MissingInputError(
            f"policy {policy!r} is not in {paths.augment_dir(config.data.dataset)}/policy.json; "
            "re-run the augment stage after changing augment.policies"
        )
    return {
        "method": method,
        "backbone": backbone_fields(config),
        "in_channels": document.channels,
        "image_size": document.image_size,
        "num_classes": num_classes,
        "policy": document.policies[policy],
        "mean": document.mean,
        "std": document.std,
        "options": {k: v for k, v in pre.options[method].items() if k != "policy"},
        "optimizer": config.raw["pretrain"]["optimizer"],
        "epochs": pre.epochs,
        "warmup_epochs": pre.warmup_epochs,
        "steps_per_epoch": steps,
        "seed": pre.seed,
        "monitor": pre.monitor,
    }


def backbone_fields(config: Config) -> dict[str, Any]:
    """params.yaml's ``model`` section as BackboneConfig fields (``backbone`` is its ``name``)."""
    fields = dict(config.raw["model"])
    fields["name"] = fields.pop("backbone")
    return fields


def _train(
    config: Config,
    dataset: str,
    method: str,
    document: PolicyDocument,
    tracked: TrackedRun,
    callbacks: tuple,
) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipeline.data.datamodule import SplitData
    from pipeline.models.pretrain import PretrainModule

    pre = config.pretrain
    data = SplitData(dataset, ("train", "val"), pre.batch_size, pre.seed, pre.max_images, pool=True)
    data.setup("fit")
    _check_image_shape(data, document, dataset)
    _log_images(method, data)
    steps = len(data.train_dataloader())
    hparams = hparams_for(config, method, document, data.num_classes, steps)
    ckpt_dir = training.checkpoint_dir("pretrain", method, hparams, _checksum(dataset))
    resume = training.resume_from(ckpt_dir, f"the pretrain stage's checkpoint for {method}")
    L.seed_everything(pre.seed, workers=True, verbose=False)
    module = PretrainModule(**hparams)
    trainer = training.make_trainer(
        config,
        tracked,
        pre.epochs,
        steps,
        [
            ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1, every_n_epochs=1),
            *callbacks,
        ],
        default_root_dir=ckpt_dir,
        label=f"pretrain {method}",
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    if len(module.history) != pre.epochs:
        raise RuntimeError(f"{method}: training stopped after {len(module.history)} epochs")
    result = {
        "encoder": module.backbone.state_dict(),
        "description": _description(dataset, method, hparams, module.backbone),
        "history": module.history,
        "metrics": {"method": method, **module.history[-1], **_images_seen(data)},
        "pictures": {},
    }
    images = data.images["val"][:_PICTURES].to(module.device)
    result["pictures"] = {
        name: grid.permute(0, 2, 3, 1).cpu().numpy()
        for name, grid in module.pictures(images, _PICTURES, pre.seed).items()
    }
    if training.is_rank_zero():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


def _log_images(method: str, data: SplitData) -> None:
    """Say what the encoder learns from: the training split, and the pool when there is one."""
    log.info(
        "%s: pretraining on %d training images + %d pool images",
        method,
        len(data.images["train"]),
        data.pool_size,
    )


def _images_seen(data: SplitData) -> dict[str, int]:
    """The metrics JSON's record of the images an encoder learned from; nothing without a pool,
    so a run without one writes what it always wrote."""
    from pipeline.data.datamodule import PRETRAIN_SET

    if PRETRAIN_SET not in data.images:
        return {}
    return {"images_seen": len(data.images[PRETRAIN_SET]), "pool_images": data.pool_size}


def _check_image_shape(data: SplitData, document: PolicyDocument, dataset: str) -> None:
    """The policy was resolved for one image shape; other images are an error, never resized."""
    channels, height, width = data.images["train"].shape[1:]
    expected = document.shape
    if [channels, height, width] != expected:
        raise MissingInputError(
            f"{paths.augment_dir(dataset)}/policy.json expects C x H x W = {expected} but the "
            f"prepared {dataset} images are {[channels, height, width]}; re-run the augment stage"
        )


def _description(
    dataset: str,
    method: str,
    hparams: dict,
    encoder: Backbone | PCAEncoder | PixelsEncoder,
    **extra: int,
) -> EncoderDescription:
    return EncoderDescription(
        method=method,
        kind=method if method in ("pca", "pixels") else "backbone",
        backbone=hparams.get("backbone"),
        in_channels=hparams["in_channels"],
        image_size=hparams["image_size"],
        feature_dim=int(encoder.feature_dim),
        mean=hparams["mean"],
        std=hparams["std"],
        dataset=dataset,
        dataset_checksum=_checksum(dataset),
        **extra,
    )


def _frozen_knn(
    config: Config, data: SplitData, encoder: nn.Module, normalize: BatchAugment
) -> float:
    """The kNN monitor for an encoder that does not train (PCA, the random initialization)."""
    import torch

    from pipeline.models.knn import best_knn

    monitor = config.pretrain.monitor
    bank = min(monitor["knn_max_train"], data.images["train"].shape[0])
    encoder.eval()
    with torch.no_grad():
        return best_knn(
            encoder(normalize(data.images["train"][:bank])),
            data.labels["train"][:bank],
            encoder(normalize(data.images["val"])),
            data.labels["val"],
            monitor["knn_ks"],
            monitor["knn_temperatures"],
            data.num_classes,
        )[0]


def _untrained(config: Config, dataset: str, document: PolicyDocument) -> dict:
    """The from-scratch baseline's encoder: the random initialization, seeded, never trained.

    Written like every other encoder so fine-tuning treats all inits alike and every seed of
    every init starts from the same weights.
    """
    import lightning as L

    from pipeline.data.datamodule import SplitData
    from pipeline.models.backbones import BackboneConfig, build_backbone

    data = SplitData(dataset, ("train", "val"))
    data.setup("fit")
    _check_image_shape(data, document, dataset)
    L.seed_everything(config.pretrain.seed, verbose=False)
    fields = backbone_fields(config)
    encoder = build_backbone(BackboneConfig(**fields), document.channels, document.image_size)
    knn = _frozen_knn(config, data, encoder, document.normalizer())
    hparams = {"backbone": fields, **document.image_fields()}
    return _reference(dataset, "scratch", hparams, encoder, epoch=0.0, knn=knn)


def _pixels(config: Config, dataset: str, document: PolicyDocument) -> dict:
    """The raw-pixel baseline: nothing to learn; its monitor is kNN on the normalized pixels."""
    from pipeline.data.datamodule import SplitData
    from pipeline.models.pretrain import PixelsEncoder

    data = SplitData(dataset, ("train", "val"))
    data.setup("fit")
    _check_image_shape(data, document, dataset)
    encoder = PixelsEncoder(int(data.images["train"][0].numel()))
    knn = _frozen_knn(config, data, encoder, document.normalizer())
    return _reference(dataset, "pixels", document.image_fields(), encoder, epoch=0.0, knn=knn)


def _fit_pca(config: Config, dataset: str, document: PolicyDocument) -> dict:
    from pipeline.data.datamodule import SplitData
    from pipeline.models.pretrain import PCAEncoder

    data = SplitData(dataset, ("train", "val"), pool=True)
    data.setup("fit")
    _check_image_shape(data, document, dataset)
    _log_images("pca", data)
    normalize = document.normalizer()
    train = normalize(data.images[data.train_set]).flatten(1)  # training images + pool
    components = min(config.pretrain.options["pca"]["components"], train.shape[1])
    encoder = PCAEncoder(train.shape[1], components).fit(train)
    knn = _frozen_knn(config, data, encoder, normalize)
    explained = float(encoder.explained_variance.sum() / train.double().var(0).sum())
    return _reference(
        dataset,
        "pca",
        document.image_fields(),
        encoder,
        epoch=1.0,
        knn=knn,
        metrics={"explained_variance": round(explained, 6), **_images_seen(data)},
        input_dim=int(train.shape[1]),
    )


def _reference(
    dataset: str,
    method: str,
    hparams: dict,
    encoder: Backbone | PCAEncoder | PixelsEncoder,
    epoch: float,
    knn: float,
    metrics: dict[str, float | int] | None = None,
    **extra: int,
) -> dict:
    """What a reference encoder's maker returns: the encoder, its description and its one
    history row (no training loss or probe: nothing was trained by gradient)."""
    row = {
        "epoch": epoch,
        "train_loss": float("nan"),
        "val_knn_acc": knn,
        "val_probe_acc": float("nan"),
    }
    return {
        "encoder": encoder.state_dict(),
        "description": _description(dataset, method, hparams, encoder, **extra),
        "history": [row],
        "metrics": {"method": method, **row, **(metrics or {})},
        "pictures": {},
    }


#: How each reference encoder (pipeline.methods.REFERENCES) is made.
_REFERENCES = {"scratch": _untrained, "pixels": _pixels, "pca": _fit_pca}


def _write_outputs(method: str, result: dict) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in result["encoder"].items()}, buffer)
    with atomic_dir(paths.pretrain_dir(method)) as tmp:
        write_bytes(tmp / "encoder.pt", buffer.getvalue())
        write_json(tmp / "encoder.json", result["description"].as_dict())
        for name, array in result["pictures"].items():
            save_npy(tmp / f"{name}.npy", np.asarray(array, dtype=np.uint8))
    metrics_json, curves_csv = paths.pretrain_metrics(method)
    write_json(metrics_json, {k: _round(v) for k, v in result["metrics"].items()})
    # The common columns, then any monitors of the method's own (the GAN's D and G losses).
    extra = [key for key in result["history"][0] if key not in CURVE_COLUMNS]
    columns = [*CURVE_COLUMNS, *extra]
    lines = [",".join(columns)]
    for row in result["history"]:
        lines.append(",".join(_csv(row[c]) for c in columns))
    write_text(curves_csv, "\n".join(lines) + "\n")


def _round(value: object) -> object:
    """Six decimals; NaN (a monitor a method has not got, e.g. PCA's probe) becomes null."""
    if isinstance(value, float):
        return round(value, 6) if value == value else None
    return value


def _csv(value: float) -> str:
    return "" if value != value else f"{value:.6g}"  # NaN (no such monitor) stays empty
