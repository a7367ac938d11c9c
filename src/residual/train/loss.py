"""The labels' term of the training loss: softmax cross-entropy, or one sigmoid per class (binary
cross-entropy, as in Wightman et al. 2021, "ResNet strikes back"), summed over a batch's images; and
AugMix's consistency term between views of the same images.

Summed, then divided by the step's weight in the trainer: torch's weighted mean divides soft targets
by the image count instead, which would change the loss's scale when mixing is turned on. Binary
cross-entropy is summed over the classes too (timm averages over them, which divides the gradient
by the class count), so the learning rates that suit cross-entropy suit it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.transforms import soft_targets


def label_loss_sum(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, loss: str, smoothing: float,
                   threshold: float | None = None, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss summed over its images, each times its class weight.

    `targets`: the labels themselves, or mixed soft targets (smoothing already in them); `labels`: each
    image's own class, whose weight it takes. `threshold` (binary cross-entropy only): soft targets above
    it become 1 and the rest 0, so a mixed image asks for both of its classes.
    """
    logits = logits.float()
    if loss == "ce":
        # Hard labels carry their smoothing here; soft (mixed) targets already include it.
        return F.cross_entropy(logits, targets, weight=class_weights,
                               label_smoothing=smoothing if targets.dtype == torch.long else 0.0, reduction="sum")
    if targets.dtype == torch.long:
        targets = soft_targets(targets, logits.shape[1], smoothing)
    if threshold is not None:
        targets = (targets > threshold).float()
    per_image = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)
    if class_weights is not None:
        per_image = per_image * class_weights[labels]
    return per_image.sum()


def consistency_sum(logits: torch.Tensor, views: int, image_weights: torch.Tensor | None = None) -> torch.Tensor:
    """AugMix's Jensen-Shannon consistency (Hendrycks et al. 2020), summed over images: `logits` holds `views`
    blocks of the same images, view by view; per image, the mean over its views of KL(p_view || m), m the mean
    of their probabilities (clamped at 1e-7 before its log, as the paper's code), times its class weight."""
    probs = logits.float().softmax(1).view(views, -1, logits.shape[1])
    log_mixture = probs.mean(0).clamp(1e-7, 1).log()
    per_image = sum(F.kl_div(log_mixture, p, reduction="none").sum(1) for p in probs) / views
    if image_weights is not None:
        per_image = per_image * image_weights
    return per_image.sum()
