"""Behaviour of pipeline.models.backbones: the encoders every method shares, and the decoder.

Each test states one property the rest of the pipeline relies on: the common interface (shapes,
feature maps for class activation maps), the architectures the course describes (convolution
arithmetic, residual blocks, the standard ResNet-18 size), initialization, activations, dropout,
gradient flow and config validation. Widths are small so the file runs in a few seconds on a
2-core CPU.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from pipeline.models.backbones import (
    ACTIVATIONS,
    BACKBONES,
    Backbone,
    BackboneConfig,
    BasicBlock,
    build_backbone,
    build_decoder,
    count_parameters,
)

CONV_BACKBONES = tuple(name for name in BACKBONES if name != "mlp")
WIDTH = 8
# The documented feature size of each backbone, as a function of its width.
FEATURE_DIM = {
    "mlp": lambda w: w,
    "lenet5": lambda w: max(120, 4 * w),
    "vgg": lambda w: 4 * w,
    "inception": lambda w: 8 * w,
    "resnet18": lambda w: 8 * w,
}
ACTIVATION_TYPES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
FASHION_MNIST = (1, 28)  # channels, image size
CIFAR10 = (3, 32)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def make(name: str, channels: int = 1, size: int = 28, **overrides: object) -> Backbone:
    """A small backbone (width WIDTH unless overridden)."""
    config = BackboneConfig(**{"name": name, "width": WIDTH, **overrides})  # type: ignore[arg-type]
    return build_backbone(config, channels, size)


def images(channels: int = 1, size: int = 28, n: int = 4) -> torch.Tensor:
    return torch.randn(n, channels, size, size)


# --------------------------------------------------------------------------- the interface


@pytest.mark.parametrize("shape", [FASHION_MNIST, CIFAR10], ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_maps_images_to_n_by_feature_dim(name: str, shape: tuple[int, int]) -> None:
    channels, size = shape
    backbone = make(name, channels, size)
    features = backbone(images(channels, size))
    assert features.shape == (4, backbone.feature_dim)
    assert backbone.feature_dim == FEATURE_DIM[name](WIDTH)
    assert backbone.has_gap == (name != "mlp")


@pytest.mark.parametrize("size", [4, 8, 17, 96])
@pytest.mark.parametrize("name", BACKBONES)
def test_tiny_odd_and_large_square_images_work(name: str, size: int) -> None:
    backbone = make(name, 3, size, width=4).eval()
    assert backbone(images(3, size, n=2)).shape == (2, backbone.feature_dim)


@pytest.mark.parametrize("name", CONV_BACKBONES)
def test_features_are_the_global_average_of_the_feature_maps(name: str) -> None:
    backbone = make(name, dropout=0.5).eval()
    x = images()
    maps = backbone.feature_maps(x)
    assert maps.ndim == 4 and maps.shape[:2] == (4, backbone.feature_dim)
    torch.testing.assert_close(backbone(x), maps.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", BACKBONES)
def test_channels_last_inputs_give_the_same_features(name: str) -> None:
    backbone = make(name, 3, 32).eval()
    x = images(3, 32)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(backbone(channels_last), backbone(x), rtol=1e-4, atol=1e-5)


def test_mlp_has_no_spatial_feature_maps() -> None:
    with pytest.raises(TypeError, match="no spatial feature maps"):
        make("mlp").feature_maps(images())


def test_mlp_rejects_images_of_another_size_clearly() -> None:
    with pytest.raises(ValueError, match="built for N x 1 x 28 x 28"):
        make("mlp")(images(1, 32))


# --------------------------------------------------------------------------- architectures


def test_lenet5_layer_sizes_follow_the_convolution_formula() -> None:
    """M_out = floor((M + 2p - k) / s) + 1 at every conv and pool; the middle conv is valid."""
    backbone = make("lenet5")
    sizes: list[tuple[nn.Module, int, int]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        sizes.append((module, inputs[0].shape[-1], output.shape[-1]))

    for layer in backbone.modules():
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
            layer.register_forward_hook(record)
    backbone(images())

    def pair(value: int | tuple[int, ...]) -> int:
        return value[0] if isinstance(value, tuple) else value

    for layer, m_in, m_out in sizes:
        k, s, p = pair(layer.kernel_size), pair(layer.stride), pair(layer.padding)
        assert m_out == math.floor((m_in + 2 * p - k) / s) + 1, layer
    # conv5x5 same, pool, conv5x5 valid (14 -> 10), pool, conv3x3 same
    assert [(m_in, m_out) for _, m_in, m_out in sizes] == [
        (28, 28),
        (28, 14),
        (14, 10),
        (10, 5),
        (5, 5),
    ]
    valid = sizes[2][0]
    assert isinstance(valid, nn.Conv2d) and valid.kernel_size == (5, 5) and valid.padding == (0, 0)


def test_lenet5_keeps_the_classic_channel_counts_at_small_width() -> None:
    convs = [m for m in make("lenet5", width=8).modules() if isinstance(m, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [6, 16, 120]


def test_resnet18_at_width_64_is_the_standard_cifar_resnet18() -> None:
    """11,173,962 parameters with its 512 -> 10 classifier (5,130), so 11,168,832 without."""
    backbone = make("resnet18", 3, 32, width=64)
    n = count_parameters(backbone)
    assert abs(n - 11.17e6) / 11.17e6 < 0.01
    assert n == 11_173_962 - (512 * 10 + 10)
    assert backbone.feature_dim == 512


def test_residual_block_output_is_activation_of_residual_plus_shortcut() -> None:
    backbone = make("resnet18", activation="elu").eval()
    identity_block = backbone.body.layer1[0]
    projection_block = backbone.body.layer2[0]
    assert isinstance(identity_block, BasicBlock) and isinstance(projection_block, BasicBlock)
    x = torch.randn(2, WIDTH, 14, 14)
    for block, expected_shape in ((identity_block, (2, WIDTH, 14, 14)), (projection_block, None)):
        expected = nn.functional.elu(block.residual(x) + block.shortcut(x))
        torch.testing.assert_close(block(x), expected)
        if expected_shape:
            assert block(x).shape == expected_shape
    # Where the shape changes the shortcut is a strided 1x1 projection, elsewhere the identity.
    assert isinstance(identity_block.shortcut, nn.Identity)
    projection = projection_block.shortcut[0]
    assert isinstance(projection, nn.Conv2d)
    assert projection.kernel_size == (1, 1) and projection.stride == (2, 2)
    assert projection_block(x).shape == (2, 2 * WIDTH, 7, 7)


def test_a_residual_block_whose_branch_outputs_zero_passes_its_input_through() -> None:
    """h = act(f(h) + h): with f silenced (last BN scale 0) the block is just act(h)."""
    block = make("resnet18").eval().body.layer1[0]
    nn.init.zeros_(block.residual[-1].weight)
    x = torch.randn(2, WIDTH, 14, 14)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_inception_module_concatenates_four_branches() -> None:
    backbone = make("inception", width=16)
    module = backbone.body.inception1
    x = torch.randn(2, 16, 12, 12)
    branches = [module.branch1, module.branch3, module.branch5, module.branch_pool]
    outputs = [branch(x) for branch in branches]
    assert all(out.shape[-2:] == (12, 12) for out in outputs)
    assert sum(out.shape[1] for out in outputs) == module.out_channels == module(x).shape[1]
    # 1x1 reductions come before the expensive 3x3 and 5x5 convolutions
    assert module.branch3[0].kernel_size == (1, 1) and module.branch5[0].kernel_size == (1, 1)
    assert module.branch5[0].out_channels < 16


# --------------------------------------------------------------------------- initialization


def test_he_init_has_std_sqrt_2_over_fan_in_and_zero_biases() -> None:
    backbone = make("vgg", width=32, batch_norm=False)
    conv = backbone.body.stage3[2]  # 128 -> 128, 3x3: 147k weights
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 128
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
    for layer in backbone.modules():
        if isinstance(layer, nn.Conv2d):
            assert layer.bias is not None and torch.all(layer.bias == 0)


def test_glorot_init_has_std_sqrt_2_over_fan_in_plus_fan_out() -> None:
    backbone = make("vgg", width=32, init="glorot")
    conv = backbone.body.stage3[3]  # after conv, BN, act
    assert isinstance(conv, nn.Conv2d)
    fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)
    assert conv.weight.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out))  # uniform


def test_init_never_makes_units_identical_and_batch_norm_starts_as_identity() -> None:
    backbone = make("resnet18")
    first = backbone.first_layer.weight.flatten(1)
    assert torch.unique(first, dim=0).shape[0] == first.shape[0]  # no symmetry between filters
    for layer in backbone.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)


def test_same_seed_gives_the_same_initial_weights() -> None:
    torch.manual_seed(7)
    a = make("inception").state_dict()
    torch.manual_seed(7)
    b = make("inception").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


# --------------------------------------------------------------------------- activations, dropout


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", BACKBONES)
def test_the_configured_activation_is_the_one_in_the_network(name: str, activation: str) -> None:
    backbone = make(name, activation=activation, leaky_relu_slope=0.2)
    found = {type(m) for m in backbone.modules() if type(m) in ACTIVATION_TYPES.values()}
    assert found == {ACTIVATION_TYPES[activation]}
    if activation == "leaky_relu":
        slopes = {m.negative_slope for m in backbone.modules() if isinstance(m, nn.LeakyReLU)}
        assert slopes == {0.2}


@pytest.mark.parametrize("name", BACKBONES)
def test_dropout_is_active_in_training_only(name: str) -> None:
    x = images()
    with_dropout = make(name, dropout=0.5).train()
    assert not torch.equal(with_dropout(x), with_dropout(x))
    with_dropout.eval()
    assert torch.equal(with_dropout(x), with_dropout(x))
    without = make(name, dropout=0.0).train()  # the difference above came from dropout alone
    assert torch.equal(without(x), without(x))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", BACKBONES)
def test_gradients_reach_the_first_layer(name: str) -> None:
    backbone = make(name).train()
    features = backbone(images())
    # A random projection: a plain sum would be flat in the inputs of a BN layer.
    loss = (features * torch.randn_like(features)).sum()
    loss.backward()
    grad = backbone.first_layer.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_count_parameters_counts_all_or_only_trainable() -> None:
    layer = nn.Linear(10, 3)
    assert count_parameters(layer) == 33
    layer.bias.requires_grad_(False)
    assert count_parameters(layer, trainable_only=True) == 30


# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 96, 30])
def test_decoder_maps_features_to_an_image(size: int, channels: int) -> None:
    decoder = build_decoder(feature_dim=16, out_channels=channels, image_size=size, width=8)
    out = decoder(torch.randn(2, 16))
    assert out.shape == (2, channels, size, size)
    out.square().mean().backward()
    assert all(p.grad is not None for p in decoder.parameters())


def test_encoder_and_decoder_compose_into_an_autoencoder() -> None:
    encoder = make("vgg", 3, 32)
    decoder = build_decoder(encoder.feature_dim, 3, 32, WIDTH)
    x = images(3, 32)
    assert decoder(encoder(x)).shape == x.shape


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("name", "alexnet", "mlp, lenet5, vgg, inception, resnet18"),
        ("activation", "gelu", "relu, leaky_relu, elu, sigmoid, tanh"),
        ("init", "orthogonal", "he, glorot"),
        ("width", 0, ">= 1"),
        ("depth", 0, ">= 1"),
        ("dropout", 1.0, "[0, 1)"),
        ("dropout", -0.1, "[0, 1)"),
        ("leaky_relu_slope", -0.5, "[0, 1]"),
        ("batch_norm", "yes", "true or false"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(
    field: str, value: object, allowed: str
) -> None:
    with pytest.raises(ValueError, match=rf"^backbone {field} = .* allowed: .*") as error:
        BackboneConfig(**{field: value})  # type: ignore[arg-type]
    assert allowed in str(error.value) and "\n" not in str(error.value)


def test_build_backbone_rejects_impossible_inputs() -> None:
    with pytest.raises(ValueError, match="image_size = 2"):
        build_backbone(BackboneConfig(), 1, 2)
    with pytest.raises(ValueError, match="in_channels = 0"):
        build_backbone(BackboneConfig(), 0, 28)
    with pytest.raises(ValueError, match="decoder width = 0"):
        build_decoder(16, 1, 28, 0)


def test_config_is_immutable_and_replace_revalidates() -> None:
    config = BackboneConfig()
    with pytest.raises(AttributeError):
        config.width = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="width"):
        replace(config, width=-1)
