"""Behaviour of pipeline.augment: batched per-image augmentation and pretext-task helpers.

Each test states one property the rest of the pipeline relies on. Batches are small so the
whole file runs in a few seconds on a 2-core CPU.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipeline.augment import (
    TRANSFORMS,
    BatchAugment,
    PolicyError,
    mask_region,
    rotate90,
    validate_policy,
)

SSL_POLICY: dict[str, dict[str, Any]] = {
    "random_resized_crop": {"p": 1.0, "scale": [0.2, 1.0], "ratio": [0.75, 1.3333]},
    "hflip": {"p": 0.5},
    "vflip": {"p": 0.0},
    "rotation": {"p": 0.5, "degrees": 15},
    "affine": {"p": 0.5, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "degrees": 0},
    "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "grayscale": {"p": 0.2},
    "gaussian_blur": {"p": 0.5, "kernel_size": 3, "sigma": [0.1, 2.0]},
    "gaussian_noise": {"p": 0.0, "std": 0.05},
    "random_erasing": {"p": 0.25, "scale": [0.02, 0.2], "ratio": [0.3, 3.3], "value": 0.0},
}
FMNIST = {"image_size": (28, 28), "channels": 1, "mean": [0.286], "std": [0.353]}
CIFAR = {
    "image_size": (32, 32),
    "channels": 3,
    "mean": [0.49, 0.48, 0.45],
    "std": [0.25, 0.24, 0.26],
}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=seeded(seed)
    )


def normalize(images: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """The plain normalization BatchAugment must reduce to when nothing is applied."""
    mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"]).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def only(name: str, **options: Any) -> dict[str, dict[str, Any]]:
    """A policy with a single transform; `options` override the SSL policy's entry."""
    return {name: {**SSL_POLICY[name], **options}}


@pytest.mark.parametrize("spec", [FMNIST, CIFAR], ids=["fmnist", "cifar"])
def test_output_is_normalized_float32_of_same_shape(spec: dict[str, Any]) -> None:
    size = spec["image_size"][0]
    images = random_images(64, spec["channels"], size)
    out = BatchAugment(SSL_POLICY, **spec)(images, seeded(0))
    assert out.shape == images.shape
    assert out.dtype == torch.float32
    assert out.device == images.device
    pixels = out * torch.tensor(spec["std"]).view(1, -1, 1, 1) + torch.tensor(spec["mean"]).view(
        1, -1, 1, 1
    )
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # back in [0, 1] image units


def test_input_batch_is_not_modified() -> None:
    images = random_images(32, 3, 32)
    before = images.clone()
    BatchAugment(SSL_POLICY, **CIFAR)(images, seeded(0))
    assert torch.equal(images, before)


def test_same_seed_same_output_and_different_seed_different_output() -> None:
    augment = BatchAugment(SSL_POLICY, **CIFAR)
    images = random_images(32, 3, 32)
    first = augment(images, seeded(7))
    assert torch.equal(first, augment(images, seeded(7)))
    assert not torch.allclose(first, augment(images, seeded(8)))


def test_each_image_gets_its_own_parameters() -> None:
    augment = BatchAugment(SSL_POLICY, **FMNIST)
    same_image = random_images(1, 1, 28).expand(16, -1, -1, -1).contiguous()
    out = augment(same_image, seeded(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 16


@pytest.mark.parametrize(
    "policy",
    [{}, {name: {**SSL_POLICY[name], "p": 0.0} for name in TRANSFORMS}],
    ids=["empty", "all_p0"],
)
def test_probability_zero_everywhere_is_plain_normalization(policy: dict) -> None:
    images = random_images(32, 3, 32)
    out = BatchAugment(policy, **CIFAR)(images, seeded(0))
    torch.testing.assert_close(out, normalize(images, CIFAR), atol=1e-6, rtol=0)


def asymmetric_pattern(n: int = 4) -> torch.Tensor:
    """Every pixel distinct, so any misplaced pixel is caught."""
    return torch.arange(n * 28 * 28).remainder(251).to(torch.uint8).view(n, 1, 28, 28)


@pytest.mark.parametrize(("name", "dim"), [("hflip", -1), ("vflip", -2)])
def test_flip_with_p1_mirrors_exactly(name: str, dim: int) -> None:
    images = asymmetric_pattern()
    out = BatchAugment({name: {"p": 1.0}}, **FMNIST)(images, seeded(0))
    torch.testing.assert_close(out, normalize(torch.flip(images, [dim]), FMNIST), atol=1e-6, rtol=0)


def test_flip_with_p_half_flips_some_images_and_keeps_the_others() -> None:
    images = asymmetric_pattern(64)
    out = BatchAugment({"hflip": {"p": 0.5}}, **FMNIST)(images, seeded(0))
    flipped = torch.isclose(out, normalize(images.flip(-1), FMNIST)).flatten(1).all(1)
    kept = torch.isclose(out, normalize(images, FMNIST)).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert 10 < int(flipped.sum()) < 54


def test_full_image_crop_is_identity() -> None:
    policy = {"random_resized_crop": {"p": 1.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0]}}
    images = random_images(8, 1, 28)
    out = BatchAugment(policy, **FMNIST)(images, seeded(0))
    torch.testing.assert_close(out, normalize(images, FMNIST), atol=1e-4, rtol=0)


def test_rotation_by_90_degrees_is_counter_clockwise_like_rot90() -> None:
    """Pins the composed sampling matrix and its direction convention (torchvision's)."""
    augment = BatchAugment(only("rotation", p=1.0), **FMNIST)
    images = asymmetric_pattern()
    params = augment.sample_params(4, "cpu", seeded(0))
    params["rotation"]["degrees"].fill_(90.0)
    out = augment.apply(images, params)
    expected = normalize(torch.rot90(images, 1, dims=(-2, -1)), FMNIST)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)


def test_crop_then_flip_order_is_respected() -> None:
    """A flipped crop must equal the flip of the unflipped crop (flips come after the crop)."""
    policy = {"random_resized_crop": SSL_POLICY["random_resized_crop"], "hflip": {"p": 1.0}}
    augment = BatchAugment(policy, **FMNIST)
    images = asymmetric_pattern(8)
    params = augment.sample_params(8, "cpu", seeded(3))
    flipped = augment.apply(images, params)
    params["hflip"]["apply"].fill_(False)
    torch.testing.assert_close(flipped, augment.apply(images, params).flip(-1), atol=1e-4, rtol=0)


def test_crop_area_fraction_and_ratio_stay_within_policy_ranges() -> None:
    augment = BatchAugment(only("random_resized_crop"), **FMNIST)
    crop = augment.sample_params(4096, "cpu", seeded(0))["random_resized_crop"]
    area, ratio = crop["area_fraction"], crop["ratio"]
    assert area.min() >= 0.2 and area.max() <= 1.0
    assert ratio.min() >= 0.75 - 1e-5 and ratio.max() <= 1.3333 + 1e-5
    x0, y0, w, h = crop["box"].unbind(1)
    torch.testing.assert_close(w * h / (28 * 28), area)
    assert x0.min() >= 0 and y0.min() >= 0
    assert (x0 + w).max() <= 28 + 1e-4 and (y0 + h).max() <= 28 + 1e-4


def test_erased_box_area_fraction_within_bounds_and_matches_output() -> None:
    policy = {"random_erasing": {"p": 1.0, "scale": [0.02, 0.2], "ratio": [0.3, 3.3], "value": 0.0}}
    augment = BatchAugment(policy, **FMNIST)
    params = augment.sample_params(512, "cpu", seeded(0))
    erasing = params["random_erasing"]
    assert erasing["area_fraction"].min() >= 0.02 and erasing["area_fraction"].max() <= 0.2
    top, left, h, w = erasing["box"].unbind(1)
    # The realized box is the sampled area rounded to whole rows/columns.
    realized = (h * w).float()
    assert torch.all((realized - erasing["area_fraction"] * 784).abs() <= (h + w) / 2 + 0.25)
    assert (top + h).max() <= 28 and (left + w).max() <= 28
    white = torch.full((512, 1, 28, 28), 255, dtype=torch.uint8)
    out = augment.apply(white, params)
    erased = torch.isclose(out, normalize(torch.zeros(1, 1, 1, 1), FMNIST))
    assert torch.equal(erased.flatten(1).sum(1), h * w)


def test_erasing_probability_is_per_image() -> None:
    augment = BatchAugment(only("random_erasing", p=0.25), **FMNIST)
    applied = augment.sample_params(4000, "cpu", seeded(0))["random_erasing"]["apply"]
    assert abs(applied.float().mean().item() - 0.25) < 0.03


def test_grayscale_makes_three_equal_channels() -> None:
    out = BatchAugment(
        {"grayscale": {"p": 1.0}}, **{**CIFAR, "mean": [0.5] * 3, "std": [0.25] * 3}
    )(random_images(8, 3, 32))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_color_jitter_matches_torchvision_functional_ops() -> None:
    """Brightness, contrast, saturation, hue applied in that order with the sampled factors."""
    augment = BatchAugment(only("color_jitter", p=1.0), **CIFAR)
    images = random_images(8, 3, 32)
    params = augment.sample_params(8, "cpu", seeded(0))
    jitter = params["color_jitter"]
    expected = []
    for i, image in enumerate(images.float() / 255):
        image = TF.adjust_brightness(image, jitter["brightness"][i].item())
        image = TF.adjust_contrast(image, jitter["contrast"][i].item())
        image = TF.adjust_saturation(image, jitter["saturation"][i].item())
        expected.append(TF.adjust_hue(image, jitter["hue"][i].item()))
    # torchvision's luma uses 0.2989 (sums to 0.9999); ours 0.299: a 1e-4-level difference.
    expected_out = (torch.stack(expected) - augment.mean) / augment.std
    torch.testing.assert_close(augment.apply(images, params), expected_out, atol=2e-3, rtol=0)


def test_gaussian_blur_matches_torchvision_with_the_sampled_sigma() -> None:
    augment = BatchAugment(only("gaussian_blur", p=1.0), **FMNIST)
    images = random_images(4, 1, 28)
    params = augment.sample_params(4, "cpu", seeded(0))
    expected = torch.stack(
        [
            TF.gaussian_blur(image, [3, 3], [sigma.item()] * 2)
            for image, sigma in zip(
                images.float() / 255, params["gaussian_blur"]["sigma"], strict=True
            )
        ]
    )
    torch.testing.assert_close(
        augment.apply(images, params), (expected - augment.mean) / augment.std, atol=1e-5, rtol=0
    )


def test_gaussian_noise_has_the_configured_std_and_is_clamped() -> None:
    augment = BatchAugment({"gaussian_noise": {"p": 1.0, "std": 0.05}}, **FMNIST)
    images = torch.full((64, 1, 28, 28), 128, dtype=torch.uint8)
    pixels = augment(images, seeded(0)) * 0.353 + 0.286
    assert abs((pixels - 128 / 255).std().item() - 0.05) < 0.005
    clamped = augment(torch.zeros_like(images), seeded(0)) * 0.353 + 0.286
    assert clamped.min() >= -1e-6


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_rotate90_is_exact_with_labels_in_0_to_3(dtype: torch.dtype) -> None:
    images = asymmetric_pattern(256).to(dtype)
    rotated, k = rotate90(images, seeded(0))
    assert k.dtype == torch.int64
    assert set(k.tolist()) == {0, 1, 2, 3}
    for image, out, quarter in zip(images, rotated, k.tolist(), strict=True):
        assert torch.equal(out, torch.rot90(image, quarter, dims=(-2, -1)))


def test_rotate90_is_reproducible_and_rejects_non_square_images() -> None:
    images = asymmetric_pattern(64)
    assert torch.equal(rotate90(images, seeded(1))[1], rotate90(images, seeded(1))[1])
    with pytest.raises(ValueError, match="square"):
        rotate90(torch.zeros(2, 1, 28, 30))


@pytest.mark.parametrize("size", [7, (5, 9)])
def test_mask_region_hides_exactly_one_box_per_image(size: int | tuple[int, int]) -> None:
    images = torch.full((32, 3, 28, 28), 200, dtype=torch.uint8)
    masked, mask = mask_region(images, size, seeded(0), fill=0)
    h, w = (size, size) if isinstance(size, int) else size
    assert mask.shape == (32, 1, 28, 28) and mask.dtype == torch.bool
    assert torch.all(mask.flatten(1).sum(1) == h * w)
    assert torch.all(masked[mask.expand_as(masked)] == 0)
    assert torch.all(masked[~mask.expand_as(masked)] == 200)
    rows, cols = mask[0, 0].nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w


def test_mask_region_rejects_a_box_larger_than_the_image() -> None:
    with pytest.raises(ValueError, match="29x29"):
        mask_region(torch.zeros(2, 1, 28, 28), 29)


def test_ssl_policy_is_valid() -> None:
    validate_policy(SSL_POLICY)


def broken(name: str, option: str, value: Any) -> dict[str, dict[str, Any]]:
    policy = copy.deepcopy(SSL_POLICY)
    policy[name][option] = value
    return policy


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({**SSL_POLICY, "hfilp": {"p": 0.5}}, "'hfilp'"),
        (broken("hflip", "prob", 0.5), "'hflip.prob'"),
        (broken("hflip", "p", 1.5), "'hflip.p' = 1.5"),
        (broken("color_jitter", "p", -0.1), "'color_jitter.p'"),
        (broken("random_resized_crop", "scale", [0.9, 0.2]), "'random_resized_crop.scale'"),
        (broken("random_erasing", "scale", [0.3, 0.1]), "'random_erasing.scale'"),
        (broken("gaussian_blur", "kernel_size", 4), "'gaussian_blur.kernel_size'"),
        (broken("affine", "scale", 1.1), "'affine.scale'"),
        ({"rotation": {"degrees": 10}}, "'rotation.p'"),
    ],
    ids=[
        "unknown-transform",
        "unknown-option",
        "p>1",
        "p<0",
        "crop-min>max",
        "erase-min>max",
        "even-kernel",
        "scalar-range",
        "missing-p",
    ],
)
def test_bad_policy_raises_policy_error_naming_the_key(policy: dict, key: str) -> None:
    with pytest.raises(PolicyError, match=key.replace(".", r"\.").replace("[", r"\[")):
        validate_policy(policy)
    with pytest.raises(ValueError):  # PolicyError is a ValueError; the module validates too
        BatchAugment(policy, **FMNIST)


def test_probability_error_message_is_one_clear_line() -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy({"hflip": {"p": 1.5}})
    assert str(info.value) == "augment policy key 'hflip.p' = 1.5: must be a probability in [0, 1]"


def test_wrong_image_size_raises_naming_expected_and_actual() -> None:
    augment = BatchAugment(SSL_POLICY, **FMNIST)
    with pytest.raises(ValueError, match=r"28x28.*32x32"):
        augment(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), "channel"),
        (torch.zeros(2, 1, 28, 28), "uint8"),
        (torch.zeros(1, 28, 28, dtype=torch.uint8), "N x C x H x W"),
    ],
    ids=["channels", "dtype", "rank"],
)
def test_wrong_channels_dtype_or_rank_raise(images: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchAugment(SSL_POLICY, **FMNIST)(images)


def test_mean_and_std_must_match_channels() -> None:
    with pytest.raises(ValueError, match="3 values"):
        BatchAugment(SSL_POLICY, image_size=(32, 32), channels=3, mean=[0.5], std=[0.5])


def test_rotation_parameters_stay_within_degrees() -> None:
    augment = BatchAugment(only("rotation"), **FMNIST)
    degrees = augment.sample_params(2048, "cpu", seeded(0))["rotation"]["degrees"]
    assert degrees.abs().max() <= 15 and degrees.abs().max() > 14
    assert math.isclose(degrees.mean().item(), 0.0, abs_tol=0.6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_stays_there() -> None:
    augment = BatchAugment(SSL_POLICY, **CIFAR).cuda()
    images = random_images(128, 3, 32).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = augment(images, generator)
    assert out.device.type == "cuda" and out.shape == images.shape
    assert out.dtype == torch.float32
    again = augment(images, torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(out, again)
    # A CPU generator is also accepted: parameters are drawn on CPU and moved.
    cpu_drawn = augment(images, seeded(0))
    assert cpu_drawn.device.type == "cuda"
