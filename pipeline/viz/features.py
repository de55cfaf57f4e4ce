"""What an encoder computes: its first-layer filters and the feature maps of one image.

First-layer filters are the only weights that live in pixel space, so they are the only ones
that can be looked at directly (edges, colour blobs, or noise for an untrained encoder). Deeper
layers are shown through what they output for one image, layer by layer, with the layer names of
:class:`pipeline.viz.deconv.Deconvnet` so the two figures speak of the same layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.viz import figures
from pipeline.viz.cam import eval_mode
from pipeline.viz.deconv import ACTIVATIONS, Deconvnet, supports

if TYPE_CHECKING:  # matplotlib is imported only to draw (pipeline.viz.figures)
    from matplotlib.axes import Axes

__all__ = [
    "FeaturesError",
    "feature_maps",
    "feature_maps_figure",
    "filters_figure",
    "first_layer_filters",
]


class FeaturesError(PipelineError, ValueError):
    """An encoder or array the feature figures cannot show; the message says why."""


def _unit(array: np.ndarray) -> np.ndarray:
    """Each item (first axis) min-max scaled to [0, 1] on its own; a constant one is mid-grey."""
    flat = array.reshape(len(array), -1).astype(np.float64)
    if flat.shape[1] == 0:
        return array.astype(np.float64)
    low, high = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    span = high - low
    scaled = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1), 0.5)
    return scaled.reshape(array.shape)


def first_layer_filters(encoder: nn.Module) -> np.ndarray:
    """K x h x w x C floats in [0, 1]: the first layer's weights, each filter on its own scale.

    A conv encoder's first kernels (h x w = kernel size); an MLP's first-layer rows reshaped to
    the image (h x w = image size), i.e. the template each hidden unit matches; a PCA encoder's
    principal components reshaped to the image (its "eigen-images").
    """
    components = getattr(encoder, "components", None)
    if isinstance(components, torch.Tensor):  # PCA: its principal components, "eigen-images"
        weights = components.detach().float().cpu().numpy()
        return _unit(weights.reshape(len(weights), *_image_shape(weights.shape[1]))).transpose(
            0, 2, 3, 1
        )
    layer = getattr(encoder, "first_layer", None)
    if layer is None:
        layer = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
    if isinstance(layer, nn.Conv2d):
        weights = layer.weight.detach().float().cpu().numpy()
    elif isinstance(layer, nn.Linear):
        shape = (getattr(encoder, "in_channels", None), getattr(encoder, "image_size", None))
        if None in shape or layer.in_features != shape[0] * shape[1] ** 2:
            raise FeaturesError(
                f"cannot reshape the first linear layer ({layer.in_features} inputs) to an "
                f"image: the encoder does not say its in_channels x image_size x image_size"
            )
        weights = layer.weight.detach().float().cpu().numpy()
        weights = weights.reshape(-1, shape[0], shape[1], shape[1])
    else:
        raise FeaturesError(
            f"the {type(encoder).__name__} encoder has no conv or linear layer to show filters of"
        )
    return _unit(weights).transpose(0, 2, 3, 1)


def _image_shape(length: int) -> tuple[int, int, int]:
    """C x S x S for a flattened square image of ``length`` values (1 or 3 channels)."""
    for channels in (1, 3):
        side = int(round(math.sqrt(length / channels)))
        if channels * side * side == length:
            return channels, side, side
    raise FeaturesError(f"PCA components of length {length} are not a square 1- or 3-channel image")


def _show_filter(axes: Axes, image: np.ndarray) -> None:
    """One H x W x C filter in [0, 1]: RGB for 3 channels, grey otherwise (channels averaged)."""
    if image.shape[-1] == 3:
        axes.imshow(image, interpolation="nearest")
    else:
        axes.imshow(image.mean(-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")


def filters_figure(
    filters: np.ndarray, path: Path | str, title: str, max_filters: int = 64
) -> Path:
    """The first ``max_filters`` filters (K x h x w x C in [0, 1]) on a near-square grid."""
    filters = np.asarray(filters)
    if filters.ndim != 4:
        raise FeaturesError(f"expected K x h x w x C filters, got shape {filters.shape}")
    shown = filters[:max_filters]
    columns = max(1, math.ceil(math.sqrt(len(shown))))
    rows = max(1, math.ceil(len(shown) / columns))
    with figures.figure(0.7 * columns + 0.4, 0.7 * rows + 0.5) as fig:
        grid = fig.add_gridspec(rows, columns, wspace=0.08, hspace=0.08)
        for k in range(rows * columns):
            axes = fig.add_subplot(grid[divmod(k, columns)])
            figures.blank(axes)
            if k < len(shown):
                _show_filter(axes, shown[k])
        more = f" (first {len(shown)} of {len(filters)})" if len(filters) > len(shown) else ""
        fig.suptitle(title + more, fontsize=10)
        return figures.save(fig, path)


def _as_grid(vector: np.ndarray) -> np.ndarray:
    """A 1-D activation vector as a near-square 1 x rows x columns map (NaN-padded)."""
    columns = max(1, math.ceil(math.sqrt(len(vector))))
    rows = max(1, math.ceil(len(vector) / columns))
    grid = np.full(rows * columns, np.nan)
    grid[: len(vector)] = vector
    return grid.reshape(1, rows, columns)


def _mlp_maps(encoder: nn.Module, image: Tensor) -> list[tuple[str, np.ndarray]]:
    """Hidden layers of a fully connected encoder: their units laid out on a square grid."""
    acts = [m for m in encoder.modules() if isinstance(m, ACTIVATIONS)]
    captured: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in acts]
    try:
        with torch.no_grad():
            encoder(image)
    finally:
        for handle in handles:
            handle.remove()
    return [
        (f"fc{i}", _as_grid(out[0].flatten().float().cpu().numpy()))
        for i, out in enumerate(captured, start=1)
    ]


def feature_maps(
    encoder: nn.Module, image: Tensor, max_channels: int = 8
) -> list[tuple[str, np.ndarray]]:
    """(layer name, k x h x w maps) for one normalized 1 x C x H x W ``image``, input to output.

    Conv encoders: the first ``max_channels`` channels of every layer a Deconvnet names.
    Fully connected encoders: each hidden layer's units as one near-square map (1 x r x c,
    NaN-padded), since their units have no spatial layout of their own. Any other encoder
    (PCA, no activation layers) gives an empty list.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise FeaturesError(f"feature_maps needs one 1 x C x H x W image, got {tuple(image.shape)}")
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    image = image.detach().to(device)
    with eval_mode(encoder):
        if not supports(encoder):
            return _mlp_maps(encoder, image)
        net = Deconvnet(encoder)
        return [
            (layer, net.activations(image, layer)[0, :max_channels].float().cpu().numpy())
            for layer in net.layers
        ]


def feature_maps_figure(
    image_uint8: np.ndarray,
    maps: Sequence[tuple[str, np.ndarray]],
    path: Path | str,
    title: str,
    max_channels: int = 8,
) -> Path:
    """The image (top left), then one row per layer of its first ``max_channels`` maps, each
    map on its own colour scale (viridis): the pattern matters, not the scale across layers."""
    image = np.asarray(image_uint8)
    columns = max([1] + [min(max_channels, len(m)) for _, m in maps])
    rows = 1 + len(maps)
    with figures.figure(0.9 * columns + 1.0, 0.9 * rows + 0.5) as fig:
        grid = fig.add_gridspec(rows, columns, wspace=0.08, hspace=0.15)
        axes = fig.add_subplot(grid[0, 0])
        figures.blank(axes)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        axes.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        axes.set_ylabel("image", rotation=0, ha="right", va="center", fontsize=8)
        for r, (layer, stack) in enumerate(maps, start=1):
            for c in range(columns):
                axes = fig.add_subplot(grid[r, c])
                figures.blank(axes)
                if c < min(max_channels, len(stack)):
                    axes.imshow(stack[c], cmap="viridis", interpolation="nearest")
                if c == 0:
                    axes.set_ylabel(layer, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(title, fontsize=10)
        return figures.save(fig, path)
