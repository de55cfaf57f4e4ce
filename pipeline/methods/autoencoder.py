"""Autoencoder: a bottleneck decoder reconstructs the view from its features (MSE or L1).

With ``noise_std`` > 0 it is a denoising autoencoder (Vincent et al. 2008): the encoder sees the
view plus Gaussian noise and the decoder has to reconstruct the clean view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbones import build_decoder

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.methods._contract import Build, Context

NAME = "autoencoder"


def heads(build: Build) -> dict[str, nn.Module]:
    return {"decoder": build_decoder(build.dim, build.in_channels, build.image_size, build.width)}


def objective(
    module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    noisy = view
    if module.options["noise_std"] > 0:
        noise = torch.randn(view.shape, generator=generator, device=generator.device)
        noisy = view + module.options["noise_std"] * noise.to(view.device)
    features = module.backbone(noisy)
    reconstruction = module.decoder(features).float()
    distance = F.mse_loss if module.options["loss"] == "mse" else F.l1_loss
    return distance(reconstruction, view), features, module.every_row(images)
