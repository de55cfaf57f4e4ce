"""FixMatch's objective: hard pseudo-labels from a weak view train the strong view (issue 25).

The formula is the one in docs/science.md §9 (Sohn et al. 2020, arXiv:2001.07685), and
tests/test_semi.py checks it against hand-computed examples. This module is only the science;
the semi-supervised mode that trains with it (the unlabeled split, the config, the Lightning
module, the stages) is still to come.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FixMatchParts", "fixmatch_loss", "pseudo_labels", "split_logits"]


@dataclass(frozen=True)
class FixMatchParts:
    """The parts of one FixMatch loss, detached, for logging (docs/science.md §9).

    Why tensors and not floats: ``.item()`` on every step would wait for the device; the logger
    can reduce them when it writes. There is no pseudo-label accuracy: the unlabeled images
    have no labels to compare with.
    """

    supervised: Tensor
    """Mean cross-entropy on the labeled batch, ``L_s``."""
    unsupervised: Tensor
    """Masked mean over *all* unlabeled images, ``L_u`` (before the weight ``λ_u``)."""
    mask_rate: Tensor
    """Fraction of unlabeled images whose weak-view confidence reached the threshold."""


def pseudo_labels(weak_logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels and the confidence mask from the weak view (docs/science.md §9).

    ``q = softmax(weak_logits)`` is computed without gradient: the weak view only *sets* the
    target, so training must not move it towards its own prediction. (The argmax and the
    comparison would carry no gradient anyway; ``no_grad`` states the intent and spares the
    graph of the softmax.) The comparison is
    ``max q >= threshold`` (greater *or equal*), as in the paper's equation 2, so a threshold of
    0.5 accepts a prediction of exactly 0.5.

    The softmax runs in float32 even under bf16 autocast, because bf16 resolves probabilities
    near 0.95 only in steps of about 0.004. The threshold is rounded to float32 for the
    comparison. A saturated softmax rounds to exactly 1.0 in float32 (when the top logit leads
    the others by about 17 or more), so threshold 1.0 still accepts such predictions; to switch the
    unlabeled term off, set its weight to 0.

    Returns ``(labels, mask)``: ``labels`` the argmax class (int64) and ``mask`` a bool tensor,
    both of shape ``(U,)`` for ``weak_logits`` of shape ``(U, K)``.
    """
    _check_threshold(threshold)
    _check_logits(weak_logits, "weak_logits")
    with torch.no_grad():
        probabilities = weak_logits.detach().float().softmax(dim=1)
        confidence, labels = probabilities.max(dim=1)
        mask = confidence >= threshold
    return labels, mask


def fixmatch_loss(
    logits_labeled: Tensor,
    labels: Tensor,
    logits_weak: Tensor,
    logits_strong: Tensor,
    threshold: float,
    unlabeled_weight: float,
) -> tuple[Tensor, FixMatchParts]:
    """FixMatch's loss ``L_s + λ_u · L_u`` and its parts (docs/science.md §9).

    ``L_s`` is the mean cross-entropy of ``logits_labeled`` (shape ``(B, K)``) against
    ``labels``. ``L_u = (1/U) Σ_i m_i · H(ŷ_i, logits_strong_i)`` with ``(ŷ, m)`` from
    :func:`pseudo_labels` on ``logits_weak``, where ``U = μB`` is the number of *all* unlabeled
    images, not only the confident ones. That is the paper's normalisation: early in training,
    when few predictions are confident, the unlabeled term is small by itself, which acts as a
    warm-up of ``λ_u``.

    Gradients reach ``logits_labeled`` and the confident rows of ``logits_strong``; none reach
    ``logits_weak``.
    """
    _check_batch(logits_labeled, labels, logits_weak, logits_strong)
    if not unlabeled_weight >= 0:
        raise ValueError(
            f"unlabeled_weight (λ_u) is {unlabeled_weight}, but it must be 0 or more; "
            "the paper uses 1 (docs/science.md §9)"
        )
    supervised = F.cross_entropy(logits_labeled, labels)
    targets, mask = pseudo_labels(logits_weak, threshold)
    per_image = F.cross_entropy(logits_strong, targets, reduction="none")
    # Mean over all U images (the paper's 1/(μB)), with the unconfident ones counting as 0.
    unsupervised = (per_image * mask.to(per_image.dtype)).mean()
    total = supervised + unlabeled_weight * unsupervised
    parts = FixMatchParts(
        supervised=supervised.detach(),
        unsupervised=unsupervised.detach(),
        mask_rate=mask.float().mean(),
    )
    return total, parts


def split_logits(logits: Tensor, labeled_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split the logits of one forward pass over ``[labeled; weak; strong]`` into its three blocks.

    Why one pass (docs/science.md §9): batch normalisation normalises with the statistics of the
    batch it sees. Forwarding the labeled images alone and then the unlabeled views would
    normalise each group with its own statistics and feed the running averages, used at
    evaluation, with alternating groups. One concatenated batch normalises all three with the
    same statistics and keeps the running averages those of the mixture the network trains on.

    ``logits`` has ``labeled_size + 2U`` rows: the labeled images, then the weak views of the
    ``U`` unlabeled images, then their strong views in the same order.
    """
    _check_logits(logits, "logits")
    rows = logits.shape[0]
    unlabeled_rows = rows - labeled_size
    if labeled_size < 0 or unlabeled_rows <= 0 or unlabeled_rows % 2:
        raise ValueError(
            f"cannot split {rows} rows of logits into {labeled_size} labeled rows followed by "
            "equal blocks of weak and strong views: the rows after the labeled ones must be a "
            "positive, even number; concatenate [labeled; weak; strong] in one batch"
        )
    unlabeled = unlabeled_rows // 2
    labeled, weak, strong = logits.split([labeled_size, unlabeled, unlabeled])
    return labeled, weak, strong


# --- checks ---------------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> None:
    """A confidence threshold is a probability; a value above 1 would silently mask everything."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"the confidence threshold is {threshold}, but it must lie in [0, 1]; "
            "the paper uses 0.95 (docs/science.md §9)"
        )


def _check_logits(logits: Tensor, name: str) -> None:
    """Logits are one row of class scores per image."""
    if logits.dim() != 2:
        raise ValueError(
            f"{name} has shape {tuple(logits.shape)}, but it must be (images, classes); "
            "pass the classifier's output, not probabilities or features"
        )


def _check_batch(labeled: Tensor, labels: Tensor, weak: Tensor, strong: Tensor) -> None:
    """The four inputs describe one step: same classes, one label per labeled image, two views
    per unlabeled image. A mismatch here is a wiring error that would otherwise broadcast."""
    for name, logits in (("logits_labeled", labeled), ("logits_weak", weak)):
        _check_logits(logits, name)
    if labels.shape != labeled.shape[:1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, but logits_labeled has "
            f"{labeled.shape[0]} rows; pass one class index per labeled image"
        )
    if weak.shape != strong.shape:
        raise ValueError(
            f"logits_weak has shape {tuple(weak.shape)} and logits_strong "
            f"{tuple(strong.shape)}; each unlabeled image needs one weak and one strong view, "
            "in the same order"
        )
    if weak.shape[1] != labeled.shape[1]:
        raise ValueError(
            f"the unlabeled logits have {weak.shape[1]} classes and the labeled ones "
            f"{labeled.shape[1]}; both must come from the same classifier"
        )
    if weak.shape[0] == 0:
        raise ValueError(
            "the unlabeled batch is empty, so its mean is undefined; FixMatch needs μB > 0 "
            "unlabeled images per step (the paper uses μ = 7)"
        )
