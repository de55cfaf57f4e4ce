"""Where a classifier looks: class activation maps (CAM) and, where CAM does not apply, Grad-CAM.

CAM (Zhou et al. 2016) needs a network that ends in global average pooling (GAP) followed by a
linear head: then the logit of class c is ``b_c + mean_{x,y} M_c(x, y)`` with
``M_c(x, y) = sum_k w_{c,k} h_k(x, y)``, so ``M_c`` says exactly how much each location adds to
the score. Two of our classifiers break that: an MLP (or PCA) encoder has no spatial maps, and a
kNN classifier has no linear head. For them :func:`explain` uses Grad-CAM (Selvaraju et al. 2017),
which weights the maps by the spatially averaged gradient of the class score instead of by the
head's weights (for a GAP + linear network the two coincide up to a constant factor), and says
so in ``Explanation.reason`` so the report never passes one off as the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.viz import figures

__all__ = [
    "CamInputError",
    "Explanation",
    "autograd_on",
    "cam_figure",
    "class_activation_maps",
    "eval_mode",
    "explain",
    "grad_cam",
    "normalize_maps",
    "overlay",
]

# log(p) of a class no neighbour voted for would be -inf; the clamp keeps its gradient finite.
_MIN_PROBABILITY = 1e-12


class CamInputError(PipelineError, ValueError):
    """Arrays or tensors handed to the CAM code have the wrong shape; the message says which."""


@dataclass(frozen=True)
class Explanation:
    """The maps of one batch and how they were made.

    ``maps``: N x H x W float32 on the CPU, each map scaled to [0, 1] on its own (a constant map
    is all zeros). ``method``: "CAM" or "Grad-CAM". ``reason``: one sentence for the report.
    """

    maps: Tensor
    method: str
    reason: str


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then every submodule's own mode restored.

    Why per submodule: a fine-tuned classifier may hold a frozen encoder in eval mode inside a
    model in train mode; ``module.train(previous)`` would flip it.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """Gradients available even when the caller runs under no_grad or inference_mode."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """N x h x w -> N x H x W, bilinear, the way CAM is shown on the image."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[
        :, 0
    ]


def normalize_maps(maps: Tensor) -> Tensor:
    """Each N x H x W map min-max scaled to [0, 1]; a constant (or non-finite) map becomes 0.

    Per image, because a heat map shows *where* within one image, not how confident the model is.
    """
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)
    low = flat.min(1, keepdim=True).values if flat.shape[1] else flat.sum(1, keepdim=True)
    high = flat.max(1, keepdim=True).values if flat.shape[1] else low
    span = high - low
    constant = span <= 1e-12 * torch.maximum(high.abs(), torch.ones_like(high))
    scaled = (flat - low) / torch.where(constant, torch.ones_like(span), span)
    return torch.where(constant, torch.zeros_like(scaled), scaled).clamp(0, 1).view_as(maps)


def _check_classes(classes: Tensor, count: int) -> None:
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= count):
        raise CamInputError(
            f"classes must be indices in 0..{count - 1} (the classifier has {count} classes), "
            f"got values from {int(classes.min())} to {int(classes.max())}"
        )


# ------------------------------------------------------------------------------ CAM / Grad-CAM


def class_activation_maps(
    maps: Tensor, weights: Tensor, classes: Tensor, size: tuple[int, int]
) -> Tensor:
    """CAM: ``M_c = sum_k w_{c,k} h_k`` for each image's class, bilinearly upsampled to ``size``.

    ``maps`` N x K x h x w (before GAP), ``weights`` C x K (the linear head), ``classes`` N.
    Not normalized, so ``M_c.mean() + b_c`` is still the logit (before upsampling).
    """
    if maps.ndim != 4 or weights.ndim != 2 or weights.shape[1] != maps.shape[1]:
        raise CamInputError(
            f"CAM needs N x K x h x w maps and C x K head weights, got maps {tuple(maps.shape)} "
            f"and weights {tuple(weights.shape)}"
        )
    classes = classes.to(device=maps.device, dtype=torch.long).reshape(-1)
    if classes.shape[0] != maps.shape[0]:
        raise CamInputError(f"{maps.shape[0]} maps but {classes.shape[0]} classes: give one each")
    _check_classes(classes, weights.shape[0])
    cam = torch.einsum("nkhw,nk->nhw", maps, weights.to(maps)[classes])
    return _upsample(cam, size)


def grad_cam(
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    classes: Tensor,
    size: tuple[int, int],
    layer: nn.Module | None = None,
) -> Tensor:
    """Grad-CAM of ``score_fn`` (images -> N x classes scores) for each image's class.

    With a ``layer``: its output ``A`` (N x K x h x w, captured with a forward hook) is the
    activation, ``alpha_k = mean_{x,y} d y_c / d A_k`` and the map is ``ReLU(sum_k alpha_k A_k)``.
    Without one (an encoder with no spatial maps) the layer is the input image and the map is
    ``ReLU(sum_channels grad * input)``: averaging the gradient over the pixels there would only
    re-weight the image's colour channels and say nothing about where the class is.

    Nothing is left behind: the hook is removed and no parameter's ``.grad`` is touched (the
    gradient is taken with respect to the activation only, which is detached from the
    parameters, so it also works when the encoder is frozen).
    """
    classes = classes.to(device=images.device, dtype=torch.long).reshape(-1, 1)
    captured: list[Tensor] = []

    def capture(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    with autograd_on():
        x = images.detach().clone()
        if layer is None:
            x.requires_grad_(True)
            scores = score_fn(x)
            activation = x
        else:
            handle = layer.register_forward_hook(capture)
            try:
                scores = score_fn(x)
            finally:
                handle.remove()
            activation = captured[-1]
        _check_classes(classes, scores.shape[1])
        score = scores.float().gather(1, classes.clone()).sum()
        gradient = None
        if score.requires_grad:  # a score that ignores the activation has no gradient: map 0
            (gradient,) = torch.autograd.grad(score, activation, allow_unused=True)
        if gradient is None:
            gradient = torch.zeros_like(activation)
        if layer is None:
            cam = (gradient * activation).sum(1)
        else:
            alpha = gradient.mean(dim=(2, 3), keepdim=True)
            cam = (alpha * activation).sum(1)
        cam = cam.detach().float().relu()
    return _upsample(cam, size)


# ------------------------------------------------------------------------------ explain


def _encoder_name(encoder: nn.Module | None) -> str:
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "name"):
        return str(config.name)
    if encoder is None:
        return "unknown"
    name = type(encoder).__name__  # e.g. PCAEncoder -> "pca"
    return name.removesuffix("Encoder").lower() or name


def _spatial_body(encoder: nn.Module | None) -> nn.Module | None:
    """The module whose output is the encoder's maps before GAP, or None (no spatial maps)."""
    body = getattr(encoder, "body", None)
    if getattr(encoder, "has_gap", False) and isinstance(body, nn.Module):
        return body
    return None


def _cam_applies(classifier: nn.Module, encoder: nn.Module | None) -> bool:
    head = getattr(classifier, "head", None)
    return (
        _spatial_body(encoder) is not None
        and hasattr(encoder, "feature_maps")
        and isinstance(head, nn.Linear)
        and head.in_features == getattr(encoder, "feature_dim", None)
        and hasattr(classifier, "logits")
    )


def _reason(classifier: nn.Module, encoder: nn.Module | None, cam: bool) -> str:
    name = _encoder_name(encoder)
    if cam:
        return (
            f"CAM: the {name} encoder ends in global average pooling followed by the linear head."
        )
    spatial = _spatial_body(encoder) is not None
    where = (
        f"Grad-CAM on the {name} encoder's last feature maps"
        if spatial
        else "Grad-CAM at the input image"
    )
    if not isinstance(getattr(classifier, "head", None), nn.Linear):
        kind = (
            "a kNN classifier"
            if "knn" in type(classifier).__name__.lower()
            else f"a {type(classifier).__name__}"
        )
        pooling = "" if spatial else f" and the {name} encoder has no spatial maps"
        return (
            f"Grad-CAM instead of CAM: {kind} has no linear head after the pooling{pooling}, "
            f"so the map is {where}."
        )
    if spatial:
        return (
            f"Grad-CAM instead of CAM: the linear head does not sit directly on the {name} "
            f"encoder's pooled maps, so the map is {where}."
        )
    return (
        f"Grad-CAM instead of CAM: the {name} encoder has no global average pooling (no "
        f"spatial maps), so the map is {where}."
    )


def _score_fn(classifier: nn.Module) -> Callable[[Tensor], Tensor]:
    """The class score y_c: the logit where there is one, else log of the probability."""
    if isinstance(getattr(classifier, "head", None), nn.Linear) and hasattr(classifier, "logits"):
        return classifier.logits
    return lambda x: classifier(x).float().clamp(min=_MIN_PROBABILITY).log()


def explain(
    classifier: nn.Module, images: Tensor, classes: Tensor, batch_size: int = 256
) -> Explanation:
    """Maps of ``classes`` (one per image) for normalized N x C x H x W ``images``.

    CAM when the classifier is encoder -> GAP -> linear head, Grad-CAM otherwise (see the module
    doc). Computed in eval mode (dropout off, batch-norm running statistics), as the classifier
    predicts; its modes, hooks and ``requires_grad`` flags are as before afterwards.
    """
    if images.ndim != 4:
        raise CamInputError(f"explain needs N x C x H x W images, got {tuple(images.shape)}")
    classes = classes.reshape(-1)
    if classes.shape[0] != images.shape[0]:
        raise CamInputError(
            f"explain got {images.shape[0]} images but {classes.shape[0]} classes: give one each"
        )
    encoder = getattr(classifier, "encoder", None)
    use_cam = _cam_applies(classifier, encoder)
    method = "CAM" if use_cam else "Grad-CAM"
    size = (int(images.shape[2]), int(images.shape[3]))
    device = _device(classifier)
    chunks = []
    with eval_mode(classifier):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            batch_classes = classes[start : start + batch_size].to(device)
            if use_cam:
                with torch.no_grad():
                    maps = encoder.feature_maps(batch).float()
                    raw = class_activation_maps(
                        maps, classifier.head.weight.float(), batch_classes, size
                    )
            else:
                raw = grad_cam(
                    _score_fn(classifier), batch, batch_classes, size, layer=_spatial_body(encoder)
                )
            chunks.append(normalize_maps(raw).cpu())
    maps = torch.cat(chunks) if chunks else torch.zeros(0, *size)
    return Explanation(maps=maps, method=method, reason=_reason(classifier, encoder, use_cam))


# ------------------------------------------------------------------------------ drawing


def _rgb(images: np.ndarray) -> np.ndarray:
    """N x H x W (x 1 or 3) uint8 -> N x H x W x 3 floats in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise CamInputError(
            f"expected N x H x W x C images with C = 1 or 3, got shape {images.shape}"
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images.astype(np.float64) / 255.0


def overlay(images: np.ndarray, maps: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 N x H x W x C images blended with ``maps`` (N x H x W in [0, 1]) through "jet".

    Returns uint8 N x H x W x 3: ``(1 - alpha) * image + alpha * jet(map)``.
    """
    import matplotlib

    rgb = _rgb(images)
    maps = np.asarray(maps, dtype=np.float64)
    if maps.shape != rgb.shape[:3]:
        raise CamInputError(
            f"maps of shape {maps.shape} do not match images of shape {np.shape(images)}: "
            "give one H x W map per image"
        )
    if not 0 <= alpha <= 1:
        raise CamInputError(f"overlay alpha = {alpha} must be in [0, 1]")
    heat = matplotlib.colormaps["jet"](np.clip(np.nan_to_num(maps), 0, 1))[..., :3]
    blend = (1 - alpha) * rgb + alpha * heat
    return np.clip(np.rint(blend * 255), 0, 255).astype(np.uint8)


def cam_figure(
    rows: Sequence[tuple[str, np.ndarray, Sequence[str]]],
    path: Path | str,
    title: str,
    scale: float = 0.9,
) -> Path:
    """A grid: one row per class (``name``, N x H x W x 3 overlays, one caption each).

    Rows may have different lengths, or none (a class without mistakes): missing cells stay
    blank, so columns keep their meaning (first the correct predictions, then the mistakes).
    """
    columns = max((len(overlays) for _, overlays, _ in rows), default=0) or 1
    height = scale * max(1, len(rows)) + 0.5
    with figures.figure(scale * columns + 1.4, height) as fig:
        grid = fig.add_gridspec(max(1, len(rows)), columns, wspace=0.05, hspace=0.35)
        for r, (name, overlays, captions) in enumerate(rows):
            for c in range(columns):
                axes = fig.add_subplot(grid[r, c])
                figures.blank(axes)
                if c < len(overlays):
                    axes.imshow(overlays[c], interpolation="nearest")
                    if c < len(captions):
                        wrong = captions[c].startswith("✗")
                        axes.set_title(
                            captions[c], fontsize=6, pad=2, color="tab:red" if wrong else "black"
                        )
                if c == 0:
                    axes.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(title, fontsize=10)
        return figures.save(fig, path)
