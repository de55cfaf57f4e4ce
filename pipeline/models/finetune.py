"""Supervised training on a labeled subset: the linear probe and full fine-tuning.

- ``linear``: the encoder is frozen; its features of the (unaugmented) labeled and validation
  images are computed once per cell by the caller and a linear classifier is trained on them,
  with no encoder forward pass per step (docs/science.md §8.1). The augmentation policy does
  not apply: augmented features would need that forward pass every step.
- ``finetune``: every layer trains on augmented batches (``finetune.policy``), the encoder at
  ``lr x encoder_lr_scale``.
- ``semi``: every layer trains as in ``finetune``, with FixMatch (docs/science.md §9): each step
  also takes ``mu x B`` unlabeled images (:class:`Unlabeled`), forwards ``[labeled; weak;
  strong]`` in one batch and minimizes :func:`pipeline.models.semi.fixmatch_loss`. The labeled
  batch gets the weak policy, as in the paper.

The budget (:func:`budget`): every init gets the same one at a given label fraction, and it
scales with the subset, so that no cell stops because its budget was too small for its data
(docs/science.md §8.4: a fixed number of steps for 540 and for 5,400 images under-trains the
larger set). Training stops early when validation accuracy has not improved for ``patience``
epochs, or at the cap; the learning rate follows a cosine decay over the cap.

The supervised modes minimize cross-entropy (with optional label smoothing) + an L1 penalty
``λ Σ|w|`` (weight decay supplies L2) + optionally ``multitask_weight x`` a self-supervised loss
on the same batch (``finetune`` only); ``semi`` minimizes FixMatch's loss + the L1 penalty.
Validation accuracy is computed every epoch; the best epoch's weights are kept in memory and
returned (early stopping is Lightning's EarlyStopping callback on the same number).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from pipeline.augment import BatchAugment
from pipeline.models.classifier import LinearClassifier
from pipeline.models.optim import build_optimizer, warmup_cosine_scheduler
from pipeline.models.semi import fixmatch_loss, split_logits

if TYPE_CHECKING:  # the multi-task term's module; imported by the stage that builds it
    from lightning.pytorch.utilities.types import OptimizerLRScheduler

    from pipeline.models.pretrain import PretrainModule

#: Modes that train every layer on augmented images (``linear`` trains the head on features).
TRAINS_ENCODER = ("finetune", "semi")


@dataclass(frozen=True)
class Budget:
    """How long one cell may train, in optimizer steps and epochs (an epoch = one validation)."""

    pass_steps: int  # steps in one pass over the labeled subset
    steps_per_epoch: int  # one pass, or at least ``min_steps_per_epoch`` for small subsets
    max_epochs: int

    @property
    def cap_steps(self) -> int:
        return self.max_epochs * self.steps_per_epoch

    def as_dict(self) -> dict[str, int]:
        return {
            "pass_steps": self.pass_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "max_epochs": self.max_epochs,
            "cap_steps": self.cap_steps,
        }


def budget(
    subset_size: int, batch_size: int, steps_per_epoch: int, max_passes: int, min_steps: int
) -> Budget:
    """The cap: ``max(min_steps, max_passes x steps per pass)`` steps, in whole epochs.

    ``steps_per_epoch`` is what the data loader gives (a pass, or more for tiny subsets). With
    the defaults, 540 labeled images get the floor of ``min_steps`` and 54,000 get
    ``max_passes`` passes: the cap grows with the data, and early stopping ends a cell whose
    validation accuracy has stopped improving long before it.
    """
    if min(subset_size, batch_size, steps_per_epoch, max_passes, min_steps) < 1:
        raise ValueError(
            f"budget: every size must be >= 1, got {subset_size=}, {batch_size=}, "
            f"{steps_per_epoch=}, {max_passes=}, {min_steps=}"
        )
    pass_steps = max(1, subset_size // min(batch_size, subset_size))
    cap = max(min_steps, max_passes * pass_steps)
    return Budget(pass_steps, steps_per_epoch, math.ceil(cap / steps_per_epoch))


def stop_reason(history: list[dict[str, float]], best_epoch: int, max_epochs: int) -> dict:
    """Why a seed stopped: early stopping, or the cap; and whether it was still improving
    (its best epoch was its last) when it hit the cap, which the report marks."""
    epochs_run = len(history)
    stopped = "cap" if epochs_run >= max_epochs else "early_stopping"
    return {"stopped": stopped, "improving_at_cap": stopped == "cap" and best_epoch == epochs_run}


@dataclass(frozen=True)
class Recipe:
    """How one seed trains: the optimizer, its schedule's length, the loss terms and the seed.

    Plain values only: the module records them as its hyperparameters in every checkpoint, and
    checkpoints are read back weights-only.
    """

    optimizer: dict[str, Any]
    total_steps: int
    seed: int
    encoder_lr_scale: float = 1.0
    l1: float = 0.0
    label_smoothing: float = 0.0
    multitask_weight: float = 0.0
    threshold: float = 0.95  # semi: FixMatch's confidence threshold
    unlabeled_ratio: int = 7  # semi: mu, unlabeled images per labeled image in a step
    unlabeled_weight: float = 1.0  # semi: lambda_u


@dataclass(frozen=True)
class Unlabeled:
    """Mode semi's unlabeled images (uint8 N x C x H x W, on the CPU until training starts) and
    the two augmentations that make each one's weak and strong view."""

    images: torch.Tensor
    weak: BatchAugment
    strong: BatchAugment


def unlabeled_positions(size: int, count: int, seed: int, step: int) -> torch.Tensor:
    """Positions ``[step x count, (step + 1) x count)`` of an endless stream of permutations of
    ``range(size)``, permutation k seeded by (seed, k): the unlabeled images of one step.

    Why a pure function of (seed, step) and not a sampler with state: a run resumed from a
    checkpoint restores the global step, so its unlabeled batches are the uninterrupted run's
    with nothing else to save; and every image is drawn once per pass over the unlabeled set,
    as an epoch-wise sampler would.
    """
    if size < 1 or count < 0 or step < 0:
        raise ValueError(
            f"unlabeled_positions: need size >= 1, count and step >= 0, got "
            f"{size=}, {count=}, {step=}"
        )
    chunks, position, end = [], step * count, (step + 1) * count
    while position < end:
        permutation, offset = divmod(position, size)
        take = min(end - position, size - offset)
        chunks.append(_permutation(size, seed, permutation)[offset : offset + take])
        position += take
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)


@functools.lru_cache(maxsize=4)
def _permutation(size: int, seed: int, index: int) -> torch.Tensor:
    """Permutation ``index`` of the unlabeled stream (cached: a step reads one or two)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + index) * 257 + 91)
    return torch.randperm(size, generator=generator)


class FinetuneModule(L.LightningModule):
    """Trains a LinearClassifier; keeps the weights of its best validation epoch.

    ``augment`` makes the training batches of modes finetune and semi (``normalize`` the
    validation batches); mode linear trains the head on ``features``, the frozen encoder's cached
    features per split. ``ssl`` is a PretrainModule sharing the encoder, for the multi-task term.
    ``unlabeled`` holds mode semi's unlabeled images and their views.
    """

    def __init__(
        self,
        classifier: LinearClassifier,
        mode: str,
        augment: BatchAugment,
        normalize: BatchAugment,
        recipe: Recipe,
        ssl: PretrainModule | None = None,
        features: dict[str, torch.Tensor] | None = None,
        unlabeled: Unlabeled | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("linear", *TRAINS_ENCODER):
            raise ValueError(f"unknown fine-tuning mode {mode!r}; use linear, finetune or semi")
        if mode == "linear" and features is None:
            raise ValueError("linear mode trains on cached features: pass features={set: N x D}")
        if (mode == "semi") != (unlabeled is not None and len(unlabeled.images) > 0):
            raise ValueError("mode semi, and only semi, trains on unlabeled images: pass them")
        self.save_hyperparameters({"mode": mode, **asdict(recipe)}, logger=False)
        self.classifier = classifier
        self.mode = mode
        self.recipe = recipe
        self.ssl = ssl
        self.augment = augment
        self.normalize = normalize
        self.val_acc = MulticlassAccuracy(classifier.head.out_features, average="micro")
        self.train_loss = MeanMetric()
        self.unlabeled = unlabeled
        if unlabeled is not None:  # submodules: they move to the device with the module
            self.weak, self.strong = unlabeled.weak, unlabeled.strong
        self.mask_rate = MeanMetric()  # semi: share of unlabeled images with a pseudo-label
        self.unsupervised_loss = MeanMetric()  # semi: L_u, before its weight
        if mode == "linear":
            for parameter in self.classifier.encoder.parameters():
                parameter.requires_grad_(False)
        # Convolutions run 1.4-1.5x faster in channels-last layout on this CPU (BENCHMARKS.md);
        # an MLP or PCA encoder flattens its input, so layout does not matter there.
        self.channels_last = mode in TRAINS_ENCODER and bool(
            getattr(classifier.encoder, "has_gap", False)
        )
        if self.channels_last:
            self.classifier.to(memory_format=torch.channels_last)
        self.best_acc = -1.0
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.features = features or {}

    # ------------------------------------------------------------------ data
    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        self.labels = {k: v.to(self.device) for k, v in data.labels.items()}
        self.train_set = data.train_set
        if self.mode == "linear":  # frozen encoder: only its cached features are needed
            self.classifier.encoder.eval()
            self.features = {k: v.to(self.device) for k, v in self.features.items()}
        else:
            self.images = {k: v.to(self.device) for k, v in data.images.items()}
        if self.unlabeled is not None:
            self.images["unlabeled"] = self.unlabeled.images.to(self.device)

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(self.recipe.seed * 7919 + self.current_epoch)
        if self.mode == "linear":
            self.classifier.encoder.eval()  # keep BN statistics frozen too

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _generator(self, stream: int) -> torch.Generator:
        """The random numbers of one augmentation stream at this step and rank, so that a
        resumed run draws what the uninterrupted one drew."""
        offset = self.recipe.seed * stream + self.global_step + (self.global_rank << 40)
        return torch.Generator(device=self.device).manual_seed(offset)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        index = batch.to(self.device)
        labels = self.labels[self.train_set][index]
        if self.mode == "semi":
            loss = self._fixmatch_step(index, labels)
            self.train_loss.update(loss.detach())
            return loss
        if self.mode == "linear":
            features = self.features[self.train_set][index]
            logits = self.classifier.head(self.classifier.dropout(features))
            images = None
        else:
            images = self.images[self.train_set][index]
            augmented = self.augment(images, self._generator(1_000_003))
            logits = self.classifier.logits(self._layout(augmented))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.recipe.label_smoothing)
        if self.recipe.l1 > 0:
            loss = loss + self._l1()
        if self.ssl is not None and self.recipe.multitask_weight > 0 and images is not None:
            ssl_loss = self.ssl.objective(images, self._generator(1_000_033))[0]
            loss = loss + self.recipe.multitask_weight * ssl_loss
        self.train_loss.update(loss.detach())
        return loss

    def _l1(self) -> torch.Tensor:
        """``λ Σ|w|`` over the trained weight matrices and kernels (callers skip it at λ = 0)."""
        weights = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() > 1]
        return self.recipe.l1 * sum(w.abs().sum() for w in weights)

    def _fixmatch_step(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One FixMatch step (docs/science.md §9): B labeled images (weak policy) and mu x B
        unlabeled ones, weak and strong views, in one forward pass (one set of batch-norm
        statistics for all three, see ``split_logits``).

        The unlabeled images of a step are positions of :func:`unlabeled_positions` at the
        global step; under DDP each rank takes every world-th of the global step's, as the
        labeled sampler deals its batches.
        """
        world, rank = self.trainer.world_size, self.global_rank
        pool = self.images["unlabeled"]
        count = self.recipe.unlabeled_ratio * len(index) * world
        positions = unlabeled_positions(len(pool), count, self.recipe.seed, self.global_step)
        unlabeled = pool[positions[rank::world].to(self.device)]
        views = (
            self.augment(self.images[self.train_set][index], self._generator(1_000_003)),
            self.weak(unlabeled, self._generator(1_000_037)),
            self.strong(unlabeled, self._generator(1_000_039)),
        )
        logits = self.classifier.logits(self._layout(torch.cat(views)))
        labeled, weak, strong = (part.float() for part in split_logits(logits, len(index)))
        loss, parts = fixmatch_loss(
            labeled,
            labels,
            weak,
            strong,
            self.recipe.threshold,
            self.recipe.unlabeled_weight,
        )
        self.mask_rate.update(parts.mask_rate)
        self.unsupervised_loss.update(parts.unsupervised)
        return loss + self._l1() if self.recipe.l1 > 0 else loss

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        index = batch.to(self.device)
        if self.mode == "linear":
            logits = self.classifier.head(self.features["val"][index])
        else:
            logits = self.classifier.logits(self._layout(self.normalize(self.images["val"][index])))
        self.val_acc.update(logits, self.labels["val"][index])

    def on_validation_epoch_end(self) -> None:
        accuracy = float(self.val_acc.compute())
        self.val_acc.reset()
        train_loss = float(self.train_loss.compute())
        self.train_loss.reset()
        self.log("val_acc", accuracy)
        self.log("train_loss", train_loss)
        row = {
            "epoch": float(self.current_epoch + 1),
            "train_loss": train_loss,
            "val_acc": accuracy,
        }
        if self.mode == "semi":  # how much of the unlabeled data taught, and how hard
            for name in ("mask_rate", "unsupervised_loss"):
                meter = getattr(self, name)
                row[name] = float(meter.compute())
                meter.reset()
                self.log(name, row[name])
        self.history.append(row)
        if accuracy > self.best_acc:  # strictly better: ties keep the earlier, cheaper epoch
            self.best_acc = accuracy
            self.best_epoch = self.current_epoch + 1
            self.best_state = copy.deepcopy(
                {k: v.detach().cpu() for k, v in self.classifier.state_dict().items()}
            )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The best epoch so far and the history travel with the checkpoint, so a resumed run
        chooses the same epoch and reports the same curve as an uninterrupted one."""
        checkpoint["finetune"] = {
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "history": list(self.history),
            "stopped": bool(self.trainer.should_stop),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restore(checkpoint["finetune"])

    def restore(self, saved: dict[str, Any]) -> None:
        self.best_acc = float(saved["best_acc"])
        self.best_epoch = int(saved["best_epoch"])
        self.best_state = dict(saved["best_state"])
        self.history = list(saved["history"])

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> OptimizerLRScheduler:
        opt = self.recipe.optimizer
        head = list(self.classifier.head.parameters())
        groups = [{"params": head}]
        if self.mode in TRAINS_ENCODER:
            encoder = list(self.classifier.encoder.parameters())
            groups.append({"params": encoder, "lr": opt["lr"] * self.recipe.encoder_lr_scale})
            if self.ssl is not None:
                shared = {id(p) for p in encoder}
                extra = [
                    p for p in self.ssl.parameters() if id(p) not in shared and p.requires_grad
                ]
                groups.append({"params": extra})
        optimizer = build_optimizer(
            groups, opt["name"], opt["lr"], opt["weight_decay"], opt["momentum"], opt["nesterov"]
        )
        scheduler = warmup_cosine_scheduler(optimizer, 0, self.recipe.total_steps)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
