"""Common corruptions of images, at five severities: noise, blur, light and digital artefacts.

Ten of the fifteen corruptions of ImageNet-C (Hendrycks & Dietterich 2019, "Benchmarking neural network
robustness to common corruptions and perturbations"), with its severity parameters. They work on batches
of images as the model takes them (after its resize and crop), so any dataset can be corrupted on the fly.
ImageNet-C's parameters are for 224 px images; lengths in pixels (blur radii, motion length) are scaled to
the batch's size, as the CIFAR-10-C and Tiny-ImageNet-C variants scale theirs by hand. Left out: glass blur
(a per-pixel shuffle loop, slow), snow, frost (built from ImageNet-C's own frost photographs), fog (a plasma
fractal) and elastic transform.

Each corruption takes float images in [0, 1] (N x 3 x H x W), a severity's parameter and a torch.Generator
for the random ones, and returns images in [0, 1]; `corrupt` is the entry point on uint8 batches.
"""

from __future__ import annotations

import io
import math

import kornia
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ..errors import ConfigError

REFERENCE_SIZE = 224  # the image size ImageNet-C's pixel lengths are given for
SEVERITIES = (1, 2, 3, 4, 5)


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device)


def shot_noise(x: torch.Tensor, photons: float, generator: torch.Generator) -> torch.Tensor:
    """Photon counting noise: each value a Poisson count at `photons` per unit of brightness."""
    return torch.poisson(x * photons, generator=generator) / photons


def impulse_noise(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Salt and pepper: a share `amount` of the values (each channel alone) set to 0 or 1, half each."""
    hit = torch.rand(x.shape, generator=generator, device=x.device) < amount
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def defocus_blur(x: torch.Tensor, radius: float, alias_blur: float) -> torch.Tensor:
    """An out-of-focus lens: the image convolved with a disk of `radius` px, its edge softened by a 3 x 3
    Gaussian of sigma `alias_blur`; edges reflected. Each kernel pixel weighs the share of it the disk covers
    (8 x 8 samples per pixel): scaled down to small images, a radius under one pixel still blurs, more as
    it grows, where a disk of whole pixels would stay one pixel."""
    half = math.ceil(radius) + 1
    samples = (torch.arange(8 * (2 * half + 1), dtype=x.dtype, device=x.device) + 0.5) / 8 - half - 0.5
    inside = ((samples[:, None] ** 2 + samples[None, :] ** 2) <= radius ** 2).to(x.dtype)
    disk = F.avg_pool2d(inside[None, None], 8)
    disk = kornia.filters.gaussian_blur2d(disk / disk.sum(), (3, 3), (alias_blur, alias_blur))[0, 0]
    return _filter(x, disk / disk.sum())


def motion_blur(x: torch.Tensor, radius: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A camera moving while it exposes: each pixel the Gaussian-weighted (sigma px) average of the pixels
    behind it along a line of 2 x `radius` px (cut at 3 sigma, beyond which the weights vanish), at an
    angle drawn per image from -45 to 45 degrees."""
    angle = torch.empty(len(x), device=x.device).uniform_(-math.pi / 4, math.pi / 4, generator=generator)
    taps = torch.arange(math.ceil(min(2 * radius, 3 * sigma)) + 1, dtype=x.dtype, device=x.device)
    weights = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    weights = weights / weights.sum()
    out = torch.zeros_like(x)
    for tap, weight in zip(taps, weights):
        out += weight * _shifted(x, tap * torch.cos(angle), tap * torch.sin(angle))
    return out


def zoom_blur(x: torch.Tensor, zooms: tuple[float, ...]) -> torch.Tensor:
    """Zooming while exposing: the image averaged with its centre enlarged by each factor in `zooms`."""
    out = x.clone()
    for zoom in zooms:
        theta = torch.tensor([[1 / zoom, 0, 0], [0, 1 / zoom, 0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        out += F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out / (len(zooms) + 1)


def brightness(x: torch.Tensor, lift: float) -> torch.Tensor:
    """Brighter light: `lift` added to each pixel's value (HSV), hue and saturation kept."""
    hsv = kornia.color.rgb_to_hsv(x)
    hsv = torch.cat([hsv[:, :2], (hsv[:, 2:] + lift).clamp(0, 1)], 1)
    return kornia.color.hsv_to_rgb(hsv)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Flat light: every value pulled towards its channel's mean over the image, to `factor` of its distance."""
    means = x.mean((2, 3), keepdim=True)
    return (x - means) * factor + means


def pixelate(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Too few pixels: the image averaged down to `scale` of its size and blown up again in blocks."""
    size = x.shape[-2:]
    small = F.interpolate(x, size=[max(1, int(side * scale)) for side in size], mode="area")
    return F.interpolate(small, size=size, mode="nearest-exact")


def jpeg_compression(images: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 images saved as JPEG at `quality` and decoded again (Pillow's encoder, on the host)."""
    out = []
    for image in images.cpu().permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with one 2-D kernel, edges reflected (OpenCV's filter2D default)."""
    half = kernel.shape[-1] // 2
    padded = F.pad(x, (half,) * 4, mode="reflect" if half < min(x.shape[-2:]) else "replicate")
    channels = x.shape[1]
    return F.conv2d(padded, kernel.expand(channels, 1, *kernel.shape), groups=channels)


def _shifted(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Each image shifted by its (dx, dy) pixels, bilinearly, its edge pixels repeated into the gap."""
    height, width = x.shape[-2:]
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -2 * dx / width, -2 * dy / height
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _zooms(stop: float, step: float) -> tuple[float, ...]:
    return tuple(float(z) for z in np.arange(1, stop, step))


# name -> (kind, the parameter at each severity 1-5). ImageNet-C's values; lengths in px for 224 px images.
CORRUPTIONS = {
    "gaussian_noise": ("noise", (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": ("noise", (60, 25, 12, 5, 3)),
    "impulse_noise": ("noise", (0.03, 0.06, 0.09, 0.17, 0.27)),
    "defocus_blur": ("blur", ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
    "motion_blur": ("blur", ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),
    "zoom_blur": ("blur", (_zooms(1.11, 0.01), _zooms(1.16, 0.01), _zooms(1.21, 0.02), _zooms(1.26, 0.02),
                           _zooms(1.31, 0.03))),
    "brightness": ("light", (0.1, 0.2, 0.3, 0.4, 0.5)),
    "contrast": ("light", (0.4, 0.3, 0.2, 0.1, 0.05)),
    "pixelate": ("digital", (0.6, 0.5, 0.4, 0.3, 0.25)),
    "jpeg_compression": ("digital", (25, 18, 15, 10, 7)),
}


def check_corruptions(names: list[str], severities: list[int]) -> None:
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"--corruptions: unknown {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    wrong = [s for s in severities if s not in SEVERITIES]
    if wrong or not severities:
        raise ConfigError(f"--severities are 1 (mild) to 5 (severe), got {', '.join(map(str, severities)) or 'none'}")


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 N x 3 x H x W images with corruption `name` at `severity` (1-5), as uint8 again."""
    check_corruptions([name], [severity])
    parameter = CORRUPTIONS[name][1][severity - 1]
    if name == "jpeg_compression":
        return jpeg_compression(images, parameter)
    x = images.float() / 255
    scale = x.shape[-1] / REFERENCE_SIZE  # pixel lengths are ImageNet-C's at 224 px
    if name == "gaussian_noise":
        x = gaussian_noise(x, parameter, generator)
    elif name == "shot_noise":
        x = shot_noise(x, parameter, generator)
    elif name == "impulse_noise":
        x = impulse_noise(x, parameter, generator)
    elif name == "defocus_blur":
        x = defocus_blur(x, parameter[0] * scale, parameter[1])
    elif name == "motion_blur":
        x = motion_blur(x, parameter[0] * scale, parameter[1] * scale, generator)
    elif name == "zoom_blur":
        x = zoom_blur(x, parameter)
    elif name == "brightness":
        x = brightness(x, parameter)
    elif name == "contrast":
        x = contrast(x, parameter)
    elif name == "pixelate":
        x = pixelate(x, parameter)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
