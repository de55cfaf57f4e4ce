"""Supervised training on a labeled subset: the linear probe and full fine-tuning.

- ``linear``: the encoder is frozen; its features of the (unaugmented) labeled images are
  computed once and a linear classifier is trained on them (SCIENCE.md, "Transfer").
- ``finetune``: every layer trains on augmented batches (the supervised policy), the encoder at
  ``lr x encoder_lr_scale``.

Both minimize cross-entropy (with optional label smoothing) + an L1 penalty ``λ Σ|w|`` (weight
decay supplies L2) + optionally ``multitask_weight x`` a self-supervised loss on the same batch.
Validation accuracy is computed every epoch; the best epoch's weights are kept in memory and
returned (early stopping is Lightning's EarlyStopping callback on the same number).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from pipeline.augment import BatchAugment
from pipeline.models.classifier import LinearClassifier
from pipeline.models.optim import build_optimizer, warmup_cosine_scheduler

_CHUNK = 2048


class FinetuneModule(L.LightningModule):
    """Trains a LinearClassifier; keeps the weights of its best validation epoch."""

    def __init__(
        self,
        classifier: LinearClassifier,
        mode: str,
        policy: dict[str, Any],
        mean: list[float],
        std: list[float],
        image_size: int,
        in_channels: int,
        optimizer: dict[str, Any],
        encoder_lr_scale: float,
        l1: float,
        label_smoothing: float,
        epochs: int,
        steps_per_epoch: int,
        seed: int,
        ssl: Any = None,
        multitask_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("linear", "finetune"):
            raise ValueError(f"unknown fine-tuning mode {mode!r}; use linear or finetune")
        self.save_hyperparameters(ignore=["classifier", "ssl"], logger=False)
        self.classifier = classifier
        self.mode = mode
        self.ssl = ssl  # a PretrainModule sharing the encoder, for the multi-task loss
        size = (image_size, image_size)
        self.augment = BatchAugment(policy, size, in_channels, mean, std)
        self.normalize = BatchAugment({}, size, in_channels, mean, std)
        self.val_acc = MulticlassAccuracy(classifier.head.out_features, average="micro")
        self.train_loss = MeanMetric()
        if mode == "linear":
            for parameter in self.classifier.encoder.parameters():
                parameter.requires_grad_(False)
        self.best_acc = -1.0
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.features: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ data
    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        self.images = {k: v.to(self.device) for k, v in data.images.items()}
        self.labels = {k: v.to(self.device) for k, v in data.labels.items()}
        self.train_set = data.train_set
        if self.mode == "linear":  # frozen encoder: its features never change
            self.classifier.encoder.eval()
            self.features = {k: self._encode(v) for k, v in self.images.items()}

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(self.hparams.seed * 7919 + self.current_epoch)
        if self.mode == "linear":
            self.classifier.encoder.eval()  # keep BN statistics frozen too

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([
                self.classifier.encoder(self.normalize(images[i : i + _CHUNK])).float()
                for i in range(0, images.shape[0], _CHUNK)
            ])  # fmt: skip

    # ------------------------------------------------------------------ training
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        index = batch.to(self.device)
        labels = self.labels[self.train_set][index]
        if self.mode == "linear":
            features = self.features[self.train_set][index]
            logits = self.classifier.head(self.classifier.dropout(features))
            images = None
        else:
            images = self.images[self.train_set][index]
            generator = torch.Generator(device=self.device).manual_seed(
                self.hparams.seed * 1_000_003 + self.global_step
            )
            logits = self.classifier.logits(self.augment(images, generator))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        if self.hparams.l1 > 0:
            weights = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() > 1]
            loss = loss + self.hparams.l1 * sum(w.abs().sum() for w in weights)
        if self.ssl is not None and self.hparams.multitask_weight > 0 and images is not None:
            generator = torch.Generator(device=self.device).manual_seed(
                self.hparams.seed * 1_000_033 + self.global_step
            )
            ssl_loss = self.ssl.objective(images, generator)[0]
            loss = loss + self.hparams.multitask_weight * ssl_loss
        self.train_loss.update(loss.detach())
        return loss

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        index = batch.to(self.device)
        if self.mode == "linear":
            logits = self.classifier.head(self.features["val"][index])
        else:
            logits = self.classifier.logits(self.normalize(self.images["val"][index]))
        self.val_acc.update(logits, self.labels["val"][index])

    def on_validation_epoch_end(self) -> None:
        accuracy = float(self.val_acc.compute())
        self.val_acc.reset()
        train_loss = float(self.train_loss.compute())
        self.train_loss.reset()
        self.log("val_acc", accuracy)
        self.log("train_loss", train_loss)
        self.history.append({"epoch": float(self.current_epoch + 1), "train_loss": train_loss,
                             "val_acc": accuracy})  # fmt: skip
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
            "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            "best_state": self.best_state, "history": list(self.history),
            "stopped": bool(self.trainer.should_stop),
        }  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restore(checkpoint["finetune"])

    def restore(self, saved: dict[str, Any]) -> None:
        self.best_acc = float(saved["best_acc"])
        self.best_epoch = int(saved["best_epoch"])
        self.best_state = dict(saved["best_state"])
        self.history = list(saved["history"])

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.hparams.optimizer
        head = list(self.classifier.head.parameters())
        groups = [{"params": head}]
        if self.mode == "finetune":
            encoder = list(self.classifier.encoder.parameters())
            groups.append({"params": encoder, "lr": opt["lr"] * self.hparams.encoder_lr_scale})
            if self.ssl is not None:
                shared = {id(p) for p in encoder}
                extra = [p for p in self.ssl.parameters() if id(p) not in shared]
                groups.append({"params": extra})
        optimizer = build_optimizer(groups, opt["name"], opt["lr"], opt["weight_decay"],
                                    opt["momentum"], opt["nesterov"])  # fmt: skip
        steps = self.hparams.steps_per_epoch
        scheduler = warmup_cosine_scheduler(optimizer, 0, self.hparams.epochs * steps)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
