"""Generative adversarial network (Goodfellow et al. 2014), DCGAN-style (Radford et al. 2015).

The discriminator is the study's backbone with a real/fake head, so the encoder fine-tuning
starts from is the discriminator's body; Radford et al. showed that those features transfer to
classification. The generator maps ``z ~ N(0, I)`` through a transposed-convolution stack to an
image. D and G take alternating steps under one Trainer (Lightning's manual optimization), each
with its own Adam and its own settings (``pretrain.gan.discriminator``, ``.generator``).

The game (docs/science.md §7.7): ``min_G max_D E_x[ln D(x)] + E_z[ln(1 − D(G(z)))]``. D ascends it,
i.e. minimizes ``BCE(D(x), 1) + BCE(D(G(z)), 0)``. For G, ``generator_loss``:

- ``non_saturating`` (the default) minimizes ``−ln D(G(z))``: the same fixed point, but a strong
  gradient when D confidently rejects the samples, which is where training starts;
- ``minimax`` minimizes ``ln(1 − D(G(z)))``, the course's form, whose gradient vanishes there.

Monitors per epoch, beside the kNN and probe every method has: D's and G's losses, the mean
D(x) and D(G(z)), and the diversity of 64 samples from a fixed ``z`` (their mean pairwise
distance over that of 64 validation images). A warning is logged when the diversity falls
below ``collapse_ratio``: a generator that maps every ``z`` to a few images (mode collapse).
The MLP backbone works too: the generator does not depend on it, and an MLP discriminator is
the original paper's.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pipeline.models.pretrain imports every method: typed here, imported there
    from pipeline.methods._contract import Build, Context

NAME = "gan"
#: The picture grids the report shows (pictures() also saves ``samples_by_epoch``).
PICTURES = ("samples",)
PICTURES_CAPTION = (
    "GAN: the generator's samples from a fixed z after the last epoch, the "
    "first 32 of 64 (models/pretrain/gan/samples.npy; samples_by_epoch.npy "
    "holds 8 per epoch, from the same z)."
)
#: The grid of the model's own samples, shown beside the other generative models'.
SAMPLES = "samples"
#: Its own per-epoch monitors, as columns of metrics/pretrain/gan.csv.
CURVES = ("d_loss", "g_loss", "d_real", "d_fake", "sample_diversity")

log = logging.getLogger(__name__)
_FIXED = 64  # samples from the fixed z: the diversity monitor and the last picture
_PER_EPOCH = 8  # of those, kept per epoch


class Generator(nn.Module):
    """``z`` -> Linear -> ``4w x s/4 x s/4`` -> BN -> ReLU -> ConvTranspose(4, stride 2) -> BN ->
    ReLU -> ConvTranspose(4, stride 2) -> tanh: pixels in [0, 1] after ``(x + 1) / 2``.

    DCGAN's choices: transposed convolutions, batch norm in every layer but the output, ReLU,
    tanh output, weights from N(0, 0.02). A size that is not a multiple of 4 is built at
    ``4 * ceil(s / 4)`` and centre-cropped.
    """

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, width: int) -> None:
        super().__init__()
        self.latent_dim, self.image_size = latent_dim, image_size
        start = math.ceil(image_size / 4)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 4 * width * start * start, bias=False),
            nn.Unflatten(1, (4 * width, start, start)),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, out_channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up(self.project(z))
        excess = x.shape[-1] - self.image_size
        if excess:
            top = excess // 2
            x = x[..., top : top + self.image_size, top : top + self.image_size]
        return (x + 1) / 2


def heads(build: Build) -> dict[str, nn.Module]:
    return {
        "head": nn.Linear(build.dim, 1),  # real/fake logit on the backbone's features
        "generator": Generator(
            build.options["latent_dim"], build.in_channels, build.image_size, build.width
        ),
    }


# ------------------------------------------------------------------------------ the game


def discriminate(module: Context, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D's logits, the backbone's features) for normalized images."""
    features = module.backbone(module.to_model_layout(images))
    return module.head(features).float().squeeze(1), features


def fake_images(module: Context, z: torch.Tensor) -> torch.Tensor:
    """G(z), normalized like the real images D sees."""
    pixels = module.generator(z).float()
    return (pixels - module.normalize.mean.to(pixels)) / module.normalize.std.to(pixels)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``−E[ln D(x)] − E[ln(1 − D(G(z)))]``: D's side of the game, as two cross-entropies."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor, form: str = "non_saturating") -> torch.Tensor:
    """``−E[ln D(G(z))]`` (non_saturating) or ``E[ln(1 − D(G(z)))]`` (minimax)."""
    if form == "non_saturating":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if form == "minimax":
        return -F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    raise ValueError(f"unknown generator loss {form!r}; use non_saturating or minimax")


def latent(module: Context, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(
        count, module.options["latent_dim"], generator=generator, device=module.device
    )


# ------------------------------------------------------------------------------ training


def configure_optimizers(module: Context) -> list[torch.optim.Optimizer]:
    """Adam for D (the backbone and the real/fake head; the probe in a group of its own) and
    Adam for G, each with ``lr``, ``beta1``, ``beta2`` from its own section. No schedule: a
    constant rate, as in DCGAN; ``pretrain.optimizer`` and ``warmup_epochs`` do not apply."""
    d, g = module.options["discriminator"], module.options["generator"]
    generator = set(module.generator.parameters())
    probe = set(module.probe.parameters())
    body = [p for p in module.parameters() if p not in generator and p not in probe]
    d_optimizer = torch.optim.Adam(
        [{"params": body}, {"params": list(probe), "lr": module.hparams.monitor["probe_lr"]}],
        lr=d["lr"],
        betas=(d["beta1"], d["beta2"]),
    )
    g_optimizer = torch.optim.Adam(
        module.generator.parameters(), lr=g["lr"], betas=(g["beta1"], g["beta2"])
    )
    return [d_optimizer, g_optimizer]


def training_step(
    module: Context, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """One D step on a real batch and as many fakes, then one G step against the updated D.

    Returns D's loss (reported as ``train_loss``: the encoder is D's body).
    """
    d_optimizer, g_optimizer = module.optimizers()
    real = module.augment(images, generator)
    fake = fake_images(module, latent(module, images.shape[0], generator))

    real_logits, features = discriminate(module, real)
    fake_logits, _ = discriminate(module, fake.detach())
    d_loss = discriminator_loss(real_logits, fake_logits)
    d_optimizer.zero_grad()
    module.manual_backward(d_loss + module.probe_loss(features, labels))
    d_optimizer.step()

    g_logits, _ = discriminate(module, fake)
    g_loss = generator_loss(g_logits, module.options["generator_loss"])
    g_optimizer.zero_grad()
    module.manual_backward(g_loss)
    g_optimizer.step()

    module.track(
        d_loss=d_loss,
        g_loss=g_loss,
        d_real=torch.sigmoid(real_logits),
        d_fake=torch.sigmoid(fake_logits),
    )
    return d_loss


def objective(
    module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D's loss against the generator's samples (detached: G does not learn from it).

    Training uses :func:`training_step`; this is the method's loss as a fine-tuning multi-task
    term (``finetune.multitask_weight``), where the pretrained G supplies the fakes.
    """
    with torch.no_grad():
        fake = fake_images(module, latent(module, images.shape[0], generator))
    real_logits, features = discriminate(module, view)
    fake_logits, _ = discriminate(module, fake)
    return discriminator_loss(real_logits, fake_logits), features, module.every_row(images)


# ------------------------------------------------------------------------------ monitors


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean L2 distance between distinct images of a batch (pixels in [0, 1]); 0 if all equal."""
    flat = images.flatten(1).double()
    count = flat.shape[0]
    if count < 2:
        return 0.0
    return float(torch.cdist(flat, flat).sum() / (count * (count - 1)))


def samples(module: Context, count: int, seed: int) -> torch.Tensor:
    """G's images (pixels in [0, 1]) for ``count`` latents drawn from ``seed``.

    Drawn by a copy of G in training mode: its batch statistics, as during training, and no
    change to the running statistics of the G that trains on.
    """
    draw = torch.Generator(device=module.device).manual_seed(seed)
    z = latent(module, count, draw)
    with torch.no_grad():
        return copy.deepcopy(module.generator).train()(z).float().clamp(0, 1)


def epoch_end(module: Context) -> dict[str, float]:
    """The diversity of the fixed-z samples relative to real images; a warning on collapse."""
    fixed = samples(module, _FIXED, module.hparams.seed)
    real = module.images["val"][:_FIXED].float() / 255
    diversity = mean_pairwise_distance(fixed) / max(mean_pairwise_distance(real), 1e-12)
    module.epoch_pictures.append((fixed[:_PER_EPOCH] * 255).round().to(torch.uint8).cpu())
    threshold = module.options["collapse_ratio"]
    if diversity < threshold:
        log.warning(
            "gan: the samples' diversity fell to %.3f of the real images' at epoch %d (below "
            "pretrain.gan.collapse_ratio = %s): the generator may have collapsed onto a few "
            "images; try a lower generator lr or fewer epochs",
            diversity,
            module.current_epoch + 1,
            threshold,
        )
    return {"sample_diversity": diversity}


def pictures(
    module: Context, images: torch.Tensor, count: int, seed: int
) -> dict[str, torch.Tensor]:
    """uint8 grids (N x C x H x W): the last epoch's fixed-z samples, and 8 per epoch."""
    last = (samples(module, count, seed) * 255).round().to(torch.uint8).cpu()
    by_epoch = torch.cat(module.epoch_pictures) if module.epoch_pictures else last[:0]
    return {"samples": last, "samples_by_epoch": by_epoch}
