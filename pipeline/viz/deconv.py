"""Deconvnet (Zeiler & Fergus 2013): which pixels made one neuron fire, projected back.

Run an image forward, keep the single strongest activation of one channel of one layer, zero
everything else, and go back to pixel space layer by layer: max pooling is undone with the
switches recorded on the way up (where each maximum came from), a ReLU rectifies the signal, and
a convolution is undone with the transposed convolution of the forward kernels (the convolution
with the flipped kernels). Batch norm in eval mode is a per-channel affine map; going back keeps
its scale and drops its shift, as the transposed convolution drops the bias.

Two equivalent implementations, because the interesting backbones are not all chains:

* **explicit** for sequential bodies (lenet5, vgg): exactly the paper's recipe, one functional
  step per layer, so it can be read and checked against the paper;
* **autograd** for any body (inception's concatenations, resnet18's residual sums): the Deconvnet
  is the gradient of the kept activation with respect to the input once every activation's
  backward is replaced by "ReLU of the incoming signal" (unpooling is max pooling's backward,
  the transposed convolution is convolution's backward, eval-mode batch norm's backward is its
  scale). Branches and sums then need no special case.

The tests check that both give the same projections on lenet5 and vgg.

The figure puts each projection next to the image patch that caused it; the patch is the
neuron's theoretical receptive field, found by back-propagating through a copy of the body whose
convolutions are positive averages (every pixel that can reach the neuron gets a positive
gradient), so it is exact for any architecture.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.viz import figures
from pipeline.viz.cam import autograd_on, eval_mode

__all__ = [
    "ChannelPatches",
    "Deconvnet",
    "DeconvnetError",
    "choose_channels",
    "deconv_figure",
    "supports",
    "top_activations",
    "unpool",
]

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.PReLU,
)
# Modules that are the identity in eval mode.
_PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity)
# Top-level children of a non-chain body that are not worth a layer of their own.
_NOT_LAYERS: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)
METHODS: tuple[str, ...] = ("auto", "explicit", "autograd")

Box = tuple[int, int, int, int]  # top, left, bottom, right (bottom and right exclusive)


class DeconvnetError(PipelineError, ValueError):
    """The Deconvnet cannot do what was asked (no conv encoder, unknown layer or channel)."""


def supports(encoder: nn.Module) -> bool:
    """Whether ``encoder`` is a convolutional backbone a Deconvnet can be built on."""
    body = getattr(encoder, "body", None)
    return (
        bool(getattr(encoder, "has_gap", False))
        and isinstance(body, nn.Sequential)
        and any(isinstance(m, nn.Conv2d) for m in body.modules())
    )


def unpool(
    values: Tensor,
    switches: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    padding: int | tuple[int, int],
    output_size: Sequence[int],
) -> Tensor:
    """Max-unpooling: each value back where its maximum came from (``switches``), zeros elsewhere.

    ``F.max_unpool2d``, except under ``torch.use_deterministic_algorithms(True)`` (which Lightning
    sets for our CPU runs and which refuses it on every device); there the same scatter is done
    with ``scatter_``.
    """
    size = tuple(int(s) for s in output_size)[-2:]
    if torch.are_deterministic_algorithms_enabled():
        return _scatter_unpool(values, switches, size)
    return F.max_unpool2d(values, switches, kernel_size, stride, padding, output_size=size)


def _scatter_unpool(values: Tensor, switches: Tensor, size: tuple[int, ...]) -> Tensor:
    """What ``F.max_unpool2d`` does, as a scatter into each flattened H x W plane."""
    out = values.new_zeros(*values.shape[:2], size[0] * size[1])
    out.scatter_(2, switches.flatten(2), values.flatten(2))
    return out.view(*values.shape[:2], *size)


# ------------------------------------------------------------------------------ the body's layers


@dataclass(frozen=True)
class _Layer:
    name: str  # what the figures call it
    module: str  # qualified name (inside the body) of the module whose output it is
    leaf: int | None  # its index among the flattened leaves (explicit path only)


def _explicit_leaf(module: nn.Module) -> bool:
    """Modules the explicit path knows how to go back through."""
    if isinstance(module, nn.Conv2d):
        return isinstance(module.padding, tuple) and module.padding_mode == "zeros"
    if isinstance(module, nn.BatchNorm2d):
        return module.track_running_stats and module.running_var is not None
    if isinstance(module, nn.MaxPool2d):
        return module.dilation in (1, (1, 1)) and not module.return_indices
    return isinstance(module, ACTIVATIONS + _PASS_THROUGH)


def _flatten(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """The leaves of nested ``nn.Sequential`` in order, or None if it is not such a chain."""
    leaves: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            inner = _flatten(child, qualified)
            if inner is None:
                return None
            leaves += inner
        elif _explicit_leaf(child):
            leaves.append((qualified, child))
        else:
            return None
    return leaves


def _chain_layers(leaves: list[tuple[str, nn.Module]]) -> list[_Layer]:
    """One layer per activation: named after its top-level block ("c3"), or "stage2.conv1"
    when the block holds several convolutions."""
    found = [(i, name) for i, (name, m) in enumerate(leaves) if isinstance(m, ACTIVATIONS)]
    per_block: dict[str, int] = {}
    for _, name in found:
        block = name.split(".")[0]
        per_block[block] = per_block.get(block, 0) + 1
    layers, seen = [], dict.fromkeys(per_block, 0)
    for i, name in found:
        block = name.split(".")[0]
        seen[block] += 1
        label = block if per_block[block] == 1 or "." not in name else f"{block}.conv{seen[block]}"
        layers.append(_Layer(label, name, i))
    return layers


def _block_layers(body: nn.Module) -> list[_Layer]:
    """One layer per top-level block of a body that is not a chain (pools left out: a pool's
    output is the previous block's, subsampled)."""
    return [
        _Layer(name, name, None)
        for name, child in body.named_children()
        if not isinstance(child, _NOT_LAYERS)
    ]


# ------------------------------------------------------------------------------ autograd plumbing


class _Stop(Exception):
    """Raised by a forward hook once the wanted layer has run: nothing after it is computed."""


def _run_to(body: nn.Module, target: nn.Module, x: Tensor) -> Tensor:
    """The output of ``target`` when ``body`` runs on ``x`` (the rest of the body is skipped)."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
        captured.append(output)
        raise _Stop

    handle = target.register_forward_hook(hook)
    try:
        body(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise DeconvnetError(f"the layer {target.__class__.__name__} did not run in the body")
    return captured[0]


class _Rectify(torch.autograd.Function):
    """Forward: the activation's output unchanged. Backward: ReLU of the incoming signal, in
    place of the activation's own derivative (the Deconvnet's rectification)."""

    @staticmethod
    def forward(ctx: object, inputs: Tensor, output: Tensor) -> Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx: object, signal: Tensor) -> tuple[Tensor, None]:
        return signal.clamp(min=0), None


def _rectify_hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return _Rectify.apply(inputs[0], output.detach())


def _keep_strongest(activations: Tensor, channel: int) -> tuple[Tensor, Tensor]:
    """The activations with only each image's strongest unit of ``channel`` kept (all other
    units and channels zero), and that unit's (row, column)."""
    n, _, _, w = activations.shape
    flat = activations[:, channel].flatten(1)
    index = flat.argmax(1)
    signal = torch.zeros_like(activations)
    rows = torch.arange(n, device=activations.device)
    signal[rows, channel, index // w, index % w] = flat[rows, index]
    return signal, torch.stack([index // w, index % w], dim=1)


# ------------------------------------------------------------------------------ explicit path


def _forward_step(module: nn.Module, x: Tensor) -> tuple[Tensor, object]:
    """One layer up, recording what the way back needs (switches, input sizes)."""
    if isinstance(module, nn.MaxPool2d):
        out, switches = F.max_pool2d(
            x,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            ceil_mode=module.ceil_mode,
            return_indices=True,
        )
        return out, (switches, tuple(x.shape[-2:]))
    if isinstance(module, nn.Conv2d):
        return module(x), tuple(x.shape[-2:])
    return module(x), None


def _transposed_conv(conv: nn.Conv2d, signal: Tensor, input_size: tuple[int, int]) -> Tensor:
    """The forward kernels transposed (flipped, in/out swapped), no bias, back to the input size."""
    extra = []
    for dim in range(2):
        produced = (
            (signal.shape[2 + dim] - 1) * conv.stride[dim]
            - 2 * conv.padding[dim]
            + conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            + 1
        )
        extra.append(input_size[dim] - produced)
    return F.conv_transpose2d(
        signal,
        conv.weight,
        None,
        conv.stride,
        conv.padding,
        tuple(extra),
        conv.groups,
        conv.dilation,
    )


def _backward_step(module: nn.Module, signal: Tensor, info: object) -> Tensor:
    """One layer down: unpool / rectify / un-normalize / transposed convolution."""
    if isinstance(module, ACTIVATIONS):
        return signal.relu()
    if isinstance(module, nn.BatchNorm2d):
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        return signal * scale.view(1, -1, 1, 1)
    if isinstance(module, nn.Conv2d):
        return _transposed_conv(module, signal, info)
    if isinstance(module, nn.MaxPool2d):
        switches, size = info
        return unpool(signal, switches, module.kernel_size, module.stride, module.padding, size)
    return signal


# ------------------------------------------------------------------------------ receptive fields


def _receptive_field_probe(body: nn.Module) -> nn.Module:
    """A float64 copy of ``body`` that is linear with positive weights: convolutions average,
    max pools become average pools, batch norms and activations vanish. Its gradient at the
    input is positive exactly on the receptive field of the unit it starts from."""
    probe = copy.deepcopy(body).double().eval()
    for parent in list(probe.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                with torch.no_grad():
                    child.weight.fill_(1.0 / child.weight[0].numel())
                    if child.bias is not None:
                        child.bias.zero_()
            elif isinstance(child, nn.MaxPool2d):
                setattr(
                    parent,
                    name,
                    nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode),
                )
            elif isinstance(child, (*ACTIVATIONS, *_PASS_THROUGH, nn.BatchNorm1d, nn.BatchNorm2d)):
                setattr(parent, name, nn.Identity())
    return probe.requires_grad_(False)


def _boxes(support: Tensor) -> list[Box]:
    """Bounding boxes of K x H x W boolean masks (the whole image for an empty mask)."""
    boxes = []
    for mask in support.cpu():
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        if len(rows) == 0:
            boxes.append((0, 0, mask.shape[0], mask.shape[1]))
        else:
            boxes.append((int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1))
    return boxes


# ------------------------------------------------------------------------------ the Deconvnet


class Deconvnet:
    """Projections of single activations of a convolutional ``encoder`` back to pixel space.

    The encoder is used as it is (weights shared, not copied) and always in eval mode; its
    modes are restored and no hooks are left after every call. Inputs are normalized
    N x C x H x W images on any device; results are on the encoder's device.
    """

    def __init__(self, encoder: nn.Module):
        if not supports(encoder):
            name = getattr(getattr(encoder, "config", None), "name", type(encoder).__name__)
            raise DeconvnetError(
                f"a Deconvnet needs a convolutional encoder (conv layers, then global average "
                f"pooling); the {name} encoder has none. Check deconv.supports(encoder) first "
                "and skip the Deconvnet figures for such encoders."
            )
        self.encoder = encoder
        self.body: nn.Sequential = encoder.body
        self._leaves = _flatten(self.body)
        specs = (
            _chain_layers(self._leaves) if self._leaves is not None else _block_layers(self.body)
        )
        self._layers = {spec.name: spec for spec in specs}
        self._modules = dict(self.body.named_modules())
        self._probe: nn.Module | None = None

    @property
    def layers(self) -> list[str]:
        """The layers that can be shown, from the input up."""
        return list(self._layers)

    @property
    def explicit(self) -> bool:
        """Whether the body is a chain that the explicit, layer-by-layer path handles."""
        return self._leaves is not None

    @property
    def device(self) -> torch.device:
        for tensor in (*self.body.parameters(), *self.body.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _spec(self, layer: str) -> _Layer:
        if layer not in self._layers:
            raise DeconvnetError(
                f"unknown layer {layer!r}: this encoder's layers are {', '.join(self.layers)}"
            )
        return self._layers[layer]

    def _prepare(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise DeconvnetError(f"expected N x C x H x W images, got {tuple(images.shape)}")
        return images.detach().to(self.device)

    def activations(self, images: Tensor, layer: str) -> Tensor:
        """N x C x h x w: the output of ``layer`` (after its activation)."""
        spec, x = self._spec(layer), self._prepare(images)
        with eval_mode(self.encoder), torch.no_grad():
            return _run_to(self.body, self._modules[spec.module], x)

    def reconstruct(self, images: Tensor, layer: str, channel: int, method: str = "auto") -> Tensor:
        """N x C_in x H x W: each image's strongest unit of ``channel`` in ``layer``, projected
        back to pixel space. ``method``: "explicit" (chains only), "autograd", or "auto" (the
        explicit path where it applies)."""
        return self._reconstruct(images, layer, channel, method)[0]

    def _reconstruct(
        self, images: Tensor, layer: str, channel: int, method: str = "auto"
    ) -> tuple[Tensor, Tensor]:
        """The projections and the (row, column) of the kept unit in the layer's map."""
        spec, x = self._spec(layer), self._prepare(images)
        if method not in METHODS:
            raise DeconvnetError(f"method {method!r} is not one of {', '.join(METHODS)}")
        if method == "explicit" and spec.leaf is None:
            raise DeconvnetError(
                f"the explicit Deconvnet needs a sequential body; the "
                f"{getattr(self.encoder.config, 'name', 'given')} body is not: use "
                "method='autograd' (or 'auto')"
            )
        with eval_mode(self.encoder):
            if spec.leaf is not None and method != "autograd":
                return self._explicit(x, spec, channel)
            return self._autograd(x, spec, channel)

    def _check_channel(self, activations: Tensor, channel: int, layer: str) -> None:
        if not 0 <= channel < activations.shape[1]:
            raise DeconvnetError(
                f"channel {channel} does not exist in layer {layer!r}, which has "
                f"{activations.shape[1]} channels (0 to {activations.shape[1] - 1})"
            )

    def _explicit(self, x: Tensor, spec: _Layer, channel: int) -> tuple[Tensor, Tensor]:
        """The paper's recipe, one functional step per layer."""
        leaves = [module for _, module in self._leaves[: spec.leaf + 1]]
        trace = []
        with torch.no_grad():
            for module in leaves:
                x, info = _forward_step(module, x)
                trace.append(info)
            self._check_channel(x, channel, spec.name)
            signal, positions = _keep_strongest(x, channel)
            for module, info in zip(reversed(leaves), reversed(trace), strict=True):
                signal = _backward_step(module, signal, info)
        return signal, positions

    def _autograd(self, x: Tensor, spec: _Layer, channel: int) -> tuple[Tensor, Tensor]:
        """The same projection as the gradient with rectified activation backwards."""
        handles = [
            m.register_forward_hook(_rectify_hook)
            for m in self.body.modules()
            if isinstance(m, ACTIVATIONS)
        ]
        try:
            with autograd_on():
                x = x.clone().requires_grad_(True)
                out = _run_to(self.body, self._modules[spec.module], x)
                self._check_channel(out, channel, spec.name)
                signal, positions = _keep_strongest(out.detach(), channel)
                (projection,) = torch.autograd.grad(out, x, grad_outputs=signal)
        finally:
            for handle in handles:
                handle.remove()
        return projection.detach(), positions

    def receptive_fields(
        self, layer: str, positions: Tensor, image_size: tuple[int, int]
    ) -> list[Box]:
        """The input boxes (top, left, bottom, right; exclusive) that the units at ``positions``
        (K x 2 rows and columns of ``layer``'s map) see, clipped to ``image_size``."""
        spec = self._spec(layer)
        k = positions.shape[0]
        channels = self._in_channels()
        with autograd_on():
            if self._probe is None:  # built here so its weights are never inference tensors
                self._probe = _receptive_field_probe(self.body)
            target = dict(self._probe.named_modules())[spec.module]
            x = torch.ones(
                k,
                channels,
                *image_size,
                dtype=torch.float64,
                device=self.device,
                requires_grad=True,
            )
            out = _run_to(self._probe, target, x)
            rows = torch.arange(k, device=out.device)
            positions = positions.to(out.device).clone()
            unit = out[rows, 0, positions[:, 0], positions[:, 1]].sum()
            (gradient,) = torch.autograd.grad(unit, x)
        return _boxes(gradient.abs().sum(1) > 0)

    def _in_channels(self) -> int:
        first = next(m for m in self.body.modules() if isinstance(m, nn.Conv2d))
        return first.in_channels


# ------------------------------------------------------------------------------ top activations


@dataclass(frozen=True)
class ChannelPatches:
    """The images that excite one channel most, strongest first, and their projections.

    ``indices``: K positions in the image set; ``activations``: each one's strongest unit;
    ``positions``: K x 2 (row, column) of that unit in the layer's map; ``reconstructions``:
    K x C x H x W projections; ``boxes``: K receptive fields (top, left, bottom, right) in pixels.
    """

    layer: str
    channel: int
    indices: np.ndarray
    activations: np.ndarray
    positions: np.ndarray
    reconstructions: np.ndarray
    boxes: list[Box]


def channel_maxima(
    deconvnet: Deconvnet, images: Tensor, layer: str, batch_size: int = 512
) -> Tensor:
    """N x C (CPU): each image's strongest activation of every channel of ``layer``."""
    chunks = [
        deconvnet.activations(images[start : start + batch_size], layer)
        .amax(dim=(2, 3))
        .float()
        .cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    if not chunks:
        raise DeconvnetError("no images: give at least one image to rank the channels on")
    return torch.cat(chunks)


def choose_channels(
    deconvnet: Deconvnet, images: Tensor, layer: str, count: int, batch_size: int = 512
) -> list[int]:
    """The ``count`` channels with the largest mean (over images) of the per-image maximum,
    i.e. the channels that respond strongly to these images; ties go to the lower index."""
    means = channel_maxima(deconvnet, images, layer, batch_size).mean(0)
    order = torch.argsort(-means, stable=True)
    return [int(c) for c in order[: max(0, count)]]


def top_activations(
    deconvnet: Deconvnet,
    images: Tensor,
    layer: str,
    channels: Sequence[int],
    top: int,
    batch_size: int = 512,
) -> list[ChannelPatches]:
    """For each channel, the ``top`` images with the strongest single activation (ties: lower
    index first), their projections and receptive-field boxes."""
    maxima = channel_maxima(deconvnet, images, layer, batch_size)
    size = (int(images.shape[2]), int(images.shape[3]))
    results = []
    for channel in channels:
        if not 0 <= channel < maxima.shape[1]:
            raise DeconvnetError(
                f"channel {channel} does not exist in layer {layer!r}, which has "
                f"{maxima.shape[1]} channels"
            )
        order = torch.argsort(-maxima[:, channel], stable=True)[: max(0, top)]
        projections, positions = [], []
        for chunk in order.split(batch_size):
            projection, position = deconvnet._reconstruct(images[chunk], layer, channel)
            projections.append(projection.float().cpu())
            positions.append(position.cpu())
        position = torch.cat(positions) if positions else torch.zeros(0, 2, dtype=torch.long)
        boxes = deconvnet.receptive_fields(layer, position, size) if len(order) else []
        results.append(
            ChannelPatches(
                layer=layer,
                channel=int(channel),
                indices=order.numpy(),
                activations=maxima[order, channel].numpy(),
                positions=position.numpy(),
                reconstructions=torch.cat(projections).numpy()
                if projections
                else np.zeros((0, images.shape[1], *size), dtype=np.float32),
                boxes=boxes,
            )
        )
    return results


# ------------------------------------------------------------------------------ the figure


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """H x W x C floats in [0, 1] -> H x W x 3 (grey repeated; other channel counts averaged)."""
    if image.shape[-1] == 3:
        return image
    return np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)


def _projection_crop(reconstruction: np.ndarray, box: Box) -> np.ndarray:
    """The projection inside ``box``, zero at mid-grey and scaled to its own largest value
    (the sign matters: it says which pixels would raise the activation)."""
    top, left, bottom, right = box
    crop = np.transpose(reconstruction[:, top:bottom, left:right], (1, 2, 0)).astype(np.float64)
    peak = np.abs(crop).max()
    return _to_rgb(np.clip(0.5 + crop / (2 * peak) if peak > 0 else crop * 0 + 0.5, 0, 1))


def _image_crop(image: np.ndarray, box: Box) -> np.ndarray:
    top, left, bottom, right = box
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return _to_rgb(image[top:bottom, left:right].astype(np.float64) / 255.0)


def _mosaic(crops: Sequence[np.ndarray]) -> np.ndarray:
    """Crops tiled on a near-square grid of equal cells (each crop centred in its cell, at
    its own scale), separated by white lines."""
    if not crops:
        return np.ones((1, 1, 3))
    cell_h = max(c.shape[0] for c in crops)
    cell_w = max(c.shape[1] for c in crops)
    columns = math.ceil(math.sqrt(len(crops)))
    rows = math.ceil(len(crops) / columns)
    gap = max(1, min(cell_h, cell_w) // 12)
    out = np.ones((rows * (cell_h + gap) - gap, columns * (cell_w + gap) - gap, 3))
    for k, crop in enumerate(crops):
        r, c = divmod(k, columns)
        top = r * (cell_h + gap) + (cell_h - crop.shape[0]) // 2
        left = c * (cell_w + gap) + (cell_w - crop.shape[1]) // 2
        out[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return out


def deconv_figure(
    entries: Sequence[ChannelPatches | tuple[str, ChannelPatches]],
    images_uint8: np.ndarray,
    path: Path | str,
    title: str,
    panel: float = 1.5,
) -> Path:
    """Per layer (rows) and channel: the projections of its top activations (left panel) next
    to the image patches that caused them (right panel), as in Zeiler & Fergus's Fig. 2.

    ``images_uint8``: the N x H x W (x C) images that ``indices`` refer to.
    """
    patches = [entry[1] if isinstance(entry, tuple) else entry for entry in entries]
    layers: dict[str, list[ChannelPatches]] = {}
    for item in patches:
        layers.setdefault(item.layer, []).append(item)
    columns = 2 * max((len(items) for items in layers.values()), default=1)
    with figures.figure(panel * columns + 0.8, panel * max(1, len(layers)) + 0.6) as fig:
        grid = fig.add_gridspec(max(1, len(layers)), columns, wspace=0.08, hspace=0.3)
        for r, (layer, items) in enumerate(layers.items()):
            for c in range(columns):
                axes = fig.add_subplot(grid[r, c])
                figures.blank(axes)
                if c == 0:
                    axes.set_ylabel(layer, fontsize=9)
                if c // 2 >= len(items):
                    continue
                item = items[c // 2]
                if c % 2 == 0:
                    crops = [
                        _projection_crop(rec, box)
                        for rec, box in zip(item.reconstructions, item.boxes, strict=True)
                    ]
                    axes.set_title(f"channel {item.channel}", fontsize=7, pad=2)
                else:
                    crops = [
                        _image_crop(images_uint8[i], box)
                        for i, box in zip(item.indices, item.boxes, strict=True)
                    ]
                    axes.set_title("patches", fontsize=7, pad=2, color="tab:gray")
                axes.imshow(_mosaic(crops), interpolation="nearest")
        fig.suptitle(title, fontsize=10)
        return figures.save(fig, path)
