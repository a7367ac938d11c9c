"""The labels' term of the loss: cross-entropy as torch computes it, and binary cross-entropy (one sigmoid
per class, "ResNet strikes back") against numbers worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from residual.train.loss import consistency_sum, label_loss_sum

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0]])
LABELS = torch.tensor([0, 1])


def _bce(logit: float, target: float) -> float:
    """-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))), by hand."""
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_cross_entropy_is_torchs_summed_with_smoothing_for_labels_only():
    assert label_loss_sum(LOGITS, LABELS, LABELS, "ce", 0.1).item() == pytest.approx(
        F.cross_entropy(LOGITS, LABELS, label_smoothing=0.1, reduction="sum").item())
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]])  # mixed targets carry their own smoothing
    assert label_loss_sum(LOGITS, soft, LABELS, "ce", 0.1).item() == pytest.approx(
        -(soft * LOGITS.log_softmax(1)).sum().item())


def test_binary_cross_entropy_sums_every_class_of_every_image_against_the_smoothed_one_hot():
    # Smoothing 0.3 over 3 classes: 0.1 for the other classes, 1 - 0.3 + 0.1 = 0.8 for the label's (timm's).
    targets = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]
    by_hand = sum(_bce(LOGITS[i, c].item(), targets[i][c]) for i in range(2) for c in range(3))
    assert label_loss_sum(LOGITS, LABELS, LABELS, "bce", 0.3).item() == pytest.approx(by_hand)
    # Each image times its label's class weight.
    weights = torch.tensor([2.0, 0.5, 1.0])
    weighted = sum(weights[LABELS[i]].item() * _bce(LOGITS[i, c].item(), targets[i][c])
                   for i in range(2) for c in range(3))
    assert label_loss_sum(LOGITS, LABELS, LABELS, "bce", 0.3, class_weights=weights).item() == pytest.approx(weighted)


def test_a_target_threshold_makes_a_mixed_image_ask_for_both_its_classes():
    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.05, 0.15, 0.8]])
    binary = [[1, 1, 0], [0, 0, 1]]  # above 0.2: 0.7 and 0.3; 0.8 (0.15 is not)
    by_hand = sum(_bce(LOGITS[i, c].item(), binary[i][c]) for i in range(2) for c in range(3))
    assert label_loss_sum(LOGITS, mixed, LABELS, "bce", 0.0, threshold=0.2).item() == pytest.approx(by_hand)
    unthresholded = sum(_bce(LOGITS[i, c].item(), mixed[i, c].item()) for i in range(2) for c in range(3))
    assert label_loss_sum(LOGITS, mixed, LABELS, "bce", 0.0).item() == pytest.approx(unthresholded)


def test_augmix_consistency_is_the_mean_kl_of_each_view_to_their_mixture():
    logits = torch.randn(3 * 4, 5, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(1).view(3, 4, 5)
    mixture = probs.mean(0)
    expected = sum((p * (p.log() - mixture.log())).sum(1) for p in probs) / 3  # per image
    torch.testing.assert_close(consistency_sum(logits, 3), expected.sum())
    weights = torch.tensor([1.0, 2.0, 0.5, 0.0])
    torch.testing.assert_close(consistency_sum(logits, 3, weights), (expected * weights).sum())
    same = logits[:4].repeat(3, 1)  # views that agree: nothing to be consistent about
    assert consistency_sum(same, 3).item() == pytest.approx(0.0, abs=1e-6)
