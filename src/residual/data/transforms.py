"""Image preparation: evaluation resize/crop, and batched training augmentation.

Loaders hand the trainer uint8 batches of one fixed size; augmentation then runs
on the whole batch, on the training device: random crops (padded, or resized) and flips
here, drawn on the device so a step never waits for it (`RandomCropFlip`,
`RandomResizedCropFlip`); affine, colour, AutoAugment/RandAugment/TrivialAugment and random erasing
through kornia.augmentation; AugMix in augmix.py.
Mixup and CutMix are a few lines here: they act on a batch and its labels
together, which the per-image kornia ops do not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..models.preprocessing import Preprocessing
from .augmix import AugMix

PRESETS = ("none", "cifar", "standard", "strong")
PAD_MODES = ("zeros", "reflect")
AUTO_AUGMENTS = (None, "autoaugment", "randaugment", "trivialaugment", "augmix")
RANDAUGMENT_OPERATIONS = 15  # kornia's default policy: the paper's 14 and SolarizeAdd
# RandAugment's N and M where none are given: the paper's ResNet-50 setting.
RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE = 2, 9
# The smallest area a random-resized crop keeps: ImageNet's 0.08 (Inception's crops, torchvision's and timm's
# default), or 0.35 (fastai's Imagenette runs) for small images and, where `resolve` asks, short runs on few images.
WIDE_CROP_SCALE, GENTLE_CROP_SCALE = 0.08, 0.35


@dataclass(frozen=True)
class AugmentConfig:
    """A preset, and every knob it sets; a knob given explicitly wins over the preset."""

    preset: str | None = None  # auto: 'cifar' for small images, 'standard' otherwise
    hflip: bool | None = None
    pad_crop: int | None = None  # pixels of padding around a random crop (CIFAR style)
    pad_mode: str = "zeros"  # what the padding holds: 'zeros' (He et al. 2015) or 'reflect' (Wide ResNets)
    crop_scale: float | None = None  # smallest area fraction of a random-resized crop; 0 disables it
    rotation: float | None = None  # degrees, +-
    shift: float | None = None  # width/height shift, fraction of the size, +-
    brightness: float | None = None  # +- fraction
    contrast: float | None = None  # +- fraction
    random_erasing: float | None = None  # probability of erasing a patch (cutout)
    auto_augment: str | None = None  # 'autoaugment', 'randaugment', 'trivialaugment' or 'augmix'
    randaugment_ops: int | None = None  # RandAugment's N, operations per image; auto: RANDAUGMENT_OPS
    randaugment_magnitude: int | None = None  # its M, 1-29 of 30 (torchvision's scale); auto: RANDAUGMENT_MAGNITUDE
    mixup: float = 0.0  # Beta(alpha, alpha) for mixup; 0 disables
    cutmix: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 disables

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"--augment must be one of {PRESETS}, got {self.preset!r}")
        if self.pad_mode not in PAD_MODES:
            raise ConfigError(f"--pad-mode must be one of {', '.join(PAD_MODES)}, got {self.pad_mode!r}")
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ConfigError(f"--auto-augment must be one of {', '.join(AUTO_AUGMENTS[1:])}, got "
                              f"{self.auto_augment!r}")
        for flag, value in [("--pad-crop", self.pad_crop), ("--rotation", self.rotation), ("--shift", self.shift),
                            ("--brightness", self.brightness), ("--contrast", self.contrast),
                            ("--mixup", self.mixup), ("--cutmix", self.cutmix)]:
            if value is not None and value < 0:
                raise ConfigError(f"{flag} must be 0 (off) or more, got {value}")
        given = [flag for flag, value in [("--randaugment-ops", self.randaugment_ops),
                                          ("--randaugment-magnitude", self.randaugment_magnitude)] if value is not None]
        if given and self.auto_augment != "randaugment":
            raise ConfigError(f"{given[0]} sets RandAugment: give --auto-augment randaugment with it (or leave it out; "
                              f"a --config file says it as {given[0][2:].replace('-', '_')})")
        if self.randaugment_ops is not None and not 1 <= self.randaugment_ops <= RANDAUGMENT_OPERATIONS:
            raise ConfigError(f"--randaugment-ops is how many of RandAugment's {RANDAUGMENT_OPERATIONS} operations "
                              f"each image gets: 1 to {RANDAUGMENT_OPERATIONS}, got {self.randaugment_ops}")
        if self.randaugment_magnitude is not None and not 0 < self.randaugment_magnitude < 30:
            raise ConfigError(f"--randaugment-magnitude is out of 30 (torchvision's scale): 1 to 29, got "
                              f"{self.randaugment_magnitude}")
        for flag, value in [("--crop-scale", self.crop_scale), ("--random-erasing", self.random_erasing)]:
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag} is a fraction: in [0, 1], got {value}")

    def resolved(self, input_size: int, gentle_crops: bool = False) -> "AugmentConfig":
        """Every None knob filled from the preset (crop scale and padding follow the image size);
        `gentle_crops`: the larger smallest crop (GENTLE_CROP_SCALE) at any size."""
        small = input_size <= 64
        preset = self.preset or ("cifar" if small else "standard")
        base = {"hflip": False, "pad_crop": 0, "crop_scale": 0.0, "rotation": 0.0, "shift": 0.0,
                "brightness": 0.0, "contrast": 0.0, "random_erasing": 0.0, "auto_augment": None}
        if preset == "cifar":
            base |= {"hflip": True, "pad_crop": max(1, input_size // 8)}
        if preset in ("standard", "strong"):
            base |= {"hflip": True, "crop_scale": GENTLE_CROP_SCALE if small or gentle_crops else WIDE_CROP_SCALE}
        if preset == "strong":
            base |= {"rotation": 15.0, "shift": 0.1, "brightness": 0.2, "contrast": 0.2, "random_erasing": 0.25,
                     "auto_augment": "trivialaugment"}
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name in base and getattr(self, f.name) is not None}
        knobs = base | given
        if knobs["auto_augment"] == "randaugment":
            knobs |= {"randaugment_ops": self.randaugment_ops or RANDAUGMENT_OPS,
                      "randaugment_magnitude": self.randaugment_magnitude or RANDAUGMENT_MAGNITUDE}
        return dataclasses.replace(self, preset=preset, **knobs)


def build_augment(config: AugmentConfig, input_size: int, stored_size: int, output_size: int | None = None
                  ) -> nn.Module:
    """Batched augmentation: float [0, 1] N x 3 x stored x stored -> N x 3 x output x output.

    `input_size` is the run's image size, which the preset's knobs follow; `output_size` (default: the same)
    a smaller one that progressive resizing trains at for a while: the same crops, at a lower resolution.
    """
    c = config.resolved(input_size)
    output_size = output_size or input_size
    stages: list[nn.Module] = []
    if c.crop_scale:
        stages.append(RandomResizedCropFlip(output_size, (c.crop_scale, 1.0), c.hflip))
    else:
        if c.pad_crop or c.hflip or stored_size != input_size:
            if c.pad_mode == "reflect" and c.pad_crop >= stored_size:
                raise ConfigError(f"--pad-mode reflect mirrors the image into the padding, so --pad-crop must be "
                                  f"less than the image's side ({stored_size} px), got {c.pad_crop}")
            # `none` keeps the centre of a larger stored image; the other presets crop it at random.
            stages.append(RandomCropFlip(input_size, c.pad_crop, c.hflip,
                                         centred=c.preset == "none" and not c.pad_crop, pad_mode=c.pad_mode))
        if output_size != input_size:
            stages.append(Downscale(output_size))
    if c.auto_augment == "augmix":  # its own stage: it mixes whole chains of operations, not one kornia op
        stages.append(AugMix())
    ops: list[nn.Module] = []
    if c.rotation or c.shift:
        ops.append(K.RandomAffine(degrees=c.rotation, translate=(c.shift, c.shift) if c.shift else None))
    if c.auto_augment == "autoaugment":  # Cubuk et al. 2019's policies, searched on CIFAR-10 and on ImageNet
        ops.append(K.auto.AutoAugment(policy="cifar10" if input_size <= 64 else "imagenet"))
    elif c.auto_augment == "randaugment":
        ops.append(K.auto.RandAugment(n=c.randaugment_ops, m=c.randaugment_magnitude))
    elif c.auto_augment == "trivialaugment":
        ops.append(K.auto.TrivialAugment())
    if c.brightness or c.contrast:
        ops.append(K.ColorJitter(brightness=c.brightness, contrast=c.contrast, p=0.8))
    if c.random_erasing:
        ops.append(K.RandomErasing(p=c.random_erasing))
    if ops:
        stages.append(K.AugmentationSequential(*ops))
    return nn.Sequential(*stages) if stages else nn.Identity()


class RandomCropFlip(nn.Module):
    """Pad by `padding` (zeros, or the image mirrored at its edges with `pad_mode="reflect"`), take
    a random `size` x `size` window of each image (the centre one when `centred`), and mirror it
    with probability 1/2 when `hflip`: kornia's RandomCrop(padding) + RandomHorizontalFlip.

    Written here because it is the whole CIFAR recipe, the one small, launch-bound nets train
    with: one gather whose random offsets are drawn on the images' device, so the step never
    waits for the GPU. kornia's pair took 1.1 ms of host time per call on two images (this:
    0.06 ms) and draws its parameters on the host (benchmarks/augment_cpu.py).
    """

    def __init__(self, size: int, padding: int = 0, hflip: bool = False, centred: bool = False,
                 pad_mode: str = "zeros"):
        super().__init__()
        self.size, self.padding, self.hflip, self.centred = size, padding, hflip, centred
        self.pad_mode = "constant" if pad_mode == "zeros" else pad_mode  # F.pad's name for zeros

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, channels, size, device = len(images), images.shape[1], self.size, images.device
        if self.padding:
            images = F.pad(images, (self.padding,) * 4, mode=self.pad_mode)
        height, width = images.shape[-2:]
        if self.centred:
            top = torch.full((n, 1, 1), (height - size) // 2, device=device)
            left = torch.full((n, 1, 1), (width - size) // 2, device=device)
        else:
            top = torch.randint(0, height - size + 1, (n, 1, 1), device=device)
            left = torch.randint(0, width - size + 1, (n, 1, 1), device=device)
        steps = torch.arange(size, device=device)
        rows, cols = top + steps.view(1, size, 1), left + steps.view(1, 1, size)
        if self.hflip:
            mirrored = torch.rand(n, 1, 1, device=device) < 0.5
            cols = torch.where(mirrored, left + (size - 1) - steps.view(1, 1, size), cols)
        index = (rows * width + cols).view(n, 1, size * size).expand(n, channels, size * size)
        return images.flatten(2).gather(2, index).view(n, channels, size, size)

    def extra_repr(self) -> str:
        return (f"size={self.size}, padding={self.padding}, pad_mode={self.pad_mode}, hflip={self.hflip}, "
                f"centred={self.centred}")


class Downscale(nn.Module):
    """Images resized to `size` x `size`: bilinear with antialiasing, so a smaller copy averages the
    pixels it stands for rather than picking some of them (aliasing)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class RandomResizedCropFlip(nn.Module):
    """torchvision's RandomResizedCrop (scale, ratio, ten tries, then the centre crop that fits the
    ratio), resized bilinearly to `size`, and mirrored with probability 1/2 when `hflip`.

    Written here for the reason `RandomCropFlip` is: the boxes are drawn on the images' device,
    ten tries per image at once, and crop, resize and flip are one `grid_sample`, so the step
    never waits for the GPU. kornia's RandomResizedCrop + RandomHorizontalFlip took 1.5 ms of
    host time per call on two tiny images, this 0.3 ms (benchmarks/augment_cpu.py).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 hflip: bool = False, ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__()
        self.size, self.scale, self.hflip, self.ratio = size, scale, hflip, ratio

    def boxes(self, n: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """N x 4 crop boxes (top, left, height, width) in pixels."""
        tries = 10
        area = height * width * torch.empty(n, tries, device=device).uniform_(*self.scale)
        log_ratio = torch.empty(n, tries, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w, h = (area * log_ratio.exp()).sqrt().round(), (area / log_ratio.exp()).sqrt().round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.float().argmax(1, keepdim=True)  # the first try that fits, as torchvision takes it
        found = fits.any(1)
        # No try fits: the largest centred crop whose ratio is within range.
        w = torch.where(found, w.gather(1, first)[:, 0], float(min(width, round(height * self.ratio[1]))))
        h = torch.where(found, h.gather(1, first)[:, 0], float(min(height, round(width / self.ratio[0]))))
        top = torch.where(found, (torch.rand(n, device=device) * (height - h + 1)).floor(), (height - h) // 2)
        left = torch.where(found, (torch.rand(n, device=device) * (width - w + 1)).floor(), (width - w) // 2)
        return torch.stack((top, left, h, w), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        top, left, h, w = self.boxes(n, height, width, images.device).unbind(1)
        mirrored = (torch.rand(n, device=images.device) < 0.5) if self.hflip else None
        return crop_resize(images, top, left, h, w, self.size, mirrored)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}"


def crop_resize(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                size: int, mirrored: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box [top, top + h) x [left, left + w) resized bilinearly to size x size, mirrored
    where `mirrored`: one affine grid_sample, equal to cutting the box out and F.interpolate'ing it."""
    n, channels, height, width = images.shape
    if n == 0:  # affine_grid refuses an empty batch (a batch of unreadable files)
        return images.new_empty((0, channels, size, size))
    scale_x, scale_y = w / width, h / height
    if mirrored is not None:
        scale_x = torch.where(mirrored, -scale_x, scale_x)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, (2 * left + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, channels, size, size], align_corners=False)
    # Samples stay on the box's pixel centres: its edge pixels repeat rather than blend with the
    # pixels outside it, as when the box is cut out first and then resized.
    low = torch.stack(((2 * left + 1) / width - 1, (2 * top + 1) / height - 1), 1).view(n, 1, 1, 2)
    high = torch.stack(((2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1), 1).view(n, 1, 1, 2)
    grid = torch.minimum(torch.maximum(grid, low.to(grid.dtype)), high.to(grid.dtype))
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """float [0, 1] images -> (x - mean) / std, per channel."""
    mean, std = _channel_constants(preprocessing.mean, preprocessing.std, images.device, images.dtype)
    return (images - mean) / std


@functools.lru_cache(maxsize=64)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as 1 x C x 1 x 1 tensors on `device`, made once: a fresh copy to a GPU waits for
    everything queued on it, which would stall every training step."""
    with torch.inference_mode(False):  # usable in training too, wherever they were first made
        return (torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1),
                torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1))


def resize_center_crop(image: Image.Image, resize: int, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Shorter side to `resize`, then the central `crop` square, as a uint8 3 x crop x crop tensor.

    Bilinear and bicubic resizing is PyTorch's antialiased uint8 kernel (`F.interpolate` with
    `antialias=True`, what torchvision's tensor transforms use): within one grey level of
    Pillow's filters (tested) and about 3x faster on one core, which counts where decoding
    feeds a GPU (docs/BENCHMARKS.md). Nearest stays with Pillow: torch's nearest modes pick
    other pixels at some half-way positions (Pillow computes them in fixed point).
    """
    if interpolation == "nearest":
        height, width = resized_size(image.height, image.width, resize, crop)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.NEAREST)
    # 3 x H x W over the H x W x 3 pixels: the channels-last layout the fast uint8 kernel works in.
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return resize_center_crop_pixels(pixels[None], resize, crop, interpolation)[0]


def resized_size(height: int, width: int, resize: int, crop: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `resize`, and neither side under `crop`."""
    if min(height, width) == resize:
        return height, width
    scale = resize / min(height, width)
    return max(crop, round(height * scale)), max(crop, round(width * scale))


def center_crop_box(height: int, width: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """The square `resize_center_crop` keeps, in the original image's pixels: (left, top, right, bottom)."""
    resized_height, resized_width = resized_size(height, width, resize, crop)
    top, left = (resized_height - crop) // 2, (resized_width - crop) // 2
    down, across = height / resized_height, width / resized_width
    return round(left * across), round(top * down), round((left + crop) * across), round((top + crop) * down)


def resize_center_crop_pixels(pixels: torch.Tensor, resize: int, crop: int,
                              interpolation: str = "bilinear") -> torch.Tensor:
    """`resize_center_crop` of uint8 images of one size, N x 3 x H x W, on any device (what
    `--decoder torchvision` decodes to).

    On the CPU bilinear and bicubic use PyTorch's antialiased uint8 kernel. CUDA has no such
    kernel: there the same filter runs in float32 and is rounded back, which is within one grey
    level of it except where bicubic enlarging overshoots (the uint8 kernel, like Pillow, clips
    between its horizontal and vertical passes; tested). Nearest is "nearest-exact": Pillow's
    choice of pixel but at some half-way positions (5% of them in a test that shrinks).
    """
    height, width = resized_size(pixels.shape[-2], pixels.shape[-1], resize, crop)
    if pixels.shape[-2:] != (height, width):
        if interpolation == "nearest":
            pixels = F.interpolate(pixels, size=(height, width), mode="nearest-exact")
        elif pixels.device.type == "cpu":
            pixels = F.interpolate(pixels, size=(height, width), mode=interpolation, antialias=True)
        else:
            pixels = resize_in_float(pixels, height, width, interpolation)
    top, left = (height - crop) // 2, (width - crop) // 2
    return pixels[..., top:top + crop, left:left + crop]


def resize_in_float(pixels: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """The antialiased resize of uint8 N x 3 x H x W pixels computed in float32, rounded and clamped back."""
    resized = F.interpolate(pixels.float(), size=(height, width), mode=interpolation, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Class indices, or multi-hot rows (multi-label), as float targets with `smoothing`: each class gets
    smoothing / num_classes, and a present class 1 - smoothing on top."""
    if labels.dim() == 2:
        return labels.float() * (1.0 - smoothing) + smoothing / num_classes
    targets = torch.full((len(labels), num_classes), smoothing / num_classes, device=labels.device)
    targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + smoothing / num_classes)
    return targets


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one per batch, chosen at random when both are on) -> images, targets.

    Without mixing the targets are the labels themselves (cross_entropy applies the
    smoothing; class indices are its fast path); with mixing they are soft targets,
    smoothing included. Each image is mixed with another of the same batch (a random
    permutation). CutMix's weight is the pasted box's actual area after clipping.
    """
    if not mixup and not cutmix:
        return images, labels
    targets = soft_targets(labels, num_classes, smoothing)
    use_cutmix = bool(cutmix) and (not mixup or torch.rand(()).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(images), device=images.device)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        images = images.clone()
        images[..., top:bottom, left:right] = images[perm][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, lam * targets + (1 - lam) * targets[perm]
