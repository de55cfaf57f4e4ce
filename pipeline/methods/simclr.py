"""SimCLR (Chen et al. 2020): two augmented views of each image, a projection head, NT-Xent.

The views' features go through a two-layer projection (docs/science.md §7.2); the
loss pulls the two views of one image together against the other 2N - 2 views of the batch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.models.losses import nt_xent, nt_xent_negatives

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.methods._contract import Build, Context

NAME = "simclr"
log = logging.getLogger(__name__)


def heads(build: Build) -> dict[str, nn.Module]:
    hidden = build.options["projection_hidden"]
    return {
        "head": nn.Sequential(
            nn.Linear(build.dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, build.options["projection_dim"]),
        )
    }


def objective(
    module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    second = module.to_model_layout(module.augment(images, generator))
    features = module.backbone(torch.cat([view, second]))
    z1, z2 = module.head(features).float().chunk(2)
    options = module.options
    loss = nt_xent(z1, z2, options["temperature"], options["normalization"])
    if module.step == 0 and module.is_global_zero:
        # Logged once: the number of negatives, not the per-device batch, is what SimCLR's
        # results depend on, and under DDP it comes from the other ranks too.
        log.info(
            "NT-Xent: %d negatives per anchor (%d images on each of %d processes)",
            nt_xent_negatives(z1.shape[0]),
            z1.shape[0],
            module.world_size,
        )
    return loss, features[: images.shape[0]], module.every_row(images)
