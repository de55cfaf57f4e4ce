"""The encoders the study compares, all built by one factory behind one interface.

Why one interface: every self-supervised method, the fine-tuning stage, the kNN monitor and the
class-activation-map code take "an encoder" and must not care which one. So every backbone maps a
normalized ``N x C x H x W`` batch to an ``N x feature_dim`` vector, and every convolutional one
also exposes the maps right before its global average pooling (GAP), because a class activation
map ``M_c(x, y) = sum_k w_{c,k} h_k(x, y)`` (Zhou et al. 2016) needs exactly those maps and the
linear head that follows GAP. In eval mode ``forward(x) == feature_maps(x).mean((2, 3))``; in train
mode dropout (``config.dropout``) is applied to that vector.

The architectures follow the course (docs/science.md §4), adapted to 28x28 / 32x32 / 96x96
images, and all end in GAP:

* ``mlp``: flatten, then ``depth`` x [Linear(width) -> BatchNorm1d -> act -> dropout], i.e.
  ``h_l = act(W_l h_{l-1} + b_l)``. Every hidden layer has its activation: the course's "no
  activation on the last layer" is the linear head that a method puts on top of the features.
* ``lenet5`` (LeCun et al. 1998): conv 5x5 (c1, padding 2) -> act -> 2x2 pool -> conv 5x5 (c2,
  valid) -> act -> 2x2 pool -> conv 3x3 (c3, padding 1) -> act -> GAP, with
  ``c1 = max(6, width // 2)``, ``c2 = max(16, width)``, ``c3 = max(120, 4 * width)``: the original
  6 / 16 / 120 channels for small widths, growing with ``width`` beyond them (16 / 32 / 128 at the
  default width 32). Pooling is max pooling, not LeNet's trainable average subsampling: it is what
  the rest of the course uses and what a Deconvnet's pooling switches need. The original's last
  5x5 valid conv (which shrinks 5x5 to 1x1) becomes a same-padded 3x3 so that a 5x5 map survives
  for class activation maps. Images smaller than 12 pixels would leave nothing after the valid
  conv, so for them the second conv is same-padded (parameter count unchanged).
* ``vgg`` (Simonyan & Zisserman 2014): three stages of [conv 3x3 -> BN -> act] x 2 with width,
  2 x width, 4 x width channels, a 2x2 max pool after the first two stages (the third keeps its
  resolution for the maps), GAP; ``feature_dim = 4 * width``.
* ``inception`` (Szegedy et al. 2014, GoogLeNet): a 3x3 stem (width), then three Inception modules
  separated by 2x2 stride-2 max pools. Each module concatenates four branches: 1x1; 1x1 reduction
  -> 3x3; 1x1 reduction -> 5x5; 3x3 max pool (stride 1) -> 1x1 projection. A module with base
  ``b`` has ``b, b -> 2b, b/4 -> b/2, b/2`` channels (GoogLeNet's 3a ratios, rounded), so its output
  is ``4b``; the bases are ``width / 2, width, 2 * width``, hence ``feature_dim = 8 * width``.
* ``resnet18`` (He et al. 2015): the small-image stem of the CIFAR variant (3x3 conv stride 1, BN,
  act, no max pool), BasicBlocks [2, 2, 2, 2] of width, 2w, 4w, 8w channels with strides 1, 2, 2,
  2, a projection shortcut (1x1 conv + BN) where the shape changes, ``h = act(f(h) + shortcut(h))``,
  GAP; ``feature_dim = 8 * width``. At width 64 this is the usual CIFAR ResNet-18 (11.17M
  parameters without the classifier).

``config.batch_norm`` puts BatchNorm after every conv (BatchNorm1d after every MLP layer); convs
followed by BN have no bias (BN's shift makes it redundant). ``config.activation`` is used at
every non-linearity.

Initialization (``config.init``), with biases 0 and BN weight 1 / bias 0 everywhere:

* ``he``: Kaiming normal, fan-in mode, ``std = gain / sqrt(fan_in)`` with the ReLU gain
  ``sqrt(2)`` (He et al. 2015), or the leaky-ReLU gain ``sqrt(2 / (1 + slope^2))`` for leaky ReLU.
  PyTorch has no ELU gain and He init is not derived for sigmoid / tanh; for those the ReLU gain
  is used (so ``he`` always means ``std = sqrt(2 / fan_in)`` there). Use ``glorot`` for
  sigmoid / tanh networks if that is the question being asked.
* ``glorot``: Xavier uniform with gain 1, ``std = sqrt(2 / (fan_in + fan_out))`` (Glorot &
  Bengio 2010), the paper's formula whatever the activation.

Determinism: GAP is ``mean((2, 3))`` rather than ``AdaptiveAvgPool2d``, whose CUDA backward is
non-deterministic and refused under ``torch.use_deterministic_algorithms(True)``. Activations are
not in-place, so forward hooks (feature maps, CAM, Deconvnet) see the values they expect.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.checks import is_int, is_real
from pipeline.errors import PipelineError

__all__ = [
    "ACTIVATIONS",
    "BACKBONES",
    "BUILDERS",
    "INITS",
    "MIN_IMAGE_SIZE",
    "Backbone",
    "BackboneConfig",
    "BackboneConfigError",
    "BasicBlock",
    "ConvBackbone",
    "Decoder",
    "InceptionModule",
    "MLPBackbone",
    "build_backbone",
    "build_decoder",
    "count_parameters",
    "init_weights",
    "make_activation",
]

ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "elu", "sigmoid", "tanh")
INITS: tuple[str, ...] = ("he", "glorot")

# Smallest square image every backbone handles (vgg's two 2x2 pools need 4 pixels); 28, 32 and
# 96 are the sizes the study uses, the tests' tiny data is 6 or 8 pixels wide.
MIN_IMAGE_SIZE = 4
# Below this, lenet5's valid 5x5 conv and second pool would leave an empty map.
_LENET_VALID_CONV_MIN_SIZE = 12


class BackboneConfigError(PipelineError, ValueError):
    """A backbone (or decoder) setting is not allowed; the message names it and what is allowed.

    A PipelineError so the CLI reports it as one line, and a ValueError for plain callers.
    """


def _reject(field: str, value: object, rule: str) -> BackboneConfigError:
    return BackboneConfigError(f"backbone {field} = {value!r} is not allowed: {rule}")


@dataclass(frozen=True)
class BackboneConfig:
    """What defines an encoder; validated on construction so a bad params.yaml fails early."""

    name: str = "lenet5"
    width: int = 32
    depth: int = 2
    activation: str = "relu"
    leaky_relu_slope: float = 0.01
    init: str = "he"
    dropout: float = 0.0
    batch_norm: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BackboneConfigError (a ValueError) naming the first field that is not allowed."""
        for field, value, allowed in (
            ("name", self.name, BACKBONES),
            ("activation", self.activation, ACTIVATIONS),
            ("init", self.init, INITS),
        ):
            if value not in allowed:
                raise _reject(field, value, f"must be one of {', '.join(allowed)}")
        for field, value in (("width", self.width), ("depth", self.depth)):
            if not is_int(value) or value < 1:
                raise _reject(field, value, "must be an integer >= 1")
        slope = self.leaky_relu_slope
        if not is_real(slope) or not 0 <= slope <= 1:
            raise _reject("leaky_relu_slope", slope, "must be a number in [0, 1]")
        if not is_real(self.dropout) or not 0 <= self.dropout < 1:
            raise _reject("dropout", self.dropout, "must be a number in [0, 1)")
        if not isinstance(self.batch_norm, bool):
            raise _reject("batch_norm", self.batch_norm, "must be true or false")


# --------------------------------------------------------------------------- building blocks


def make_activation(name: str, slope: float = 0.01) -> nn.Module:
    """A fresh activation module (never in-place, so hooks see the values they expect)."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope=slope)
    if name == "elu":
        return nn.ELU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise _reject("activation", name, f"must be one of {', '.join(ACTIVATIONS)}")


def init_weights(
    module: nn.Module, init: str = "he", activation: str = "relu", slope: float = 0.01
) -> None:
    """Initialize every conv / linear / batch-norm layer in ``module`` as the module doc says.

    Why random and scaled: constant weights would keep all units of a layer identical
    (symmetry), and the scale keeps the activations' variance roughly constant across depth.
    """
    if init not in INITS:
        raise _reject("init", init, f"must be one of {', '.join(INITS)}")
    leaky = activation == "leaky_relu"
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            if init == "he":
                nn.init.kaiming_normal_(
                    layer.weight,
                    a=slope if leaky else 0.0,
                    mode="fan_in",
                    nonlinearity="leaky_relu" if leaky else "relu",
                )
            else:
                nn.init.xavier_uniform_(layer.weight, gain=1.0)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def _conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    config: BackboneConfig,
    stride: int = 1,
    padding: int = 0,
) -> list[nn.Module]:
    """conv -> (BN) -> act, the unit every conv backbone is made of."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=not config.batch_norm,
        )
    ]
    if config.batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(make_activation(config.activation, config.leaky_relu_slope))
    return layers


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block: ``act(residual(x) + shortcut(x))``.

    ``residual`` is conv3x3(stride) -> BN -> act -> conv3x3 -> BN; ``shortcut`` is the identity,
    or a 1x1 conv (same stride) + BN when the block changes the resolution or the channel count,
    so that the sum is defined.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: BackboneConfig):
        super().__init__()
        bn = config.batch_norm
        residual = _conv_bn_act(in_channels, out_channels, 3, config, stride=stride, padding=1)
        residual.append(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not bn))
        if bn:
            residual.append(nn.BatchNorm2d(out_channels))
        self.residual = nn.Sequential(*residual)
        if stride != 1 or in_channels != out_channels:
            shortcut: list[nn.Module] = [
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not bn)
            ]
            if bn:
                shortcut.append(nn.BatchNorm2d(out_channels))
            self.shortcut: nn.Module = nn.Sequential(*shortcut)
        else:
            self.shortcut = nn.Identity()
        self.activation = make_activation(config.activation, config.leaky_relu_slope)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


class InceptionModule(nn.Module):
    """GoogLeNet's module: four parallel branches at one resolution, concatenated on channels.

    The 1x1 reductions before the 3x3 and 5x5 convs are what makes it affordable (they cut the
    channels the expensive convs see); the pooling branch keeps a max-pooled view of the input.
    """

    def __init__(self, in_channels: int, base: int, config: BackboneConfig):
        super().__init__()
        c1, c3r, c3 = base, base, 2 * base
        c5r, c5, cp = max(1, base // 4), max(1, base // 2), max(1, base // 2)
        self.branch1 = nn.Sequential(*_conv_bn_act(in_channels, c1, 1, config))
        self.branch3 = nn.Sequential(
            *_conv_bn_act(in_channels, c3r, 1, config),
            *_conv_bn_act(c3r, c3, 3, config, padding=1),
        )
        self.branch5 = nn.Sequential(
            *_conv_bn_act(in_channels, c5r, 1, config),
            *_conv_bn_act(c5r, c5, 5, config, padding=2),
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            *_conv_bn_act(in_channels, cp, 1, config),
        )
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], dim=1)


# --------------------------------------------------------------------------- backbones


class Backbone(nn.Module):
    """An encoder: ``forward(x)`` is an ``N x feature_dim`` feature vector.

    ``has_gap`` says whether the features are the global average of spatial maps (every
    convolutional backbone), which is what class activation maps need.
    """

    feature_dim: int
    has_gap: bool

    def __init__(self, config: BackboneConfig, in_channels: int, image_size: int):
        super().__init__()
        self.config = config
        self.in_channels = in_channels
        self.image_size = image_size

    def feature_maps(self, x: Tensor) -> Tensor:
        """``N x feature_dim x h x w``: the maps right before global average pooling."""
        raise TypeError(
            f"the {self.config.name} backbone has no spatial feature maps: "
            "use a convolutional backbone (has_gap=True) for class activation maps"
        )

    @property
    def first_layer(self) -> nn.Conv2d | nn.Linear:
        """The layer that sees the pixels (its weights are the filters worth plotting)."""
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                return layer
        raise AssertionError("a backbone always has a conv or linear layer")


class ConvBackbone(Backbone):
    """A convolutional body ending in global average pooling, then dropout (training only)."""

    has_gap = True

    def __init__(
        self,
        config: BackboneConfig,
        in_channels: int,
        image_size: int,
        body: nn.Sequential,
        feature_dim: int,
    ):
        super().__init__(config, in_channels, image_size)
        self.body = body
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(config.dropout)

    def feature_maps(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.feature_maps(x).mean(dim=(2, 3)))


class MLPBackbone(Backbone):
    """Fully connected layers on the flattened image; no spatial maps, so no CAM."""

    has_gap = False

    def __init__(self, config: BackboneConfig, in_channels: int, image_size: int):
        super().__init__(config, in_channels, image_size)
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_channels * image_size * image_size
        for _ in range(config.depth):
            layers.append(nn.Linear(fan_in, config.width, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(config.width))
            layers.append(make_activation(config.activation, config.leaky_relu_slope))
            layers.append(nn.Dropout(config.dropout))
            fan_in = config.width
        self.body = nn.Sequential(*layers)
        self.feature_dim = config.width

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"the mlp backbone was built for N x {' x '.join(map(str, expected))} "
                f"images, got {tuple(x.shape)}"
            )
        return self.body(x)


def _lenet5(config: BackboneConfig, in_channels: int, image_size: int) -> tuple[nn.Sequential, int]:
    w = config.width
    c1, c2, c3 = max(6, w // 2), max(16, w), max(120, 4 * w)
    padding2 = 0 if image_size >= _LENET_VALID_CONV_MIN_SIZE else 2
    body = nn.Sequential(
        OrderedDict(
            c1=nn.Sequential(*_conv_bn_act(in_channels, c1, 5, config, padding=2)),
            s2=nn.MaxPool2d(2, stride=2),
            c3=nn.Sequential(*_conv_bn_act(c1, c2, 5, config, padding=padding2)),
            s4=nn.MaxPool2d(2, stride=2),
            c5=nn.Sequential(*_conv_bn_act(c2, c3, 3, config, padding=1)),
        )
    )
    return body, c3


def _vgg(config: BackboneConfig, in_channels: int, image_size: int) -> tuple[nn.Sequential, int]:
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for i, out in enumerate((config.width, 2 * config.width, 4 * config.width), start=1):
        layers = _conv_bn_act(channels, out, 3, config, padding=1)
        layers += _conv_bn_act(out, out, 3, config, padding=1)
        if i < 3:
            layers.append(nn.MaxPool2d(2, stride=2))
        stages[f"stage{i}"] = nn.Sequential(*layers)
        channels = out
    return nn.Sequential(stages), channels


def _stem(config: BackboneConfig, in_channels: int) -> OrderedDict[str, nn.Module]:
    """The small-image stem of inception and resnet18: one 3x3 conv to ``width`` channels, no
    stride or pooling, so 28 to 32 pixel images keep their resolution for the first stage."""
    conv = _conv_bn_act(in_channels, config.width, 3, config, padding=1)
    return OrderedDict(stem=nn.Sequential(*conv))


def _inception(
    config: BackboneConfig, in_channels: int, image_size: int
) -> tuple[nn.Sequential, int]:
    w = channels = config.width
    layers = _stem(config, in_channels)
    for i, base in enumerate((max(1, w // 2), w, 2 * w), start=1):
        if i > 1:
            layers[f"pool{i - 1}"] = nn.MaxPool2d(2, stride=2)
        module = InceptionModule(channels, base, config)
        layers[f"inception{i}"] = module
        channels = module.out_channels
    return nn.Sequential(layers), channels


def _resnet18(
    config: BackboneConfig, in_channels: int, image_size: int
) -> tuple[nn.Sequential, int]:
    w = channels = config.width
    layers = _stem(config, in_channels)
    for i, (out, stride) in enumerate(((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)), start=1):
        layers[f"layer{i}"] = nn.Sequential(
            BasicBlock(channels, out, stride, config), BasicBlock(out, out, 1, config)
        )
        channels = out
    return nn.Sequential(layers), channels


#: Makes an encoder from (config, in_channels, image_size); build_backbone initializes it.
Builder = Callable[[BackboneConfig, int, int], Backbone]


def _conv(body: Callable[[BackboneConfig, int, int], tuple[nn.Sequential, int]]) -> Builder:
    """The builder of a ConvBackbone around ``body``, which makes the maps before GAP and says
    their channel count (the feature dimension)."""

    def build(config: BackboneConfig, in_channels: int, image_size: int) -> Backbone:
        maps, feature_dim = body(config, in_channels, image_size)
        return ConvBackbone(config, in_channels, image_size, maps, feature_dim)

    return build


#: Every backbone, by its name in params.yaml (model.backbone): the one list of backbones. The
#: params schema reads this table's keys from the source (pipeline.params_yaml.backbone_names,
#: so validating params does not import torch): keep it a dict display with string keys. A new
#: backbone is its builder and its line here; tests/test_registries.py ties the rest.
BUILDERS: dict[str, Builder] = {
    "mlp": MLPBackbone,
    "lenet5": _conv(_lenet5),
    "vgg": _conv(_vgg),
    "inception": _conv(_inception),
    "resnet18": _conv(_resnet18),
}
BACKBONES: tuple[str, ...] = tuple(BUILDERS)


def _check_size(owner: str, field: str, value: object, minimum: int = 1) -> None:
    if not is_int(value) or value < minimum:
        raise BackboneConfigError(
            f"{owner} {field} = {value!r} is not allowed: must be an integer >= {minimum}"
        )


def build_backbone(config: BackboneConfig, in_channels: int, image_size: int) -> Backbone:
    """The initialized encoder ``config`` names, for square ``in_channels`` x ``image_size`` images.

    ``image_size`` fixes the mlp's input layer (and lenet5's padding on tiny images); the conv
    backbones accept other sizes >= MIN_IMAGE_SIZE too.
    """
    config.validate()
    _check_size("backbone", "in_channels", in_channels)
    _check_size("backbone", "image_size", image_size, MIN_IMAGE_SIZE)
    backbone = BUILDERS[config.name](config, in_channels, image_size)
    init_weights(backbone, config.init, config.activation, config.leaky_relu_slope)
    return backbone


# --------------------------------------------------------------------------- decoder


class Decoder(nn.Module):
    """Features back to an image, for the auto-encoder, the VAE and inpainting.

    Linear -> reshape to ``2 * width x s/4 x s/4`` -> BN -> ReLU -> two [x2 nearest upsampling ->
    conv 3x3 -> BN -> ReLU] stages -> conv 3x3 to ``out_channels``; no output activation, since
    the targets are normalized images. Upsampling + conv rather than transposed convs avoids
    their checkerboard artifacts (Odena et al. 2016). When ``image_size`` is not a multiple of 4
    the maps are built at ``4 * ceil(s / 4)`` and centre-cropped.
    """

    def __init__(self, feature_dim: int, out_channels: int, image_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        start = math.ceil(image_size / 4)
        self.project = nn.Linear(feature_dim, 2 * width * start * start)
        self.reshape = nn.Sequential(
            nn.Unflatten(1, (2 * width, start, start)), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.up1 = self._upsample(2 * width, width)
        self.up2 = self._upsample(width, width)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        init_weights(self, "he", "relu")

    @staticmethod
    def _upsample(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.out(self.up2(self.up1(self.reshape(self.project(z)))))
        excess = x.shape[-1] - self.image_size
        if excess:
            top = excess // 2
            x = x[..., top : top + self.image_size, top : top + self.image_size]
        return x


def build_decoder(feature_dim: int, out_channels: int, image_size: int, width: int) -> Decoder:
    """A decoder from ``N x feature_dim`` to ``N x out_channels x image_size x image_size``."""
    _check_size("decoder", "feature_dim", feature_dim)
    _check_size("decoder", "out_channels", out_channels)
    _check_size("decoder", "image_size", image_size)
    _check_size("decoder", "width", width)
    return Decoder(feature_dim, out_channels, image_size, width)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); only those with requires_grad if asked."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
