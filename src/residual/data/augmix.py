"""AugMix (Hendrycks et al. 2020, "AugMix: a simple data processing method to improve robustness and
uncertainty"), batched on the training device.

Each image is augmented along `width` chains of 1 to 3 operations drawn at random, the chains are mixed
with Dirichlet(alpha) weights, and the mixture with the image itself by Beta(alpha, alpha). The operations
are the paper's default set: autocontrast, equalize, posterize, rotate, solarize, shear and translate, each
at a strength drawn per image up to `severity` (of 10). Brightness, contrast, colour and sharpness are left
out, as in the paper's default, because they overlap ImageNet-C's test corruptions (`residual robustness`
measures brightness and contrast). The paper's Jensen-Shannon consistency loss (`--augmix-jsd`) asks for
three views of each image: `augmix_views` makes them, and train/loss.py has the term.
"""

from __future__ import annotations

import kornia
import torch
from torch import nn


def autocontrast(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to span [0, 1] (a flat channel is left as it is)."""
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    spread = high - low
    return torch.where(spread > 0, (x - low) / spread.clamp_min(1e-12), x)


def equalize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return kornia.enhance.equalize(x)


def posterize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Each value kept to 4 bits, fewer as the level rises (the paper: 4 - int(level * 4 / 10))."""
    return kornia.enhance.posterize(x, 4 - (level * 4 / 10).long())


def solarize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Values above a threshold inverted; the threshold falls from 1 as the level rises."""
    return kornia.enhance.solarize(x, 1 - (level * 25.6).floor() / 256)


def rotate(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Up to 30 degrees at severity 10, either way."""
    return kornia.geometry.transform.rotate(x, _signed((level * 3).floor()))


def shear_x(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return kornia.geometry.transform.shear(x, torch.stack([_signed(level * 0.03), torch.zeros_like(level)], 1))


def shear_y(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return kornia.geometry.transform.shear(x, torch.stack([torch.zeros_like(level), _signed(level * 0.03)], 1))


def translate_x(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Up to a third of the width at severity 10, either way."""
    pixels = _signed((level * x.shape[-1] / 30).floor())
    return kornia.geometry.transform.translate(x, torch.stack([pixels, torch.zeros_like(pixels)], 1))


def translate_y(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    pixels = _signed((level * x.shape[-2] / 30).floor())
    return kornia.geometry.transform.translate(x, torch.stack([torch.zeros_like(pixels), pixels], 1))


def _signed(magnitude: torch.Tensor) -> torch.Tensor:
    """Each magnitude with a random sign."""
    return torch.where(torch.rand_like(magnitude) < 0.5, -magnitude, magnitude)


OPERATIONS = (autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y)


class AugMix(nn.Module):
    """float [0, 1] N x 3 x H x W -> the same, each image AugMixed (the paper's CIFAR and ImageNet defaults:
    severity 3, width 3, depth 1-3 at random, alpha 1)."""

    def __init__(self, severity: float = 3.0, width: int = 3, depth: int | None = None, alpha: float = 1.0):
        super().__init__()
        self.severity, self.width, self.depth, self.alpha = severity, width, depth, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, device = len(x), x.device
        if n == 0:
            return x
        alpha = torch.full((self.width,), self.alpha, device=device)
        weights = torch.distributions.Dirichlet(alpha).sample((n,))
        keep = torch.distributions.Beta(alpha[0], alpha[0]).sample((n,))
        mixed = torch.zeros_like(x)
        for chain in range(self.width):
            depth = (torch.randint(1, 4, (n,), device=device) if self.depth is None else
                     torch.full((n,), self.depth, device=device))
            augmented = x
            for step in range(int(depth.max())):
                augmented = self.apply_one(augmented, depth > step)
            mixed += weights[:, chain, None, None, None] * augmented
        return keep[:, None, None, None] * x + (1 - keep[:, None, None, None]) * mixed

    def apply_one(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One operation, drawn per image, applied to the images `active` marks, at a level drawn per image
        from U(0.1, severity) as in the paper."""
        chosen = torch.randint(len(OPERATIONS), (len(x),), device=x.device)
        level = torch.empty(len(x), device=x.device).uniform_(0.1, self.severity)
        out = x.clone()
        for index, operation in enumerate(OPERATIONS):
            members = (active & (chosen == index)).nonzero().flatten()
            if len(members):
                out[members] = operation(x[members], level[members]).clamp(0, 1)
        return out


JSD_VIEWS = 3  # the paper's: the image, and two AugMix views of it


def augmix_views(augment: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
    """The three views AugMix's consistency loss compares, stacked view by view (3N images): each image
    through the stages before the AugMix stage of `augment` (its crop and flip), then that twice more
    through AugMix and the stages after it (the clean view gets none of those, as in the paper and timm)."""
    stages = list(augment)
    at = next(index for index, stage in enumerate(stages) if isinstance(stage, AugMix))
    base = nn.Sequential(*stages[:at])(images)
    rest = nn.Sequential(*stages[at + 1:])
    return torch.cat([base, *(rest(stages[at](base)) for _ in range(JSD_VIEWS - 1))])
