"""finetune stage: one cell of the study, a classifier from one init, mode and label fraction.

``python -m pipeline finetune --init I --mode M --fraction F`` trains on the labeled subset
``labeled-F`` of the split (F a label fraction, ``0.01``, or a per-class budget, ``4pc``, ``all``),
once per seed in ``finetune.seeds``, every choice (epoch, kNN k and temperature) made on the
validation split, or only on its subset ``val-labeled`` when ``split.val_labels_per_class`` is
set. With ``split.label_draws`` > 1 the i-th seed trains on draw i of the labeled subsets
(``labeled-F-draw<i>``; draw 0 is ``labeled-F``). The test split is never loaded here: evaluation
is the only stage that reads it.

Budget (docs/science.md §8.4): a cell trains until validation accuracy has not improved for
``finetune.patience`` epochs, under a cap of ``max(finetune.min_steps, finetune.max_passes x
steps per pass)`` steps, the same for every init at one fraction and growing with the subset.
The cell's JSON records, per seed, why it stopped (``early_stopping`` or ``cap``) and whether it
was still improving at the cap. ``linear`` and ``knn`` compute the frozen encoder's features of
the labeled subset and of validation once per cell; the linear head trains on those.

Mode ``semi`` (FixMatch, docs/science.md §9) also reads the training split's images outside the
labeled subset, without their labels, and the unlabeled pool's images that the split kept
(:func:`unlabeled_images`); never validation or test images. Its budget counts labeled steps,
as in every mode; a cell with no unlabeled image stops before training with one line saying
what to set.

Outputs: ``models/finetune/<I>-<M>-<F>/`` (``model.json`` + ``seed<k>.pt``),
``metrics/finetune/<I>-<M>-<F>.json`` (validation accuracy, the choices and the per-epoch history,
per seed) and ``metrics/finetune/<I>-<M>-<F>.csv`` (the curve: per epoch, the mean over the seeds
that ran it of the training loss and validation accuracy; a kNN cell has no epochs, so its curve
is one point, its validation accuracy).

Training is resumable: each seed checkpoints every epoch to ``checkpoints/finetune/<cell>-<key>/``
(outside the declared outputs, which the runners delete before a re-run; the key hashes every
setting, the init's weights and the data) and a finished seed's result is kept there, so a run
killed part-way re-runs only what was left. The folder is removed once the cell's outputs exist.
"""

from __future__ import annotations

import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import paths, third_party, training
from pipeline.config import MODES, SEMI_SUPERVISED_MODES, Config
from pipeline.documents import EncoderDescription, PolicyDocument
from pipeline.errors import MissingInputError
from pipeline.io import write_bytes, write_json, write_text
from pipeline.stages import pretrain as pretrain_stage  # the multi-task term's settings

if TYPE_CHECKING:  # torch and Lightning are imported only to train: the CLI imports this module
    import argparse

    import numpy as np
    import torch
    from torch import nn

    from pipeline.data.datamodule import SplitData
    from pipeline.models.classifier import LinearClassifier
    from pipeline.models.finetune import Budget, Unlabeled
    from pipeline.models.pretrain import PretrainModule
    from pipeline.tracking import TrackedRun

log = logging.getLogger(__name__)

COMMON_PARAMS = (
    "model",
    "trainer",
    "finetune.seeds",
    "finetune.max_passes",
    "finetune.min_steps",
    "finetune.patience",
    "finetune.min_steps_per_epoch",
    "finetune.max_images",
    "finetune.batch_size",
    "finetune.policy",
    "finetune.optimizer",
    "finetune.encoder_lr_scale",
    "finetune.l1",
    "finetune.dropout",
    "finetune.label_smoothing",
    "finetune.multitask_weight",
    "finetune.knn",
    # Mode semi's settings, not finetune.semi.inits or .fractions: those say which semi cells
    # run and change no cell, so listing one more re-runs none of the others.
    "finetune.semi.threshold",
    "finetune.semi.batch_size",
    "finetune.semi.unlabeled_ratio",
    "finetune.semi.unlabeled_weight",
    "finetune.semi.weak_policy",
    "finetune.semi.strong_policy",
)
PARAMS = COMMON_PARAMS


def params_for(cell: str | None = None) -> tuple[str, ...]:
    return COMMON_PARAMS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init", required=True, help="scratch, pca, pixels or a pretraining method"
    )
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument(
        "--fraction", required=True, help="a label budget the split made (0.01, 4pc, all)"
    )


def run(
    config: Config,
    dataset: str | None = None,
    init: str = "scratch",
    mode: str = "linear",
    fraction: str = "1",
) -> dict:
    """Train (or fit, for kNN) the classifiers of one cell, one per seed."""
    training.require_devices(config)
    dataset = dataset or config.data.dataset
    cell = paths.Cell(init, mode, _check_cell(config, init, mode, fraction))
    document = PolicyDocument.read(dataset)
    with training.stage_run("finetune", config, dataset, COMMON_PARAMS) as tracked:
        tracked.set_tags(
            {"init": init, "mode": mode, "fraction": cell.fraction_name, "cell": cell.name}
        )
        trained = _train_cell(config, dataset, cell, document, tracked)
        if not training.is_rank_zero():  # a DDP rank: it trained its share; rank zero writes
            return {}
        from pipeline.models import classifier

        classifier.save(cell.model_dir, trained.description, trained.states)
        accuracies = [r["val_acc"] for r in trained.per_seed.values()]
        summary = {
            "init": init,
            "mode": mode,
            "fraction": cell.fraction_name,
            "val_acc_mean": round(sum(accuracies) / len(accuracies), 6),
            **({"budget": trained.budget.as_dict()} if trained.budget else {}),
            **_validation_record(config, trained.validation_size),
            "seeds": trained.per_seed,
        }
        write_json(cell.metrics_path, summary)
        write_text(cell.curve_path, curve_csv(trained.per_seed))
        tracked.log_metrics({"val_acc": summary["val_acc_mean"]})
        tracked.log_artifact(cell.metrics_path)
        # every output is written: nothing to resume
        shutil.rmtree(trained.ckpt_dir, ignore_errors=True)
    log.info("%s: validation accuracy %.4f", cell.name, summary["val_acc_mean"])
    return summary


def _check_cell(config: Config, init: str, mode: str, fraction: str) -> float | str:
    names = {paths.fraction_name(f): f for f in config.finetune.fractions}
    try:
        value = names.get(paths.fraction_name(fraction))
    except ValueError:  # neither a number nor a per-class key
        value = None
    if value is None:
        raise MissingInputError(
            f"label budget {fraction!r} is not in finetune.fractions; allowed: {', '.join(names)}"
        )
    ft = config.finetune
    if init in ft.baselines:
        if mode not in ft.baseline_modes:
            raise MissingInputError(
                f"init {init!r} is a feature baseline (finetune.baselines) with no weights to "
                f"train: --mode {mode} is not allowed; use one of finetune.baseline_modes "
                f"({', '.join(ft.baseline_modes)})"
            )
        return value
    if mode in SEMI_SUPERVISED_MODES:
        return _check_semi_cell(config, init, mode, value)
    if init not in ft.inits:
        allowed = ", ".join(ft.inits + ft.baselines)
        raise MissingInputError(
            f"init {init!r} is not in finetune.inits or finetune.baselines; allowed: {allowed}"
        )
    if mode not in ft.modes:
        raise MissingInputError(
            f"mode {mode!r} is not in finetune.modes; allowed: {', '.join(ft.modes)}"
        )
    return value


def _batch_size(config: Config, mode: str) -> int:
    """Labeled images per step: finetune.batch_size, or finetune.semi.batch_size in a semi
    cell, where every step also trains on unlabeled_ratio times as many unlabeled images in two
    views (at 128 labeled that is 1,920 images a step, the CPU default's reason for 32)."""
    semi = config.finetune.semi
    if mode == "semi" and semi.batch_size is not None:
        return semi.batch_size
    return config.finetune.batch_size


def _check_semi_cell(config: Config, init: str, mode: str, value: float | str) -> float | str:
    """A semi cell runs only where finetune.semi asks for it: each costs several fine-tuning
    cells, and the runners build exactly ``config.finetune.cells()``."""
    semi = config.finetune.semi
    name = paths.fraction_name(value)
    if init not in semi.inits or name not in [paths.fraction_name(f) for f in semi.fractions]:
        inits = ", ".join(semi.inits) or "none"
        fractions = ", ".join(paths.fraction_name(f) for f in semi.fractions) or "none"
        raise MissingInputError(
            f"cell {init}-{mode}-{name} is not a semi cell of the study: finetune.semi.inits "
            f"is {inits} and finetune.semi.fractions is {fractions}; add {init} and {name} "
            "there"
        )
    return value


def _encoder(init: str) -> tuple[nn.Module, EncoderDescription]:
    """A fresh copy of the init's encoder (scratch: the saved random initialization)."""
    from pipeline.models.encoders import load_encoder

    return load_encoder(init)


@dataclass
class _Trained:
    """One cell's result: a state per seed, per-seed metrics, the classifier's description."""

    states: dict[int, dict]
    per_seed: dict[str, dict]
    description: dict[str, Any]  # model.json: strings, numbers, lists and the encoder's dict
    ckpt_dir: Path
    budget: Budget | None  # None for kNN, which does not train
    validation_size: int = 0  # labeled validation images every choice was made on


def _train_cell(
    config: Config, dataset: str, cell: paths.Cell, document: PolicyDocument, tracked: TrackedRun
) -> _Trained:
    import lightning as L

    from pipeline.data.datamodule import SplitData
    from pipeline.models.finetune import budget

    ft = config.finetune
    init, mode = cell.init, cell.mode
    labeled = {
        s: paths.labeled_set(cell.fraction, config.split.draw_of(ft.seeds, s)) for s in ft.seeds
    }
    subset = labeled[ft.seeds[0]]
    batch_size = _batch_size(config, mode)
    data = SplitData(
        dataset,
        (*dict.fromkeys(labeled.values()), "val"),
        batch_size,
        seed=0,
        max_images=ft.max_images,
        train_set=subset,
        min_steps=ft.min_steps_per_epoch,
        val_file=_validation_file(config),
    )
    data.setup("fit")
    ckpt_dir = _checkpoint_dir(config, dataset, cell, document)
    cell_budget = None
    if mode != "knn":
        cell_budget = budget(
            len(data.labels[subset]),
            batch_size,
            len(data.train_dataloader()),
            ft.max_passes,
            ft.min_steps,
        )
    # Before the encoder loads: a semi cell without unlabeled images stops here, in one line.
    unlabeled = (
        {subset: _unlabeled(config, document, dataset, cell, subset)} if mode == "semi" else {}
    )
    encoder, encoder_description = _encoder(init)
    # A frozen encoder's features never change: computed once, shared by every seed.
    features = _features(encoder, data, document) if mode in ("linear", "knn") else None
    states, per_seed = {}, {}
    knn: dict[str, tuple[dict, dict]] = {}
    for seed in ft.seeds:
        L.seed_everything(seed, workers=True, verbose=False)
        data.seed = seed
        data.train_set = labeled[seed]
        if mode == "semi" and data.train_set not in unlabeled:
            unlabeled[data.train_set] = _unlabeled(config, document, dataset, cell, data.train_set)
        if mode == "knn":
            # kNN on a frozen encoder has no randomness: one fit serves every seed of a draw.
            if data.train_set not in knn:
                knn[data.train_set] = _fit_knn(config, data, encoder, features)
            state, result = knn[data.train_set]
        else:
            if mode in ("finetune", "semi") and seed != ft.seeds[0]:
                encoder, _ = _encoder(init)  # every seed starts from the init's own weights
            fit = _Fit(
                config,
                data,
                encoder,
                encoder_description,
                init,
                mode,
                document,
                seed,
                tracked,
                ckpt_dir,
                cell_budget,
                features,
                cell.name,
                unlabeled.get(data.train_set),
            )
            state, result = _fit_seed(fit)
        if config.split.label_draws > 1:  # which labeled images this seed saw
            result = {**result, "labeled_set": data.train_set}
        states[seed], per_seed[str(seed)] = state, result
        tracked.log_metrics({f"val_acc_seed{seed}": result["val_acc"]})
    description = {
        "init": init,
        "mode": mode,
        "fraction": cell.fraction_name,
        "classes": data.classes,
        "image_size": document.image_size,
        "in_channels": document.channels,
        "mean": document.mean,
        "std": document.std,
        "dropout": ft.dropout if mode != "knn" else 0.0,
        "encoder": encoder_description.as_dict(),
        "dataset": dataset,
    }
    return _Trained(states, per_seed, description, ckpt_dir, cell_budget, len(data.labels["val"]))


def unlabeled_indices(dataset: str, labeled_set: str) -> np.ndarray:
    """Indices into the prepared training images of the training split's images outside the
    labeled subset ``labeled_set`` (``labeled-0.01``), sorted: what mode semi may see of the
    split without labels (issue 25's table of who sees which images). At all labels, where
    none is outside, the whole training split.

    Validation and test images are never among them by construction: the split makes ``train``
    disjoint from both, by index and by content (pipeline/data/split.py, rules 2 and 3), and
    the indices are read through their checksums.
    """
    import numpy as np

    from pipeline.data.split import load_indices

    train = load_indices(dataset, "train")
    rest = np.setdiff1d(train, load_indices(dataset, labeled_set)).astype(np.int64)
    # At all labels nothing of the split is left unlabeled: the labeled images' views serve as
    # the unlabeled ones, as in FixMatch's own setup, whose unlabeled set holds every training
    # image (docs/science.md §9); with a pool, the pool then adds what the labels do not cover.
    return rest if len(rest) else np.sort(train).astype(np.int64)


def unlabeled_images(dataset: str, labeled_set: str) -> np.ndarray:
    """Mode semi's unlabeled images, uint8 N x H x W x C, the one place its unlabeled stream is
    assembled: the training split outside the labeled subset, then the pool's images that the
    split kept (no copy of a validation or test image, pipeline.data.pool)."""
    import numpy as np

    from pipeline.data import prepared
    from pipeline.data.pool import pool_images

    data = prepared.load(paths.prepared_dir(dataset), only=("train_images",))
    rest = np.asarray(data.train_images)[unlabeled_indices(dataset, labeled_set)]
    pool = pool_images(data, dataset)
    return rest if pool is None or not len(pool) else np.concatenate([rest, pool])


def _validation_record(config: Config, size: int) -> dict[str, dict[str, object]]:
    """The cell JSON's ``validation`` entry when choices use a scarce validation subset (the
    report states it beside the answer); nothing otherwise, so default outputs keep their bytes."""
    per_class = config.split.val_labels_per_class
    if per_class is None:
        return {}
    return {"validation": {"file": paths.VAL_LABELED, "labels_per_class": per_class, "size": size}}


def _validation_file(config: Config) -> str:
    """The split file every choice made on validation reads: the scarce subset when
    split.val_labels_per_class is set, else the whole validation split."""
    return "val" if config.split.val_labels_per_class is None else paths.VAL_LABELED


def _unlabeled(
    config: Config, document: PolicyDocument, dataset: str, cell: paths.Cell, subset: str
) -> Unlabeled:
    """Mode semi's unlabeled images as a CPU tensor, with their weak and strong views (never
    empty: at all labels the training split's own images serve, :func:`unlabeled_indices`)."""
    import torch

    from pipeline.models.finetune import Unlabeled

    images = unlabeled_images(dataset, subset)
    semi = config.finetune.semi
    log.info(
        "%s: %d unlabeled images (training split outside %s, and the pool)",
        cell.name,
        len(images),
        subset,
    )
    return Unlabeled(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # a fresh, writable copy
        document.normalizer(semi.weak_policy),
        document.normalizer(semi.strong_policy),
    )


def _features(
    encoder: nn.Module, data: SplitData, document: PolicyDocument
) -> dict[str, torch.Tensor]:
    """The frozen encoder's features of every loaded set (unaugmented): the labeled subset (of
    each draw the seeds use) and validation."""
    from pipeline.models.encoders import encode

    normalize = document.normalizer()
    encoder.eval()
    return {name: encode(encoder, normalize, images) for name, images in data.images.items()}


def _checkpoint_dir(
    config: Config, dataset: str, cell: paths.Cell, document: PolicyDocument
) -> Path:
    """One folder per cell, keyed by everything that shapes its training: the params it reads,
    the init's encoder weights, the data and the policy document."""
    from pipeline.data.prepared import dataset_checksum
    from pipeline.io import sha256_file

    weights = paths.pretrain_dir(cell.init) / "encoder.pt"
    return training.checkpoint_dir(
        "finetune",
        cell.name,
        # split: its draws and validation subset change what a seed trains and chooses on
        {key: config.section(key) for key in (*COMMON_PARAMS, "split")},
        sha256_file(weights) if weights.is_file() else None,
        dataset_checksum(paths.prepared_dir(dataset)),
        document.raw,
    )


@dataclass
class _Fit:
    """Everything one seed's training reads."""

    config: Config
    data: SplitData
    encoder: nn.Module
    encoder_description: EncoderDescription
    init: str
    mode: str
    document: PolicyDocument
    seed: int
    tracked: TrackedRun
    ckpt_dir: Path
    budget: Budget  # kNN, the one mode without a budget, builds no _Fit
    features: dict[str, torch.Tensor] | None  # the frozen encoder's (linear); None to fine-tune
    cell: str
    unlabeled: Unlabeled | None = None  # mode semi's images and views


def _fit_seed(fit: _Fit) -> tuple[dict, dict]:
    """Train one seed, resumable: a finished seed is kept in ``seed<k>.pt`` and reused, an
    interrupted one resumes from its last epoch's checkpoint in ``seed<k>/``."""
    import torch

    done = fit.ckpt_dir / f"seed{fit.seed}.pt"
    if done.is_file():
        saved = training.load_checkpoint(done, f"fine-tuning seed {fit.seed}'s result")
        log.info("seed %d already trained (%s); reusing it", fit.seed, done)
        return dict(saved["state"]), saved["result"]
    state, result = _fit_linear(fit, fit.ckpt_dir / f"seed{fit.seed}")
    if not training.is_rank_zero():
        return state, result
    buffer = io.BytesIO()
    torch.save({"state": state, "result": result}, buffer)
    write_bytes(done, buffer.getvalue())
    shutil.rmtree(fit.ckpt_dir / f"seed{fit.seed}", ignore_errors=True)
    return state, result


def _fit_knn(
    config: Config, data: SplitData, encoder: nn.Module, features: dict[str, torch.Tensor]
) -> tuple[dict, dict]:
    """k and temperature chosen by validation accuracy; the bank is the labeled subset."""
    from pipeline.models.classifier import KNNClassifier
    from pipeline.models.knn import best_knn

    bank, bank_labels = features[data.train_set], data.labels[data.train_set]
    accuracy, k, t = best_knn(
        bank,
        bank_labels,
        features["val"],
        data.labels["val"],
        config.finetune.knn_ks,
        config.finetune.knn_temperatures,
        data.num_classes,
    )
    model = KNNClassifier(encoder, bank, bank_labels, k, t, data.num_classes)
    return model.state_dict(), {"val_acc": round(accuracy, 6), "k": k, "temperature": t}


def _fit_linear(fit: _Fit, ckpt_dir: Path) -> tuple[dict, dict]:
    """A linear head (mode linear, on the cached features) or the whole network (finetune)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from pipeline.models.classifier import LinearClassifier
    from pipeline.models.finetune import FinetuneModule, Recipe, stop_reason

    ft, data, document = fit.config.finetune, fit.data, fit.document
    classifier = LinearClassifier(
        fit.encoder, fit.encoder_description.feature_dim, data.num_classes, ft.dropout
    )
    ssl = (
        _multitask_module(fit.config, fit.init, document, classifier, data)
        if (fit.mode == "finetune" and ft.multitask_weight > 0)
        else None
    )
    scaled, mean, std = (
        standardized(fit.features, data.train_set) if fit.mode == "linear" else (None, None, None)
    )
    recipe = Recipe(
        fit.config.raw["finetune"]["optimizer"],
        fit.budget.cap_steps,
        fit.seed,
        ft.encoder_lr_scale,
        ft.l1,
        ft.label_smoothing,
        ft.multitask_weight,
        ft.semi.threshold,
        ft.semi.unlabeled_ratio,
        ft.semi.unlabeled_weight,
    )
    # FixMatch's labeled batch gets the weak view (docs/science.md §9); the others finetune.policy.
    policy = ft.semi.weak_policy if fit.mode == "semi" else ft.policy
    module = FinetuneModule(
        classifier,
        fit.mode,
        document.normalizer(policy),
        document.normalizer(),
        recipe,
        ssl=ssl,
        features=scaled,
        unlabeled=fit.unlabeled,
    )
    max_epochs = fit.budget.max_epochs
    last = ckpt_dir / "last.ckpt"
    saved = None
    if last.is_file():
        what = f"fine-tuning seed {fit.seed}'s checkpoint"
        saved = training.load_checkpoint(last, what)["finetune"]
        log.info("resuming seed %d from %s (after epoch %d)", fit.seed, last, len(saved["history"]))
    if saved is not None and (saved["stopped"] or len(saved["history"]) >= max_epochs):
        module.restore(saved)  # killed after its last epoch: nothing left to train
    else:
        trainer = training.make_trainer(
            fit.config,
            fit.tracked,
            max_epochs,
            fit.budget.steps_per_epoch,
            [
                EarlyStopping("val_acc", patience=ft.patience, mode="max"),
                ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1),
            ],
            prefix=f"seed{fit.seed}",
            default_root_dir=ckpt_dir,
            label=f"finetune {fit.cell} seed {fit.seed}",
        )
        resume = str(last) if saved is not None else None
        if fit.mode == "linear":
            third_party.expect_frozen_modules()
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    history = [{k: round(v, 6) for k, v in row.items()} for row in module.history]
    result = {
        "val_acc": round(module.best_acc, 6),
        "best_epoch": module.best_epoch,
        "epochs_run": len(module.history),
        **stop_reason(module.history, module.best_epoch, max_epochs),
        "history": history,
    }
    state = module.best_state
    if fit.mode == "linear":  # the saved head takes raw features, like every classifier
        state = fold_standardization(state, mean, std)
    return state, result


def standardized(
    features: dict[str, torch.Tensor], train_set: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Features centred per dimension and divided by one scale, their root-mean-square standard
    deviation (statistics of the labeled subset only); and that mean and scale (per dimension,
    for :func:`fold_standardization`).

    Why: a linear probe on raw post-ReLU features trained slowly, and unevenly across encoders
    whose features differ in offset and scale by orders of magnitude (SimCLR linear at 10 %
    labels: 0.773 raw, 0.834 scaled, on validation). One scale for all dimensions, not one each:
    per-dimension scaling blew PCA's weakest components up to the size of its strongest and cost
    its 1 % probe 6 points (0.784 -> 0.723); one scale keeps each encoder's geometry. Folded back
    into the head afterwards, so the saved classifier takes raw features.
    """
    train = features[train_set]
    mean = train.mean(0)
    scale = train.var(0).mean().sqrt().clamp_min(1e-6) if len(train) > 1 else train.new_ones(())
    std = scale * train.new_ones(train.shape[1])
    return {name: (f - mean) / std for name, f in features.items()}, mean, std


def fold_standardization(
    state: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The head ``W (x - mean) / std + b`` as one linear layer on raw features ``x``."""
    weight = state["head.weight"] / std
    return {**state, "head.weight": weight, "head.bias": state["head.bias"] - weight @ mean}


def curve_csv(per_seed: dict[str, dict]) -> str:
    """``epoch,train_loss,val_acc``: per epoch, the mean over the seeds that ran it.

    Seeds stop at different epochs (early stopping), so later epochs average fewer seeds. A kNN
    cell has no history: its curve is the single point (1, -, validation accuracy).
    """
    rows: dict[int, list[dict]] = {}
    for result in per_seed.values():
        history = result.get("history") or [{"epoch": 1.0, "val_acc": result["val_acc"]}]
        for row in history:
            rows.setdefault(int(row["epoch"]), []).append(row)
    lines = ["epoch,train_loss,val_acc"]
    for epoch, group in sorted(rows.items()):
        losses = [r["train_loss"] for r in group if "train_loss" in r]
        loss = f"{sum(losses) / len(losses):.6g}" if losses else ""
        accuracy = sum(r["val_acc"] for r in group) / len(group)
        lines.append(f"{epoch},{loss},{accuracy:.6g}")
    return "\n".join(lines) + "\n"


def _multitask_module(
    config: Config,
    init: str,
    document: PolicyDocument,
    classifier: LinearClassifier,
    data: SplitData,
) -> PretrainModule:
    """A PretrainModule whose encoder is the classifier's, for the self-supervised term.

    The init's own objective when it has one; rotation prediction for scratch and pca.
    """
    from pipeline.models.pretrain import METHODS, PretrainModule

    method = init if init in METHODS else "rotation"
    hparams = pretrain_stage.hparams_for(config, method, document, data.num_classes, 1)
    ssl = PretrainModule(**hparams)
    ssl.backbone = classifier.encoder
    # A teacher (BYOL's) starts from the loaded encoder and, with no pretraining step to move
    # it, stays there: the term then keeps the features near the pretrained ones.
    ssl.reset_teacher()
    return ssl
