"""Rotation prediction (Gidaris et al. 2018): which of 0/90/180/270 degrees a view was turned by.

A four-way classifier on the encoder's features; to tell the rotations apart the encoder has to
learn where objects' tops and bottoms are. The online probe sees upright images only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import rotate90

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.methods._contract import Build, Context

NAME = "rotation"


def heads(build: Build) -> dict[str, nn.Module]:
    return {"head": nn.Linear(build.dim, 4)}


def objective(
    module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rotated, quarter = rotate90(view, generator)
    features = module.backbone(module.to_model_layout(rotated))
    loss = F.cross_entropy(module.head(features).float(), quarter)
    return loss, features, quarter == 0
