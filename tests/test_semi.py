"""FixMatch's objective (pipeline.models.semi) against examples computed by hand.

The formula is docs/science.md §9. Logits are chosen so that every softmax is a simple fraction:
``softmax([0, 0]) = [1/2, 1/2]``, ``softmax([ln 3, 0]) = [3/4, 1/4]``,
``softmax([0, ln 9]) = [1/10, 9/10]``, ``softmax([ln 2, 0]) = [2/3, 1/3]``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.semi import FixMatchParts, fixmatch_loss, pseudo_labels, split_logits

LN2, LN3, LN9 = math.log(2), math.log(3), math.log(9)

# Two labeled images, classes 0 and 1.
LABELED = [[0.0, 0.0], [LN3, 0.0]]
LABELS = [0, 1]
# Four unlabeled images: weak view, strong view.
WEAK = [
    [LN3, 0.0],  # q = [3/4, 1/4]: confident at τ = 0.7, pseudo-label 0
    [0.0, LN9],  # q = [1/10, 9/10]: confident, pseudo-label 1
    [0.0, 0.0],  # q = [1/2, 1/2]: below 0.7, masked
    [LN2, 0.0],  # q = [2/3, 1/3]: below 0.7, masked
]
STRONG = [
    [0.0, 0.0],  # target 0: -ln(1/2) = ln 2
    [LN3, 0.0],  # target 1: -ln(1/4) = 2 ln 2
    [5.0, -5.0],  # masked: would add a large term if it counted
    [-3.0, 3.0],  # masked
]
THRESHOLD = 0.7

# By hand:
#   L_s = (ln 2 + ln 4) / 2                       = 1.5 ln 2    (B = 2)
#   L_u = (1·ln 2 + 1·2 ln 2 + 0·… + 0·…) / 4     = 0.75 ln 2   (mean over all μB = 4)
#   L   = L_s + λ_u · L_u with λ_u = 2            = 3 ln 2
# The mean over the two confident images only would give L_u = 1.5 ln 2 and L = 4.5 ln 2.
SUPERVISED = 1.5 * LN2
UNSUPERVISED = 0.75 * LN2


def tensors(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """The example as (labeled logits, labels, weak logits, strong logits)."""
    return (
        torch.tensor(LABELED, requires_grad=requires_grad),
        torch.tensor(LABELS),
        torch.tensor(WEAK, requires_grad=requires_grad),
        torch.tensor(STRONG, requires_grad=requires_grad),
    )


def test_the_loss_is_the_masked_mean_over_all_unlabeled_images():
    total, parts = fixmatch_loss(*tensors(), threshold=THRESHOLD, unlabeled_weight=2.0)
    assert isinstance(parts, FixMatchParts)
    assert parts.supervised.item() == pytest.approx(SUPERVISED, rel=1e-6)
    assert parts.unsupervised.item() == pytest.approx(UNSUPERVISED, rel=1e-6)
    assert parts.mask_rate.item() == 0.5
    assert total.item() == pytest.approx(3 * LN2, rel=1e-6)
    assert total.item() != pytest.approx(4.5 * LN2, rel=1e-3)  # not the confident-only mean


def test_the_mask_accepts_a_confidence_equal_to_the_threshold():
    # Confidences 1/2 (exact in float32), 3/4 and 9/10.
    weak = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, LN9]])
    half = torch.tensor(0.5)
    above = torch.nextafter(half, torch.tensor(1.0)).item()  # the next float32 after 1/2
    below = torch.nextafter(half, torch.tensor(0.0)).item()

    labels, at = pseudo_labels(weak, 0.5)
    assert labels.tolist()[1:] == [0, 1] and labels.dtype == torch.int64
    assert at.dtype == torch.bool
    assert at.tolist() == [True, True, True]  # >=: 1/2 passes a threshold of 1/2
    assert pseudo_labels(weak, below)[1].tolist() == [True, True, True]
    assert pseudo_labels(weak, above)[1].tolist() == [False, True, True]
    assert pseudo_labels(weak, 0.8)[1].tolist() == [False, False, True]


def test_no_gradient_flows_through_the_pseudo_labels():
    labeled, labels, weak, strong = tensors(requires_grad=True)
    total, _ = fixmatch_loss(labeled, labels, weak, strong, THRESHOLD, unlabeled_weight=2.0)
    total.backward()
    assert weak.grad is None
    # d/dz of (λ_u / μB) · H(ŷ, z) = (2 / 4) · (softmax(z) − onehot(ŷ)):
    #   image 1: softmax([0, 0]) = [1/2, 1/2], ŷ = 0   -> 0.5 · [-1/2, 1/2]  = [-0.25, 0.25]
    #   image 2: softmax([ln 3, 0]) = [3/4, 1/4], ŷ = 1 -> 0.5 · [3/4, -3/4] = [0.375, -0.375]
    #   images 3 and 4 are masked                     -> exactly 0
    expected = torch.tensor([[-0.25, 0.25], [0.375, -0.375], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(strong.grad, expected)
    assert (strong.grad[2:] == 0).all()


def test_in_one_concatenated_pass_the_weak_rows_get_no_gradient():
    """As in training: one leaf holds [labeled; weak; strong], and only the labeled rows and the
    confident strong rows receive a gradient."""
    everything = torch.tensor(LABELED + WEAK + STRONG, requires_grad=True)
    labeled, weak, strong = split_logits(everything, labeled_size=2)
    total, _ = fixmatch_loss(labeled, torch.tensor(LABELS), weak, strong, THRESHOLD, 2.0)
    total.backward()
    grad = everything.grad
    assert grad is not None
    assert (grad[2:6] == 0).all()  # weak views
    assert (grad[6:8] != 0).all() and (grad[8:10] == 0).all()  # strong: confident, masked
    # Labeled rows: (1/B) · (softmax(z) − onehot(y)) = [-1/4, 1/4] and [3/8, -3/8].
    torch.testing.assert_close(grad[:2], torch.tensor([[-0.25, 0.25], [0.375, -0.375]]))


def test_threshold_one_switches_the_unlabeled_term_off_for_unsaturated_predictions():
    labeled, labels, weak, strong = tensors()
    total, parts = fixmatch_loss(labeled, labels, weak, strong, 1.0, unlabeled_weight=2.0)
    assert parts.mask_rate.item() == 0.0
    assert parts.unsupervised.item() == 0.0
    assert total.item() == pytest.approx(F.cross_entropy(labeled, labels).item(), rel=1e-7)
    assert total.item() == pytest.approx(SUPERVISED, rel=1e-6)


def test_a_saturated_softmax_reaches_threshold_one():
    """exp(-30) ≈ 9e-14 vanishes next to 1 in float32, so the confidence is exactly 1.0 and the
    mask is 1 even at threshold 1.0 (said in the docstring and docs/science.md §9)."""
    _, mask = pseudo_labels(torch.tensor([[30.0, 0.0], [LN3, 0.0]]), 1.0)
    assert mask.tolist() == [True, False]


def test_weight_zero_gives_plain_cross_entropy_on_the_labeled_batch():
    labeled, labels, weak, strong = tensors()
    total, parts = fixmatch_loss(labeled, labels, weak, strong, THRESHOLD, unlabeled_weight=0.0)
    assert total.item() == pytest.approx(F.cross_entropy(labeled, labels).item(), rel=1e-7)
    assert total.item() == pytest.approx(SUPERVISED, rel=1e-6)
    assert parts.unsupervised.item() == pytest.approx(UNSUPERVISED, rel=1e-6)  # still logged


def test_split_logits_returns_the_three_blocks_in_order():
    logits = torch.arange(16.0).reshape(8, 2)  # 2 labeled, 3 weak, 3 strong
    labeled, weak, strong = split_logits(logits, labeled_size=2)
    assert labeled.tolist() == [[0, 1], [2, 3]]
    assert weak[:, 0].tolist() == [4, 6, 8]
    assert strong[:, 0].tolist() == [10, 12, 14]
    with pytest.raises(ValueError, match="positive, even number"):
        split_logits(logits, labeled_size=3)


def test_wrong_inputs_are_reported_with_what_to_do():
    labeled, labels, weak, strong = tensors()
    with pytest.raises(ValueError, match=r"threshold is 1\.5.*\[0, 1\]"):
        fixmatch_loss(labeled, labels, weak, strong, 1.5, 1.0)
    with pytest.raises(ValueError, match="unlabeled_weight"):
        fixmatch_loss(labeled, labels, weak, strong, THRESHOLD, -1.0)
    with pytest.raises(ValueError, match="one weak and one strong view"):
        fixmatch_loss(labeled, labels, weak, strong[:3], THRESHOLD, 1.0)
    with pytest.raises(ValueError, match="one class index per labeled image"):
        fixmatch_loss(labeled, labels[:1], weak, strong, THRESHOLD, 1.0)
    with pytest.raises(ValueError, match="unlabeled batch is empty"):
        fixmatch_loss(labeled, labels, weak[:0], strong[:0], THRESHOLD, 1.0)
    with pytest.raises(ValueError, match=r"\(images, classes\)"):
        pseudo_labels(weak[0], THRESHOLD)
