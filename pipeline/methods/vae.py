"""Variational autoencoder (Kingma & Welling 2014): Gaussian encoder and decoder, negative ELBO.

The encoder's features give the posterior's mean and log-variance; a sample through the
reparameterization trick is decoded, and the loss is reconstruction plus beta times the KL
divergence to N(0, I). Its pictures: validation images, their reconstructions and prior samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.models.backbones import build_decoder
from pipeline.models.losses import negative_elbo, reparameterize

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.methods._contract import Build, Context

NAME = "vae"
#: The picture grids it saves (pictures()) and the report shows, top to bottom.
PICTURES = ("originals", "reconstructions", "samples")
PICTURES_CAPTION = (
    "VAE: validation images, their reconstructions (decoder of the posterior "
    "mean), and samples decoded from the prior N(0, I)."
)
#: The grid of the model's own samples, shown beside the other generative models'.
SAMPLES = "samples"


def heads(build: Build) -> dict[str, nn.Module]:
    latent = build.options["latent_dim"]
    return {
        "head": nn.Linear(build.dim, 2 * latent),  # mean and log-variance
        "decoder": build_decoder(latent, build.in_channels, build.image_size, build.width),
    }


def objective(
    module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = module.backbone(view)
    mu, logvar = module.head(features).float().chunk(2, dim=1)
    z = reparameterize(mu, logvar, generator)
    loss, _, _ = negative_elbo(module.decoder(z).float(), view, mu, logvar, module.options["beta"])
    return loss, features, module.every_row(images)


def pictures(
    module: Context, images: torch.Tensor, count: int, seed: int
) -> dict[str, torch.Tensor]:
    """uint8 grids (N x C x H x W): the images, their reconstructions, samples from the prior."""
    generator = torch.Generator(device=module.device).manual_seed(seed)
    latent = module.options["latent_dim"]
    with torch.no_grad():
        z = torch.randn(count, latent, generator=generator, device=module.device)
        samples = module.decoder(z).float()
        features = module.backbone(module.to_model_layout(module.normalize(images)))
        mu, _ = module.head(features).float().chunk(2, dim=1)
        reconstructions = module.decoder(mu).float()
    return {
        "originals": images.cpu(),
        "reconstructions": module.to_uint8(reconstructions),
        "samples": module.to_uint8(samples),
    }
