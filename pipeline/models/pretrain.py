"""Self-supervised pretraining as one generic LightningModule; each method is a plug-in.

Methods (docs/science.md §7), one module each under pipeline/methods/
(its heads, its objective, its optional pictures): ``simclr``, ``autoencoder``, ``rotation``,
``inpainting``, ``vae``, ``gan``. ``pca`` (not a network) is :class:`PCAEncoder`, fitted in
closed form; ``pixels`` is :class:`PixelsEncoder`.

The data stay on the device (pipeline.data.datamodule); a batch arrives as indices, is gathered
from the device tensor and augmented there. Every random draw comes from a generator seeded by
(seed, global step) and dropout's RNG is re-seeded every epoch, so a run resumed from its
checkpoint ends with the same weights as one that was never interrupted (CPU, deterministic).

Online monitors, each epoch on the validation split: a kNN classifier on encoder features and a
linear probe trained on detached features (labels never reach the encoder).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from pipeline.augment import BatchAugment
from pipeline.methods import TRAINED
from pipeline.methods._contract import Build
from pipeline.methods._registry import IMPLEMENTATIONS
from pipeline.models.backbones import BackboneConfig, build_backbone
from pipeline.models.knn import best_knn
from pipeline.models.optim import build_optimizer, warmup_cosine_scheduler

if TYPE_CHECKING:  # a type alias, for the annotations only
    from lightning.pytorch.utilities.types import OptimizerLRScheduler

METHODS = TRAINED
_FEATURE_CHUNK = 2048


class PretrainModule(L.LightningModule):
    """Encoder + the heads one method needs + an online linear probe.

    The method's module (``IMPLEMENTATIONS[method]``) builds the heads and computes the loss;
    everything else (data on the device, views, monitors, optimization, checkpoints) is here.
    """

    # The modules a method's heads() may add, registered under these names (annotations only,
    # no class attributes): declared so the plug-ins that call them are type-checked.
    head: nn.Module
    decoder: nn.Module
    generator: nn.Module

    def __init__(
        self,
        method: str,
        backbone: dict[str, Any],
        in_channels: int,
        image_size: int,
        num_classes: int,
        policy: dict[str, Any],
        mean: list[float],
        std: list[float],
        options: dict[str, Any],
        optimizer: dict[str, Any],
        epochs: int,
        warmup_epochs: float,
        steps_per_epoch: int,
        seed: int,
        monitor: dict[str, Any],
    ) -> None:
        super().__init__()
        if method not in IMPLEMENTATIONS:
            raise ValueError(f"unknown pretraining method {method!r}; use one of {METHODS}")
        self.save_hyperparameters(logger=False)
        self.method = method
        self.implementation = IMPLEMENTATIONS[method]
        self.options = options
        config = BackboneConfig(**backbone)
        self.backbone = build_backbone(config, in_channels, image_size)
        dim = self.backbone.feature_dim
        self.augment = BatchAugment(policy, (image_size, image_size), in_channels, mean, std)
        self.normalize = BatchAugment({}, (image_size, image_size), in_channels, mean, std)
        build = Build(self.backbone, dim, options, config.width, in_channels, image_size)
        heads = self.implementation.heads(build)
        for name, head in heads.items():  # registered in the method's order: same init per seed
            setattr(self, name, head)
        self.teacher = self._teacher(getattr(self.implementation, "TEACHER", ()))
        self.probe = nn.Linear(dim, num_classes)
        # Convolutions run about a third faster in channels-last layout on this CPU (and with
        # bf16 on GPUs); the MLP flattens its input, so layout does not matter there.
        self.channels_last = self.backbone.has_gap
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.train_loss = MeanMetric()
        self.val_probe_acc = MulticlassAccuracy(num_classes, average="micro")
        self.history: list[dict[str, float]] = []
        # A method that steps its own optimizers (the GAN's alternating D and G steps) has a
        # training_step of its own; Lightning then leaves the stepping to it.
        self.automatic_optimization = not hasattr(self.implementation, "training_step")
        self._tracked: dict[str, list[torch.Tensor]] = {}  # a method's extra per-epoch monitors
        self.epoch_pictures: list[torch.Tensor] = []  # uint8 grids a method keeps per epoch
        self.images: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self._val_features: list[torch.Tensor] = []
        self.train_set = "train"  # the set batches come from ("pretrain": training + pool)
        self.has_unlabeled = False  # it holds pool images (label -1), which the probe skips
        self._teacher_step = 0  # the optimizer step the teacher last moved at

    def _teacher(self, names: tuple[str, ...]) -> nn.ModuleDict:
        """Copies of the student's modules ``names`` that a method declared as its teacher.

        They start equal to the student, take no gradient and are in no optimizer group; after
        every optimizer step :meth:`update_teacher` moves them towards the student. Being
        submodules, they are saved in and restored from checkpoints, so a resumed run continues
        the same teacher (``encoder.pt`` holds the student's backbone only).
        """
        for key in ("momentum_base", "momentum_final") if names else ():
            if key not in self.options:
                raise ValueError(
                    f"method {self.method!r} declares a teacher but pretrain.{self.method} has no "
                    f"{key}: add it to its params and schema sections"
                )
        teacher = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in names})
        teacher.requires_grad_(False)
        return teacher

    # ---------------------------------------------------------------- the method's view of it
    @property
    def step(self) -> int | None:
        """Optimizer steps taken so far; None outside a Trainer (fine-tuning's multi-task term)."""
        return self.trainer.global_step if self._trainer is not None else None

    @property
    def world_size(self) -> int:
        """Processes training together (1 outside a Trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def is_global_zero(self) -> bool:
        """Whether this is the first process (the one that logs)."""
        return self.global_rank == 0

    # ---------------------------------------------------------------- data on the device
    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        self.images = {name: t.to(self.device) for name, t in data.images.items()}
        self.labels = {name: t.to(self.device) for name, t in data.labels.items()}
        self.train_set = data.train_set
        self.has_unlabeled = bool((self.labels[self.train_set] < 0).any())

    def to_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the memory layout the encoder is fastest with."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _generator(self) -> torch.Generator:
        # Under DDP each rank draws its own views (rank 0 draws what one device would).
        seed = self.hparams.seed * 1_000_003 + self.global_step + (self.global_rank << 40)
        return torch.Generator(device=self.device).manual_seed(seed)

    def on_train_epoch_start(self) -> None:
        # Dropout and any other global-RNG user: same stream whether or not the run was resumed.
        torch.manual_seed(self.hparams.seed * 7919 + self.current_epoch)

    # ---------------------------------------------------------------- objectives
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        index = batch.to(self.device)
        images, labels = self.images[self.train_set][index], self.labels[self.train_set][index]
        own_step = getattr(self.implementation, "training_step", None)
        if own_step is not None:  # the method steps its optimizers itself; returns its loss
            self.train_loss.update(own_step(self, images, labels, self._generator()).detach())
            return None
        loss, features, probe_rows = self.objective(images, self._generator())
        self.train_loss.update(loss.detach())
        return loss + self.probe_loss(features, labels, probe_rows)

    def probe_loss(
        self, features: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The online probe's loss on detached features: labels never reach the encoder."""
        rows = self.every_row(features) if rows is None else rows
        features, labels = features.detach()[rows], labels[rows]
        if self.has_unlabeled:  # pool images (label -1) have nothing to teach the probe
            features, labels = features[labels >= 0], labels[labels >= 0]
            if not len(labels):  # a batch of pool images only: no loss, and no NaN weights
                return self.probe(features).sum()
        return F.cross_entropy(self.probe(features), labels)

    def track(self, **values: torch.Tensor) -> None:
        """Add a method's own monitors to this epoch's row (their epoch means), by name."""
        for name, value in values.items():
            self._tracked.setdefault(name, []).append(value.detach().float().mean())

    def objective(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(method loss, encoder features for the probe, which rows the probe may use)."""
        view = self.to_model_layout(self.augment(images, generator))
        return self.implementation.objective(self, images, view, generator)

    @staticmethod
    def every_row(images: torch.Tensor) -> torch.Tensor:
        """The probe may learn from every image of the batch."""
        return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)

    # ---------------------------------------------------------------- monitors
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of uint8 images (normalized, not augmented), in chunks, no grad."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.backbone(
                        self.to_model_layout(self.normalize(images[i : i + _FEATURE_CHUNK]))
                    ).float()
                    for i in range(0, images.shape[0], _FEATURE_CHUNK)
                ]
            )

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        index = batch.to(self.device)
        features = self.encode(self.images["val"][index])
        self.val_probe_acc.update(self.probe(features), self.labels["val"][index])
        self._val_features.append(features)

    def on_validation_epoch_end(self) -> None:
        monitor = self.hparams.monitor
        bank_size = min(monitor["knn_max_train"], self.images["train"].shape[0])
        bank = self.encode(self.images["train"][:bank_size])
        queries = torch.cat(self._val_features)
        self._val_features.clear()
        knn, _, _ = best_knn(
            bank,
            self.labels["train"][:bank_size],
            queries,
            self.labels["val"],
            monitor["knn_ks"],
            monitor["knn_temperatures"],
            self.probe.out_features,
        )
        row = {
            "epoch": float(self.current_epoch + 1),
            "train_loss": float(self.train_loss.compute())
            if self.train_loss.update_called
            else float("nan"),
            "val_knn_acc": knn,
            "val_probe_acc": float(self.val_probe_acc.compute()),
        }
        row.update(
            {name: float(torch.stack(values).mean()) for name, values in self._tracked.items()}
        )
        self._tracked.clear()
        epoch_end = getattr(self.implementation, "epoch_end", None)
        if epoch_end is not None:  # monitors of the model itself (the GAN's sample diversity)
            row.update(epoch_end(self))
        self.train_loss.reset()
        self.val_probe_acc.reset()
        self.history.append(row)
        self.log_dict({k: v for k, v in row.items() if k != "epoch"}, sync_dist=True)

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self) -> OptimizerLRScheduler:
        own = getattr(self.implementation, "configure_optimizers", None)
        if own is not None:  # a method with several optimizers (the GAN's D and G)
            return own(self)
        opt = self.hparams.optimizer
        monitor = self.hparams.monitor
        probe, teacher = set(self.probe.parameters()), set(self.teacher.parameters())
        groups = [
            {"params": [p for p in self.parameters() if p not in probe and p not in teacher]},
            {"params": list(probe), "lr": monitor["probe_lr"], "weight_decay": 0.0},
        ]
        optimizer = build_optimizer(
            groups, opt["name"], opt["lr"], opt["weight_decay"], opt["momentum"], opt["nesterov"]
        )
        steps = self.hparams.steps_per_epoch
        scheduler = warmup_cosine_scheduler(
            optimizer, round(self.hparams.warmup_epochs * steps), self.hparams.epochs * steps
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ---------------------------------------------------------------- the teacher
    def momentum(self, step: int) -> float:
        """The EMA coefficient after optimizer step ``step`` (0-based), cosine from
        ``momentum_base`` at the first step to ``momentum_final`` at the last (BYOL's schedule,
        docs/science.md §7.9): ``τ = final − (final − base)(cos(π k / K) + 1) / 2``."""
        base, final = self.options["momentum_base"], self.options["momentum_final"]
        total = max(1, self.hparams.epochs * self.hparams.steps_per_epoch - 1)
        progress = min(step, total) / total
        return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update_teacher(self, tau: float) -> None:
        """``teacher ← τ · teacher + (1 − τ) · student``, parameter by parameter.

        Buffers (batch-norm statistics) are the teacher's own, kept by its forward passes as in
        BYOL. Every rank applies the same update to identical weights, so DDP needs no extra
        communication for it.
        """
        for name, copy_ in self.teacher.items():
            student = getattr(self, name)
            for t, s in zip(copy_.parameters(), student.parameters(), strict=True):
                t.lerp_(s.detach(), 1.0 - tau)

    def reset_teacher(self) -> None:
        """Make the teacher equal to the student again (after the student's modules changed)."""
        for name, copy_ in self.teacher.items():
            copy_.load_state_dict(getattr(self, name).state_dict())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step (Lightning calls this hook after it); with gradient
        # accumulation only batches that ended with a step move the teacher.
        if len(self.teacher) and self.global_step != self._teacher_step:
            self._teacher_step = self.global_step
            self.update_teacher(self.momentum(self.global_step - 1))

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["history"] = list(self.history)
        if self.epoch_pictures:
            checkpoint["epoch_pictures"] = list(self.epoch_pictures)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("history", []))
        self.epoch_pictures = list(checkpoint.get("epoch_pictures", []))

    # ---------------------------------------------------------------- pictures
    def pictures(self, images: torch.Tensor, count: int, seed: int) -> dict[str, torch.Tensor]:
        """The method's pictures for the report (uint8, N x C x H x W); {} if it has none."""
        draw = getattr(self.implementation, "pictures", None)
        return draw(self, images, count, seed) if draw is not None else {}

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images back to uint8 pixels."""
        pixels = x * self.normalize.std.to(x.device) + self.normalize.mean.to(x.device)
        return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


class PCAEncoder(nn.Module):
    """The linear baseline: features = top principal components of the normalized pixels.

    Fitted in closed form on the training split only (eigenvectors of the sample covariance, the
    maximum-likelihood subspace of probabilistic PCA, Tipping & Bishop 1999).
    """

    has_gap = False

    def __init__(self, input_dim: int, components: int) -> None:
        super().__init__()
        self.feature_dim = components
        self.register_buffer("mean", torch.zeros(input_dim))
        # A parameter, so fine-tuning can adapt the projection (the linear probe freezes it).
        self.components = nn.Parameter(torch.zeros(components, input_dim))
        self.register_buffer("explained_variance", torch.zeros(components))

    def fit(self, x: torch.Tensor) -> PCAEncoder:
        """``x``: N x D float (normalized, flattened) training images."""
        x = x.double()
        mean = x.mean(0)
        centered = x - mean
        covariance = centered.T @ centered / max(1, x.shape[0] - 1)
        values, vectors = torch.linalg.eigh(covariance)  # ascending
        order = values.argsort(descending=True)[: self.feature_dim]
        vectors = vectors[:, order].T
        # A fixed sign per component (largest entry positive) makes the fit reproducible.
        signs = vectors.gather(1, vectors.abs().argmax(1, keepdim=True)).sign()
        self.mean.copy_(mean.float())
        with torch.no_grad():
            self.components.copy_((vectors * signs).float())
        self.explained_variance.copy_(values[order].float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) @ self.components.T


class PixelsEncoder(nn.Module):
    """The raw-pixel baseline: features = the normalized pixels, flattened; no parameters.

    A self-supervised encoder is only worth its cost if its features beat these
    (docs/science.md §8.6): kNN and a linear classifier on pixels are the floor the study
    measures against.
    """

    has_gap = False

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.feature_dim = input_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.feature_dim:
            raise ValueError(
                f"the pixels encoder was built for {self.feature_dim} values per image, got "
                f"{tuple(x.shape)}"
            )
        return x.flatten(1)
