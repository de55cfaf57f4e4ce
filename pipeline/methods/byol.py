"""BYOL (Grill et al. 2020): a student learns to predict a slowly moving teacher; no negatives.

Two views of each image. The student (encoder, projector, predictor) predicts, from one view,
the teacher's projection of the other; the teacher (encoder and projector) is an exponential
moving average of the student, declared in ``TEACHER`` and kept by the generic module
(docs/science.md §7.9). The loss is the squared distance between the L2-normalized prediction
and target, ``2 − 2 cos(p, z')``, for both orderings of the views. Nothing stops the student
from collapsing onto a constant but the predictor and the teacher's lag: that they do is the
paper's finding, and the kNN monitor shows it each epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.methods._contract import Build, Context

NAME = "byol"
#: The student's modules the generic module keeps an EMA copy of (module.teacher[name]).
TEACHER = ("backbone", "head")


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear, batch norm, ReLU, Linear."""
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, outputs),
    )


def heads(build: Build) -> dict[str, nn.Module]:
    hidden, dim = build.options["projection_hidden"], build.options["projection_dim"]
    return {"head": _mlp(build.dim, hidden, dim), "predictor": _mlp(dim, hidden, dim)}


def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``‖p/‖p‖ − z/‖z‖‖² = 2 − 2 cos(p, z)``: 0 when they point the same
    way, 4 when opposite. The target carries no gradient (the teacher's side)."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


def objective(
    module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    second = module.to_model_layout(module.augment(images, generator))
    both = torch.cat([view, second])
    features = module.backbone(both)
    p1, p2 = module.predictor(module.head(features)).float().chunk(2)
    with torch.no_grad():
        z1, z2 = module.teacher["head"](module.teacher["backbone"](both)).float().chunk(2)
    loss = normalized_mse(p1, z2) + normalized_mse(p2, z1)  # symmetrised, as in the paper
    return loss, features[: images.shape[0]], module.every_row(images)
