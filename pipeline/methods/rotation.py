"""Rotation prediction (Gidaris et al. 2018): which of 0/90/180/270 degrees a view was turned by.

A four-way classifier on the encoder's features; to tell the rotations apart the encoder has to
learn where objects' tops and bottoms are. The online probe sees upright images only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import rotate90

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.models.pretrain import PretrainModule

NAME = "rotation"


def heads(
    dim: int, options: dict[str, Any], width: int, in_channels: int, image_size: int
) -> dict[str, nn.Module]:
    return {"head": nn.Linear(dim, 4)}


def objective(
    module: PretrainModule, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rotated, quarter = rotate90(view, generator)
    features = module.backbone(module.to_model_layout(rotated))
    loss = F.cross_entropy(module.head(features).float(), quarter)
    return loss, features, quarter == 0
