"""Autoencoder: a bottleneck decoder reconstructs the view from its features (MSE or L1).

With ``noise_std`` > 0 it is a denoising autoencoder (Vincent et al. 2008): the encoder sees the
view plus Gaussian noise and the decoder has to reconstruct the clean view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbones import build_decoder

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.models.pretrain import PretrainModule

NAME = "autoencoder"


def heads(
    dim: int, options: dict[str, Any], width: int, in_channels: int, image_size: int
) -> dict[str, nn.Module]:
    return {"decoder": build_decoder(dim, in_channels, image_size, width)}


def objective(
    module: PretrainModule, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    noisy = view
    if module.options["noise_std"] > 0:
        noise = torch.randn(view.shape, generator=generator, device=generator.device)
        noisy = view + module.options["noise_std"] * noise.to(view.device)
    features = module.backbone(noisy)
    reconstruction = module.decoder(features).float()
    distance = F.mse_loss if module.options["loss"] == "mse" else F.l1_loss
    return distance(reconstruction, view), features, module.every_row(images)
