"""Progressive resizing: most epochs train on smaller images, the last ones at the full size.

A convolution's cost grows with its pixels, so an epoch at 3/4 of the side costs about 9/16 of one
at the full size. FFCV's ResNet-50 recipes (Leclerc et al. 2023) train at 160 px, ramp linearly to
192 px over epochs 65-76 of 88 and test at 224-256; fastai's lessons train at 128 px, then 224.
The epochs at the full size at the end let the weights and the batch-norm statistics settle at
the size the model is tested at (Touvron et al. 2019 measure what a mismatch costs).

Sizes on the ramp are rounded to a multiple of the net's total stride (32 for an ImageNet ResNet,
4 for a CIFAR one), as FFCV rounds to 32: every stage's feature map stays whole, and a compiled
model or cuDNN's autotuner sees a few shapes, not one per epoch.
"""

from __future__ import annotations

from itertools import groupby

from ..errors import ConfigError


def default_ramp(epochs: int) -> tuple[int, int]:
    """FFCV's proportions: the last eighth of the epochs at the full size, after a ramp over the eighth before
    it -> (the last epoch at the smallest size, the first at the full size)."""
    eighth = max(1, round(epochs / 8))
    end = max(1, epochs - eighth)
    return max(0, end - eighth), end


def check_ramp(ramp: tuple[int, int], epochs: int) -> None:
    start, end = ramp
    if not 0 <= start < end <= epochs:
        raise ConfigError(f"--progressive-ramp START,END: the last epoch at the smallest size, then the first at "
                          f"the full size, with 0 <= START < END <= --epochs ({epochs}); got {start},{end}")


def epoch_sizes(epochs: int, full: int, smallest: int, ramp: tuple[int, int], multiple: int) -> list[int]:
    """The training image size of each epoch (item 0 is epoch 1): `smallest` up to epoch START, then
    growing linearly (rounded to `multiple`) to `full` at epoch END and after."""
    start, end = ramp
    sizes = []
    for epoch in range(1, epochs + 1):
        if epoch <= start:
            size = smallest
        elif epoch >= end:
            size = full
        else:
            size = round((smallest + (full - smallest) * (epoch - start) / (end - start)) / multiple) * multiple
        sizes.append(min(full, max(smallest, size)))
    return sizes


def describe_sizes(sizes: list[int]) -> str:
    """'16 px in epochs 1-8, 24 px in 9, 32 px in 10-12'."""
    parts, epoch = [], 1
    for size, run in groupby(sizes):
        count = len(list(run))
        last = epoch + count - 1
        parts.append(f"{size} px in {'epoch' if count == 1 else 'epochs'} "
                     f"{epoch if count == 1 else f'{epoch}-{last}'}")
        epoch = last + 1
    return ", ".join(parts)
