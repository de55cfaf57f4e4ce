"""Inpainting (Pathak et al. 2016): reconstruct a hidden square of the view from its context.

The loss is the squared error on the hidden region only, so the encoder is paid for inferring
what it cannot see, not for copying what it can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.augment import mask_region
from pipeline.methods.autoencoder import heads  # noqa: F401 (the same decoder)

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.methods._contract import Context

NAME = "inpainting"


def objective(
    module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    masked, hidden = mask_region(view, module.options["mask_size"], generator)
    features = module.backbone(module.to_model_layout(masked))
    error = (module.decoder(features).float() - view) ** 2 * hidden
    loss = error.sum() / (hidden.sum() * view.shape[1]).clamp(min=1)
    return loss, features, module.every_row(images)
