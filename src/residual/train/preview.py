"""train_batch.png: the first training images as the model is shown them, augmented and mixed.

A run's augmentation is easy to get wrong (crops that cut the object out, colours pushed too
far, mixup that hides the class) and hard to see from the loss. So a fresh run draws the
images of its first batch through the run's own augmentation and Mixup/CutMix, with each
image's target as its title, before it trains on them. The draws are made with a random
stream of their own (`torch.random.fork_rng`): the run's own random draws, and so its
result, are the same as without the picture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..data.transforms import mix_batch
from ..figures import new_figure, save_png

PREVIEW_IMAGES = 16  # a 4 x 4 grid: enough to judge an augmentation, small enough to read


def target_title(target: torch.Tensor, class_names: list[str], multi_label: bool = False) -> str:
    """A hard label's class name; for a mixed (soft) target the two largest shares, e.g. 'cat 0.70 + dog 0.30';
    for a multi-label target every class it has, with its share where mixing made that less than 1."""
    if multi_label:
        parts = [class_names[int(i)] + ("" if target[i] > 0.99 else f" {float(target[i]):.2f}")
                 for i in torch.nonzero(target >= 0.01).flatten()]
        return " + ".join(parts) or "(no labels)"
    if target.dim() == 0:
        return class_names[int(target)]
    shares, indices = target.topk(min(2, len(target)))
    parts = [f"{class_names[int(i)]} {float(s):.2f}" for s, i in zip(shares, indices) if s >= 0.01]
    return " + ".join(parts)


def write_batch_preview(images: torch.Tensor, labels: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor],
                        mixup: float, cutmix: float, class_names: list[str], path: Path) -> None:
    """Draw up to PREVIEW_IMAGES of a uint8 batch after `augment` and Mixup/CutMix, titled by their targets,
    into `path`, leaving every random generator as it found it."""
    images, labels = images[:PREVIEW_IMAGES], labels[:PREVIEW_IMAGES]
    cuda = [images.device.index or 0] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        shown = augment(images.float().div(255))
        shown, targets = mix_batch(shown, labels, len(class_names), mixup, cutmix, 0.0)
    pixels = (shown.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    per_row = 4
    rows = max(1, -(-len(pixels) // per_row))
    figure = new_figure(figsize=(per_row * 2, rows * 2.2))
    axes = figure.subplots(rows, per_row, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, target in zip(axes.flat, pixels, targets.cpu()):
        axis.imshow(image)
        axis.set_title(target_title(target, class_names, multi_label=labels.dim() == 2), fontsize=8)
    figure.suptitle("the first training batch, as the model sees it (augmented and mixed)", fontsize=10)
    figure.tight_layout()
    save_png(figure, path, dpi=90)
