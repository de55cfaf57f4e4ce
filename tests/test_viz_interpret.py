"""Interpretation: CAM / Grad-CAM, the Deconvnet, filters and feature maps, and their figures.

Tiny random networks throughout: what is checked is the arithmetic (CAM against a hand
computation and against the logits, the two Deconvnet paths against each other, unpooling and
transposed convolution against their definitions), that nothing is left changed on the models,
and that every figure is a real picture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.models.backbones import BackboneConfig, build_backbone
from pipeline.models.classifier import KNNClassifier, LinearClassifier
from pipeline.viz import cam, deconv, features


def _encoder(
    name: str,
    width: int = 4,
    size: int = 12,
    channels: int = 1,
    seed: int = 0,
    activation: str = "relu",
) -> nn.Module:
    """A tiny backbone whose batch norms have non-trivial running statistics and affine maps."""
    torch.manual_seed(seed)
    encoder = build_backbone(
        BackboneConfig(name=name, width=width, activation=activation), channels, size
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return encoder.eval()


def _images(n: int, size: int = 12, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _state(model: nn.Module) -> tuple[list[bool], list[bool], int]:
    """Every module's mode, every parameter's requires_grad, and the number of hooks."""
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        hooks,
    )


# ------------------------------------------------------------------------------ 1. CAM


def test_cam_equals_hand_computation_and_the_logit() -> None:
    h0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    h1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    maps = torch.stack([h0, h1])[None].repeat(2, 1, 1, 1)  # 2 x K=2 x 2 x 2
    weights = torch.tensor([[1.0, -1.0], [0.5, 2.0]])  # C=2 x K=2
    result = cam.class_activation_maps(maps, weights, torch.tensor([1, 0]), (2, 2))
    # class 1: 0.5 * h0 + 2 * h1; class 0: h0 - h1
    assert torch.equal(result[0], torch.tensor([[0.5, 3.0], [3.5, 2.0]]))
    assert torch.equal(result[1], torch.tensor([[1.0, 1.0], [2.0, 4.0]]))
    assert cam.class_activation_maps(maps, weights, torch.tensor([1, 0]), (5, 7)).shape == (2, 5, 7)

    encoder = _encoder("lenet5", size=16)
    classifier = LinearClassifier(encoder, encoder.feature_dim, 3).eval()
    x, classes = _images(4, size=16), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        feature_maps = encoder.feature_maps(x)
        raw = cam.class_activation_maps(
            feature_maps, classifier.head.weight, classes, tuple(feature_maps.shape[-2:])
        )
        logits = classifier.logits(x).gather(1, classes[:, None])[:, 0]
    torch.testing.assert_close(
        raw.mean((1, 2)) + classifier.head.bias[classes], logits, rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------ 2. unpooling


def test_unpool_puts_values_back_at_the_switches() -> None:
    x = torch.zeros(1, 1, 4, 4)
    maxima = {(0, 1): 5.0, (1, 3): 6.0, (3, 0): 7.0, (2, 2): 8.0}  # one per 2x2 window
    for (r, c), value in maxima.items():
        x[0, 0, r, c] = value
    pooled, switches = F.max_pool2d(x, 2, 2, return_indices=True)
    assert pooled.flatten().tolist() == [5.0, 6.0, 7.0, 8.0]
    back = deconv.unpool(pooled * 10, switches, 2, 2, 0, (4, 4))
    expected = torch.zeros(1, 1, 4, 4)
    for (r, c), value in maxima.items():
        expected[0, 0, r, c] = 10 * value
    assert torch.equal(back, expected)
    # an odd input (the last row and column fall outside every window) keeps its size
    odd_pooled, odd_switches = F.max_pool2d(
        torch.arange(25.0).view(1, 1, 5, 5), 2, 2, return_indices=True
    )
    odd = deconv.unpool(odd_pooled, odd_switches, 2, 2, 0, (5, 5))
    assert odd.shape == (1, 1, 5, 5)
    assert torch.nonzero(odd[0, 0]).tolist() == [[1, 1], [1, 3], [3, 1], [3, 3]]
    # the scatter used where deterministic mode refuses max_unpool2d does the same
    assert torch.equal(deconv._scatter_unpool(odd_pooled, odd_switches, (5, 5)), odd)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # what a Lightning Trainer leaves set on the CPU
    try:
        assert torch.equal(deconv.unpool(odd_pooled, odd_switches, 2, 2, 0, (5, 5)), odd)
    finally:
        torch.use_deterministic_algorithms(deterministic)


# ------------------------------------------------------------------------------ 3. both paths


@pytest.mark.parametrize(
    ("name", "activation"), [("lenet5", "relu"), ("vgg", "relu"), ("vgg", "tanh")]
)
def test_explicit_and_autograd_deconvnet_agree(name: str, activation: str) -> None:
    encoder = _encoder(name, width=4, size=12, activation=activation)
    net = deconv.Deconvnet(encoder)
    assert net.explicit
    x = _images(3, size=12, seed=1)
    expected_layers = {
        "lenet5": ["c1", "c3", "c5"],
        "vgg": [f"stage{s}.conv{c}" for s in (1, 2, 3) for c in (1, 2)],
    }[name]
    assert net.layers == expected_layers
    for layer in net.layers:
        channel = deconv.choose_channels(net, x, layer, 1)[0]
        explicit = net.reconstruct(x, layer, channel, method="explicit")
        autograd = net.reconstruct(x, layer, channel, method="autograd")
        assert explicit.shape == x.shape
        scale = explicit.abs().max()
        assert scale > 0, f"{layer}: nothing projected back"
        assert (explicit - autograd).abs().max() <= 1e-5 * scale, layer


# ------------------------------------------------------------------------------ 4. transposed conv


def test_transposed_convolution_is_the_flipped_kernel_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 5, padding=2)
    y = torch.randn(2, 5, 9, 9)
    transposed = deconv._transposed_conv(conv, y, (9, 9))
    flipped = conv.weight.flip(2, 3).transpose(0, 1)  # in <-> out, kernel rotated by 180 degrees
    torch.testing.assert_close(transposed, F.conv2d(y, flipped, padding=5 - 1 - 2))
    # and it is the adjoint of the convolution without bias: <conv(x), y> = <x, conv^T(y)>
    x = torch.randn(2, 3, 9, 9)
    left = (F.conv2d(x, conv.weight, padding=2) * y).sum()
    torch.testing.assert_close(left, (x * transposed).sum(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ 5. explain


def _knn(encoder: nn.Module, size: int) -> KNNClassifier:
    with torch.no_grad():
        bank = encoder.eval()(_images(12, size=size, seed=5))
    return KNNClassifier(encoder, bank, torch.arange(12) % 3, 3, 0.1, 3)


@pytest.mark.parametrize(
    ("name", "kind", "method", "words"),
    [
        ("lenet5", "linear", "CAM", "global average pooling followed by the linear head"),
        ("mlp", "linear", "Grad-CAM", "no global average pooling"),
        ("lenet5", "knn", "Grad-CAM", "kNN classifier has no linear head"),
        ("mlp", "knn", "Grad-CAM", "kNN classifier"),
    ],
)
def test_explain_picks_cam_or_grad_cam_and_leaves_the_model_alone(
    name: str, kind: str, method: str, words: str
) -> None:
    encoder = _encoder(name, width=4, size=16)  # lenet5's last maps: 2 x 2 (1 x 1 at 12 px)
    if kind == "linear":
        classifier: nn.Module = LinearClassifier(encoder, encoder.feature_dim, 3, dropout=0.5)
    else:
        classifier = _knn(encoder, 16)
    classifier.train()
    encoder.body[0].eval()  # mixed modes must come back as they were
    encoder.requires_grad_(False)  # a frozen encoder (linear probe) must still be explained
    before = _state(classifier)
    images = _images(5, size=16, seed=2)
    explanation = cam.explain(classifier, images, torch.tensor([0, 1, 2, 0, 1]))
    assert explanation.method == method
    assert words in explanation.reason
    assert explanation.reason.startswith("CAM" if method == "CAM" else "Grad-CAM instead of CAM")
    maps = explanation.maps
    assert maps.shape == (5, 16, 16)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(1).amax(1) == 1).any(), "every map is constant"
    assert _state(classifier) == before
    assert all(p.grad is None for p in classifier.parameters())


def test_normalize_maps_scales_each_map_and_zeroes_constant_ones() -> None:
    maps = torch.stack([torch.tensor([[1.0, 3.0], [2.0, 5.0]]), torch.full((2, 2), 7.0)])
    result = cam.normalize_maps(maps)
    torch.testing.assert_close(result[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(result[1], torch.zeros(2, 2))


# ------------------------------------------------------------------------------ 6. non-chains


@pytest.mark.parametrize("name", ["inception", "resnet18"])
def test_deconvnet_on_branching_bodies_and_top_activations(name: str) -> None:
    encoder = _encoder(name, width=4, size=12).train()
    running = [b.clone() for b in encoder.buffers()]
    before = _state(encoder)
    net = deconv.Deconvnet(encoder)
    assert not net.explicit
    expected = (
        ["stem", "inception1", "inception2", "inception3"]
        if name == "inception"
        else ["stem", "layer1", "layer2", "layer3", "layer4"]
    )
    assert net.layers == expected
    x = _images(6, seed=3)
    layer = net.layers[-1]
    channels = deconv.choose_channels(net, x, layer, 2)
    projection = net.reconstruct(x, layer, channels[0])
    assert projection.shape == x.shape
    assert projection.abs().amax((1, 2, 3)).min() > 0
    with pytest.raises(deconv.DeconvnetError, match="sequential body"):
        net.reconstruct(x, layer, channels[0], method="explicit")

    patches = deconv.top_activations(net, x, layer, channels, top=4, batch_size=4)
    strongest = net.activations(x, layer).amax((2, 3))  # brute force
    for item, channel in zip(patches, channels, strict=True):
        order = torch.argsort(strongest[:, channel], descending=True, stable=True)[:4]
        assert item.indices.tolist() == order.tolist()
        np.testing.assert_allclose(item.activations, strongest[order, channel].numpy())
        assert np.all(np.diff(item.activations) <= 0)
        assert item.reconstructions.shape == (4, 1, 12, 12)
        for top, left, bottom, right in item.boxes:
            assert 0 <= top < bottom <= 12 and 0 <= left < right <= 12
    # the mean of the per-image maxima decides the channels
    assert channels[0] == int(strongest.mean(0).argmax())
    assert _state(encoder) == before
    assert all(torch.equal(a, b) for a, b in zip(running, encoder.buffers(), strict=True))


def test_receptive_fields_are_exact_and_mlp_is_refused() -> None:
    net = deconv.Deconvnet(_encoder("lenet5", size=16))
    # c1 is a 5x5 conv with padding 2: a unit sees the 5x5 square around it, clipped
    assert net.receptive_fields("c1", torch.tensor([[0, 0], [5, 6]]), (16, 16)) == [
        (0, 0, 3, 3),
        (3, 4, 8, 9),
    ]
    # c3 (1, 1): pooled rows 1..5 -> c1 rows 2..11 -> input rows 0..13
    assert net.receptive_fields("c3", torch.tensor([[1, 1]]), (16, 16)) == [(0, 0, 14, 14)]
    mlp = _encoder("mlp")
    assert not deconv.supports(mlp)
    with pytest.raises(deconv.DeconvnetError, match="convolutional encoder"):
        deconv.Deconvnet(mlp)
    with pytest.raises(deconv.DeconvnetError, match="unknown layer"):
        net.activations(_images(1, size=16), "c2")


# ------------------------------------------------------------------------------ 7. figures


def _png(path: object, width: float, height: float) -> np.ndarray:
    """The PNG at ``path`` as an array, after checking its size is about width x height px."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = pixels.shape[:2]
    assert 0.5 * width <= w <= 1.5 * width and 0.5 * height <= h <= 1.5 * height, (w, h)
    assert pixels.std() > 10, "the figure is blank"
    return pixels


def test_overlay_blends_with_jet() -> None:
    images = np.full((2, 3, 3, 1), 200, dtype=np.uint8)
    maps = np.stack([np.zeros((3, 3)), np.ones((3, 3))])
    assert np.array_equal(cam.overlay(images, maps, alpha=0.0), np.full((2, 3, 3, 3), 200))
    heat = cam.overlay(images, maps, alpha=1.0)
    assert heat.dtype == np.uint8 and heat.shape == (2, 3, 3, 3)
    assert heat[0, 0, 0].tolist() == [0, 0, 128] and heat[1, 0, 0].tolist() == [128, 0, 0]
    with pytest.raises(cam.CamInputError, match="do not match"):
        cam.overlay(images, maps[:, :2])


def test_figures_are_written(tmp_path: object) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 12, 12, 1), dtype=np.uint8)
    overlays = cam.overlay(images, rng.random((6, 12, 12)))
    rows = [
        ("T-shirt", overlays[:3], ["✓ T-shirt", "✓ T-shirt", "✗ as Shirt"]),
        ("Shirt", overlays[3:4], ["✓ Shirt"]),
        ("Bag", overlays[:0], []),
    ]
    _png(cam.cam_figure(rows, tmp_path / "cam.png", "CAM"), 0.9 * 3 * 100, 0.9 * 3 * 100)

    encoder = _encoder("lenet5", size=12)
    net = deconv.Deconvnet(encoder)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    entries = []
    for layer in ("c1", "c5"):
        channels = deconv.choose_channels(net, x, layer, 2)
        entries += [(layer, p) for p in deconv.top_activations(net, x, layer, channels, 4)]
    _png(
        deconv.deconv_figure(entries, images, tmp_path / "deconv.png", "Deconvnet"),
        1.5 * 4 * 100,
        1.5 * 2 * 100,
    )

    filters = features.first_layer_filters(encoder)
    assert filters.shape == (6, 5, 5, 1) and filters.min() == 0 and filters.max() == 1
    _png(features.filters_figure(filters, tmp_path / "filters.png", "filters"), 3 * 70, 3 * 70)
    maps = features.feature_maps(encoder, x[:1], max_channels=4)
    assert [name for name, _ in maps] == ["c1", "c3", "c5"]
    assert [m.shape for _, m in maps] == [(4, 12, 12), (4, 2, 2), (4, 1, 1)]
    _png(
        features.feature_maps_figure(images[0], maps, tmp_path / "maps.png", "maps"), 4 * 90, 4 * 90
    )

    mlp = _encoder("mlp", size=12)
    mlp_filters = features.first_layer_filters(mlp)
    assert mlp_filters.shape == (4, 12, 12, 1)
    mlp_maps = features.feature_maps(mlp, x[:1])
    assert [(name, m.shape) for name, m in mlp_maps] == [("fc1", (1, 2, 2)), ("fc2", (1, 2, 2))]
    _png(
        features.feature_maps_figure(images[0], mlp_maps, tmp_path / "mlp.png", "mlp"),
        1 * 90 + 100,
        3 * 90,
    )
