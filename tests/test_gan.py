"""The GAN plug-in: each player's step does its job, collapse is noticed, the stage's outputs.

The stage's outputs and resume after an interruption are tested with the other methods in
tests/test_pretrain.py, the report's pictures in tests/test_visualize.py, and a run through
Snakemake in tests/test_runners.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.methods import gan
from pipeline.models.pretrain import PretrainModule
from tests.test_pretrain import METHOD_OPTIONS, _module


def _gan(backbone: str = "lenet5", size: int = 16, **options) -> PretrainModule:
    torch.manual_seed(0)
    module = _module("gan", {**METHOD_OPTIONS["gan"], **options}, size=size)
    if backbone != "lenet5":
        module = PretrainModule(**{**module.hparams, "backbone": {"name": backbone, "width": 8}})
    return module


def _real(size: int = 16) -> torch.Tensor:
    """Fixed normalized real images with structure to find: a bright square on noise."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 128, (16, 1, size, size), dtype=torch.uint8, generator=generator)
    images[:, :, 4:12, 4:12] = 255
    return (images.float() / 255 - 0.5) / 0.25


def test_one_discriminator_step_lowers_its_loss_on_fixed_real_and_fake_batches():
    module = _gan()
    real = _real()
    fake = gan.fake_images(module, gan.latent(module, 16, torch.Generator().manual_seed(1)))
    fake = fake.detach()
    d_optimizer, _ = gan.configure_optimizers(module)

    def loss() -> torch.Tensor:
        return gan.discriminator_loss(
            gan.discriminate(module, real)[0], gan.discriminate(module, fake)[0]
        )

    before = loss()
    d_optimizer.zero_grad()
    before.backward()
    d_optimizer.step()
    assert loss().item() < before.item()
    assert module.generator.project[0].weight.grad is None  # fakes were detached: G untouched


@pytest.mark.parametrize("form", ["non_saturating", "minimax"])
def test_one_generator_step_raises_d_of_g_z_for_a_fixed_discriminator(form: str):
    module = _gan()
    z = gan.latent(module, 16, torch.Generator().manual_seed(1))
    _, g_optimizer = gan.configure_optimizers(module)
    d_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}

    def d_of_g_z() -> torch.Tensor:
        return torch.sigmoid(gan.discriminate(module, gan.fake_images(module, z))[0]).mean()

    before = d_of_g_z()
    g_optimizer.zero_grad()
    gan.generator_loss(gan.discriminate(module, gan.fake_images(module, z))[0], form).backward()
    g_optimizer.step()
    assert d_of_g_z().item() > before.item()
    for name, tensor in module.backbone.state_dict().items():
        if "running" not in name and "num_batches" not in name:  # BN statistics do move
            torch.testing.assert_close(tensor, d_before[name], rtol=0, atol=0, msg=name)


def test_the_non_saturating_loss_keeps_its_gradient_where_d_rejects_the_samples():
    """Why the default: at D(G(z)) ~ 0 the minimax gradient vanishes (docs/science.md §7.7)."""
    logits = torch.tensor([-8.0], requires_grad=True)  # D(G(z)) = 0.0003
    gan.generator_loss(logits, "minimax").backward()
    minimax = logits.grad.abs().item()
    logits.grad = None
    gan.generator_loss(logits, "non_saturating").backward()
    assert minimax < 1e-3 and logits.grad.abs().item() > 0.99
    with pytest.raises(ValueError, match="unknown generator loss 'wgan'"):
        gan.generator_loss(logits, "wgan")


@pytest.mark.parametrize(
    "backbone, size",
    [("lenet5", 16), ("mlp", 10), ("vgg", 16), ("inception", 16), ("resnet18", 16)],
)
def test_every_backbone_is_a_discriminator_and_the_samples_have_the_images_shape(
    backbone: str, size: int
):
    module = _gan(backbone, size)
    fake = gan.fake_images(module, gan.latent(module, 4, torch.Generator().manual_seed(0)))
    logits, features = gan.discriminate(module, fake)
    assert fake.shape == (4, 1, size, size) and logits.shape == (4,)
    assert features.shape == (4, module.backbone.feature_dim)
    pixels = gan.samples(module, 4, seed=0)
    assert pixels.min() >= 0 and pixels.max() <= 1
    torch.testing.assert_close(gan.samples(module, 4, seed=0), pixels)  # fixed z: same images


def test_a_collapsed_generator_is_noticed(caplog: pytest.LogCaptureFixture):
    module = _gan()
    module.images = {"val": torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)}
    output = module.generator.up[-2].weight
    with torch.no_grad():  # a generator whose samples differ as much as the images do
        output.mul_(50)
    with caplog.at_level(logging.WARNING, logger="pipeline.methods.gan"):
        healthy = gan.epoch_end(module)["sample_diversity"]
    assert healthy > 0.3 and not caplog.records
    with torch.no_grad():  # every z to the same image: the output layer ignores its input
        output.zero_()
    with caplog.at_level(logging.WARNING, logger="pipeline.methods.gan"):
        collapsed = gan.epoch_end(module)["sample_diversity"]
    assert collapsed == pytest.approx(0.0, abs=1e-6)
    assert "may have collapsed" in caplog.text and "collapse_ratio" in caplog.text
    assert len(module.epoch_pictures) == 2 and module.epoch_pictures[0].dtype == torch.uint8
    assert gan.mean_pairwise_distance(torch.ones(3, 1, 2, 2)) == 0.0
    assert gan.mean_pairwise_distance(torch.tensor([[0.0], [1.0]])) == pytest.approx(1.0)
