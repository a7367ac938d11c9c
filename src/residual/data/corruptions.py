"""Common corruptions of images, at five severities: noise, blur, weather and digital artefacts.

The fifteen corruptions of ImageNet-C (Hendrycks & Dietterich 2019, "Benchmarking neural network
robustness to common corruptions and perturbations"), in its four kinds, with the severity parameters of
one of two protocols: ImageNet-C's, given for 224 px images, or CIFAR-10-C's, which the same authors tuned
by hand for 32 px. They work on batches of images as the model takes them (after its resize and crop), so
any dataset can be corrupted on the fly; lengths in pixels (blur radii, motion length, snow's flakes) are
scaled from the protocol's image size to the batch's. Frost overlays ImageNet-C's six frost photographs,
which the caller gives (robustness.frost_photographs fetches them). Glass blur keeps the sequential order
of its pixel copies (on the host, vectorised over the batch). Elastic transform is the authors' own
(make_imagenet_c.py, make_cifar_c.py: an affine warp, then a smooth displacement), not the
`imagecorruptions` package's rewrite, which drops the affine step.

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


def motion_blur(x: torch.Tensor, radius: float, sigma: float, generator: torch.Generator,
                degrees: tuple[float, float] = (-45, 45)) -> torch.Tensor:
    """A camera moving while it exposes: each pixel the Gaussian-weighted (sigma px) average of the pixels
    behind it along a line of 2 x `radius` px, at an angle drawn per image from `degrees`; each step along
    the line is rounded to whole pixels, as ImageMagick's motion blur (ImageNet-C's) rounds it."""
    low, high = (math.radians(d) for d in degrees)
    angle = torch.empty(len(x), device=x.device).uniform_(low, high, generator=generator)
    taps = torch.arange(math.ceil(2 * radius) + 1, dtype=x.dtype, device=x.device)
    weights = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    weights = weights / weights.sum()
    out = torch.zeros_like(x)
    for tap, weight in zip(taps, weights):
        out += weight * _shifted(x, (tap * torch.cos(angle)).round(), (tap * torch.sin(angle)).round())
    return out


def zoom_blur(x: torch.Tensor, zooms: tuple[float, ...]) -> torch.Tensor:
    """Zooming while exposing: the image averaged with its centre enlarged by each factor in `zooms`."""
    return (x + sum(clipped_zoom(x, zoom) for zoom in zooms)) / (len(zooms) + 1)


def fog(x: torch.Tensor, thickness: float, roughness: float, generator: torch.Generator) -> torch.Tensor:
    """Fog: a plasma-fractal cloud (`plasma_fractal`, `roughness` its decay) of strength `thickness` added, then
    every image scaled back by its brightest value over that value plus `thickness`."""
    size = max(x.shape[-2:])
    cloud = plasma_fractal(len(x), 1 << (size - 1).bit_length(), roughness, generator, x.device)
    brightest = x.amax((1, 2, 3), keepdim=True)
    foggy = x + thickness * cloud[:, None, :x.shape[-2], :x.shape[-1]]
    return foggy * brightest / (brightest + thickness)


def plasma_fractal(count: int, size: int, roughness: float, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` square height maps of side `size` (a power of two) in [0, 1], by the diamond-square algorithm:
    the midpoints of each level's squares, then of their diamonds, are the mean of their four corners plus
    noise, whose amplitude falls by `roughness` squared at each level (the wrap-around edges tile)."""
    maps = torch.zeros(count, size, size, device=device)
    step, wibble = size, 100.0

    def wibbled(total: torch.Tensor) -> torch.Tensor:  # the mean of four corners, plus noise
        noise = torch.rand(total.shape, generator=generator, device=device) * 2 - 1
        return total / 4 + wibble * wibble * noise

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        maps[:, half::step, half::step] = wibbled(squares + squares.roll(-1, 2))
        centres, corners = maps[:, half::step, half::step], maps[:, ::step, ::step]
        maps[:, ::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        maps[:, half::step, ::step] = wibbled(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / roughness
    low = maps.amin((1, 2), keepdim=True)
    return (maps - low) / (maps.amax((1, 2), keepdim=True) - low)


def snow(x: torch.Tensor, flakes: tuple[float, ...], scale: float, generator: torch.Generator) -> torch.Tensor:
    """Snow: a layer of Gaussian noise (mean, spread) enlarged by a zoom, kept above a threshold, streaked
    by motion blur (radius, sigma) falling at -135 to -45 degrees, added twice (the second turned upside
    down) to the image, first brightened towards its grey level by the blend's complement (ImageNet-C's
    parameters in that order). `scale`: the image's size over the protocol's, for the zoom and the streaks."""
    mean, spread, zoom, threshold, radius, sigma, blend = flakes
    layer = mean + spread * torch.randn((len(x), 1, *x.shape[-2:]), generator=generator, device=x.device)
    layer = clipped_zoom(layer, max(1.0, zoom * scale))
    layer = torch.where(layer < threshold, 0.0, layer).clamp(0, 1)
    layer = motion_blur(layer, radius * scale, sigma * scale, generator, degrees=(-135, -45))
    layer = (layer * 255).round() / 255
    grey = kornia.color.rgb_to_grayscale(x)
    x = blend * x + (1 - blend) * torch.maximum(x, grey * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)


def frost(x: torch.Tensor, mix: tuple[float, float], photos: list[torch.Tensor], shrink: float,
          generator: torch.Generator) -> torch.Tensor:
    """Frost on a window: the image times mix[0] plus a crop of a frost photograph times mix[1]. Per image,
    one of the first five of the six photographs (the authors' randint(5) never draws the sixth), resized by
    `shrink` as OpenCV's bilinear resize does it (no antialiasing, whole grey levels), at a random offset.
    `photos`: uint8 3 x H x W each, in ImageNet-C's order."""
    n, _, height, width = x.shape
    resized = [F.interpolate(photo[None].to(x), scale_factor=shrink, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False).round().clamp(0, 255)[0] / 255 for photo in photos[:5]]
    for photo in resized:
        if photo.shape[1] <= height or photo.shape[2] <= width:
            raise ConfigError(f"a frost photograph of {photo.shape[2]} x {photo.shape[1]} px is too small to crop "
                              f"{width} x {height} px from; give ImageNet-C's own photographs")
    # Drawn on the host, image by image in the authors' order: photograph, then row and column offsets.
    out = torch.empty_like(x)
    for i in range(n):
        photo = resized[int(torch.randint(len(resized), (), generator=generator))]
        top = int(torch.randint(photo.shape[1] - height, (), generator=generator))
        left = int(torch.randint(photo.shape[2] - width, (), generator=generator))
        out[i] = mix[0] * x[i] + mix[1] * photo[:, top:top + height, left:left + width]
    return out


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """The centre of each image enlarged `zoom` times, cut back to its size: ImageNet-C's helper. Its centre
    ceil(side / zoom) pixels are resized bilinearly with the corner pixels aligned (SciPy's zoom, which it
    uses), so the new pixels seldom fall on old ones: noise enlarged this way keeps the spread it has there."""
    height, width = x.shape[-2:]
    crop_h, crop_w = math.ceil(height / zoom), math.ceil(width / zoom)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = x[..., top:top + crop_h, left:left + crop_w]
    out = F.interpolate(crop, size=(round(crop_h * zoom), round(crop_w * zoom)), mode="bilinear", align_corners=True)
    trim_top, trim_left = (out.shape[-2] - height) // 2, (out.shape[-1] - width) // 2
    return out[..., trim_top:trim_top + height, trim_left:trim_left + width]


def elastic_transform(x: torch.Tensor, strength: float, smoothness: float, jitter: float, generator: torch.Generator,
                      reference_size: int) -> torch.Tensor:
    """An elastic warp, as ImageNet-C's authors make it: first a random affine warp (three points around the
    centre, a third of the side out, each moved by up to `jitter` px), then every pixel displaced by a smooth
    random field (uniform noise in [-1, 1] per pixel, Gaussian-blurred with sigma `smoothness` px, times
    `strength` px). The lengths are the protocol's, for `reference_size` images: the field is drawn at that
    size and stretched to the batch's, so the warp moves the same share of the picture at any size."""
    scale = x.shape[-1] / reference_size
    moves = (torch.rand(len(x), 3, 2, generator=generator, device=x.device) * 2 - 1) * jitter * scale
    noise = torch.rand(len(x), 2, reference_size, reference_size, generator=generator, device=x.device) * 2 - 1
    return elastic_warp(x, moves, gaussian_filter(noise, smoothness, truncate=3, edges="mirror") * strength, scale)


def elastic_warp(x: torch.Tensor, moves: torch.Tensor, field: torch.Tensor, scale: float) -> torch.Tensor:
    """`elastic_transform` with its random draws given: `moves` (N x 3 x 2, px at the batch's size) of the
    affine warp's three points, `field` (N x 2 x R x R: x then y displacement, px at the reference size R).
    Both steps resample bilinearly, as the authors' two (OpenCV's warpAffine, edges reflected without
    repeating the edge pixel; SciPy's map_coordinates, edges mirrored)."""
    count, _, height, width = x.shape
    centre_x, centre_y, reach = width // 2, height // 2, min(height, width) // 3
    points = torch.tensor([[centre_x + reach, centre_y + reach], [centre_x + reach, centre_y - reach],
                           [centre_x - reach, centre_y - reach]], dtype=x.dtype, device=x.device)
    corners = torch.cat([points, torch.ones(3, 1, dtype=x.dtype, device=x.device)], 1)
    affine = torch.linalg.solve(corners, points + moves).transpose(1, 2)  # N x 2 x 3: points -> moved points
    inverse = torch.linalg.inv(torch.cat([affine, affine.new_tensor([0, 0, 1]).expand(count, 1, 3)], 1))
    rows, columns = torch.meshgrid(torch.arange(height, dtype=x.dtype, device=x.device),
                                   torch.arange(width, dtype=x.dtype, device=x.device), indexing="ij")
    pixels = torch.stack([columns, rows, torch.ones_like(rows)], -1)  # H x W x 3, (x, y, 1)
    source = torch.einsum("nij,hwj->nhwi", inverse[:, :2], pixels)  # where each output pixel comes from
    warped = F.grid_sample(x, _normalised(source, width, height, corners_aligned=True), mode="bilinear",
                           padding_mode="reflection", align_corners=True)
    displacement = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False) * scale
    source = torch.stack([columns, rows], -1) + displacement.permute(0, 2, 3, 1)
    return F.grid_sample(warped, _normalised(source, width, height, corners_aligned=False), mode="bilinear",
                         padding_mode="reflection", align_corners=False)


def _normalised(pixels: torch.Tensor, width: int, height: int, corners_aligned: bool) -> torch.Tensor:
    """(x, y) pixel positions as grid_sample's [-1, 1] coordinates."""
    size = pixels.new_tensor([width, height])
    return pixels * 2 / (size - 1) - 1 if corners_aligned else (pixels * 2 + 1) / size - 1


def gaussian_filter(maps: torch.Tensor, sigma: float, truncate: float = 4.0, edges: str = "nearest") -> torch.Tensor:
    """The last two axes blurred by a Gaussian of `sigma` px cut at `truncate` sigma, as SciPy's gaussian_filter
    (which scikit-image's gaussian, ImageNet-C's blur, calls): `edges` 'nearest' repeats the edge pixels,
    'mirror' mirrors the image (d c b a | a b c d) as often as the kernel needs (the elastic warp's kernel
    at ImageNet-C's severity 1 is wider than the image)."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    for axis in (-1, -2):
        side = maps.shape[axis]
        index = torch.arange(-radius, side + radius, device=maps.device)
        if edges == "mirror":
            index = index % (2 * side)
            index = torch.where(index >= side, 2 * side - 1 - index, index)
        else:
            index = index.clamp(0, side - 1)
        padded = maps.index_select(axis, index)
        maps = _correlate(padded, kernel, axis, side)
    return maps


SUMMED_TAPS_UP_TO = 33  # kernels up to this long are summed shift by shift, longer ones go through conv1d


def _correlate(padded: torch.Tensor, kernel: torch.Tensor, axis: int, side: int) -> torch.Tensor:
    """`padded` (its `axis` padded by the kernel's radius on each side) correlated with `kernel` along it.

    A short kernel is faster as a weighted sum of shifted views: conv1d over millions of one-channel rows
    took 21 s to blur 1,000 images of 224 px on the CPU where the sum took 2.8 s. The elastic warp's long
    kernels (up to 1,025 taps) stay with conv1d."""
    if len(kernel) > SUMMED_TAPS_UP_TO:
        rows = padded.movedim(axis, -1)
        blurred = F.conv1d(rows.reshape(-1, 1, rows.shape[-1]), kernel.view(1, 1, -1))
        return blurred.reshape(*rows.shape[:-1], side).movedim(-1, axis)
    out = padded.narrow(axis, 0, side) * kernel[0]
    for shift in range(1, len(kernel)):
        out.add_(padded.narrow(axis, shift, side), alpha=float(kernel[shift]))
    return out


def glass_blur(x: torch.Tensor, sigma: float, reach: int, rounds: int, generator: torch.Generator) -> torch.Tensor:
    """Frosted glass: blurred (sigma px) and cut to whole grey levels, then each pixel, from the bottom right
    to the top left (a `reach` wide border left out), replaced by a random neighbour up to `reach` px away
    (-reach to reach - 1 on each axis, per image), `rounds` times over, then blurred again. The pixels are
    replaced in that order one by one, so a pixel can take a value its neighbour took a moment before: this
    is ImageNet-C's glass blur as its code runs. Its loop reads as a swap, but with NumPy's views the second
    half of it writes back what the first wrote, so each step copies. Being sequential, the replacing runs
    pixel by pixel on the host, vectorised over the batch."""
    # + 1e-3: a flat patch blurs to k / 255 * 255, which floating point can leave a hair under k
    pixels = (gaussian_filter(x, sigma) * 255 + 1e-3).clamp(0, 255).to(torch.uint8)
    height, width = x.shape[-2:]
    rows, columns = range(height - reach, reach, -1), range(width - reach, reach, -1)
    # H x W x N x 3: one pixel of every image in one block, so each step reads and writes close together
    image, images = pixels.permute(2, 3, 0, 1).cpu().numpy().copy(), np.arange(len(x))
    for _ in range(rounds):
        for row in rows:
            offsets = torch.randint(-reach, reach, (len(columns), 2, len(x)), generator=generator).numpy()
            for column, (step_x, step_y) in zip(columns, offsets):
                image[row, column] = image[row + step_y, column + step_x, images]
    copied = torch.from_numpy(image).permute(2, 3, 0, 1).to(x.device, x.dtype) / 255
    return gaussian_filter(copied, sigma)


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
    """Each image shifted by its whole (dx, dy) pixels, its edge pixels repeated into the gap."""
    height, width = x.shape[-2:]
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -2 * dx / width, -2 * dy / height
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def _zooms(stop: float, step: float) -> tuple[float, ...]:
    return tuple(float(z) for z in np.arange(1, stop, step))


# Each corruption's kind, as ImageNet-C groups them. Frost came last, after the others: each corruption's
# random numbers are seeded by its place here, and the fourteen kept theirs.
CORRUPTIONS = {"gaussian_noise": "noise", "shot_noise": "noise", "impulse_noise": "noise", "defocus_blur": "blur",
               "glass_blur": "blur", "motion_blur": "blur", "zoom_blur": "blur", "snow": "weather", "fog": "weather",
               "brightness": "weather", "contrast": "digital", "elastic_transform": "digital", "pixelate": "digital",
               "jpeg_compression": "digital", "frost": "weather"}

# Per protocol: the image size its lengths in pixels are given for, and each corruption's parameter at
# severities 1-5. ImageNet-C's for 224 px images; CIFAR-10-C's, which its authors tuned by hand for 32 px
# (make_cifar_c.py), milder throughout.
PROTOCOLS = {
    "imagenet-c": (224, {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),  # sigma, reach, rounds
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "zoom_blur": (_zooms(1.11, 0.01), _zooms(1.16, 0.01), _zooms(1.21, 0.02), _zooms(1.26, 0.02),
                      _zooms(1.31, 0.03)),
        "snow": ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
                 (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
        # (image's weight, frost's weight); the photographs cropped at their own size
        "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
        "fog": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        # (strength, smoothness, jitter) in px; the authors wrote 244 x a share, meaning 224, and kept it
        "elastic_transform": ((244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                              (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                              (244 * 0.12, 244 * 0.01, 244 * 0.02)),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "jpeg_compression": (25, 18, 15, 10, 7),
    }),
    "cifar-10-c": (32, {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "zoom_blur": (_zooms(1.06, 0.01), _zooms(1.11, 0.01), _zooms(1.16, 0.01), _zooms(1.21, 0.01),
                      _zooms(1.26, 0.01)),
        "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                 (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
        # the photographs shrunk to a fifth first (FROST_SHRINK)
        "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
        "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "elastic_transform": ((32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                              (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                              (32 * 0.1, 32 * 0.03, 32 * 0.03)),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
        "jpeg_compression": (80, 65, 58, 50, 40),
    }),
}
FROST_SHRINK = {"imagenet-c": 1.0, "cifar-10-c": 0.2}  # the frost photographs' scale at the protocol's size
SMALL_IMAGES = 64  # up to this size, `protocol_for` picks CIFAR-10-C's parameters


def protocol_for(image_size: int) -> str:
    """CIFAR-10-C's parameters for small images, ImageNet-C's for the rest: each set's lengths were chosen for
    its own image size, and scaled far from it they misjudge (ImageNet-C's snow at 32 px is mostly white)."""
    return "cifar-10-c" if image_size <= SMALL_IMAGES else "imagenet-c"


def check_corruptions(names: list[str], severities: list[int], protocol: str = "imagenet-c") -> None:
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"--corruptions: unknown {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    wrong = [s for s in severities if s not in SEVERITIES]
    if wrong or not severities:
        raise ConfigError(f"--severities are 1 (mild) to 5 (severe), got {', '.join(map(str, severities)) or 'none'}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator,
            protocol: str = "imagenet-c", frost_photos: list[torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 N x 3 x H x W images with corruption `name` at `severity` (1-5) of `protocol`'s parameters, as
    uint8 again. Frost needs `frost_photos`: ImageNet-C's six photographs (robustness.frost_photographs)."""
    check_corruptions([name], [severity], protocol)
    if name == "frost" and not frost_photos:
        raise ConfigError("frost needs ImageNet-C's frost photographs: `residual download frost` fetches them, or "
                          "--frost-dir names a folder of frost1.png ... frost6.jpg")
    reference_size, parameters = PROTOCOLS[protocol]
    parameter = parameters[name][severity - 1]
    if name == "jpeg_compression":
        return jpeg_compression(images, parameter)
    x = images.float() / 255
    scale = x.shape[-1] / reference_size  # the protocol's lengths in pixels are for its own image size
    if name == "gaussian_noise":
        x = gaussian_noise(x, parameter, generator)
    elif name == "shot_noise":
        x = shot_noise(x, parameter, generator)
    elif name == "impulse_noise":
        x = impulse_noise(x, parameter, generator)
    elif name == "defocus_blur":
        x = defocus_blur(x, parameter[0] * scale, parameter[1])
    elif name == "glass_blur":
        sigma, reach, rounds = parameter
        x = glass_blur(x, sigma * scale, max(1, round(reach * scale)), rounds, generator)
    elif name == "motion_blur":
        x = motion_blur(x, parameter[0] * scale, parameter[1] * scale, generator)
    elif name == "zoom_blur":
        x = zoom_blur(x, parameter)
    elif name == "snow":
        x = snow(x, parameter, scale, generator)
    elif name == "frost":
        x = frost(x, parameter, frost_photos, FROST_SHRINK[protocol] * scale, generator)
    elif name == "fog":
        x = fog(x, parameter[0], parameter[1], generator)
    elif name == "brightness":
        x = brightness(x, parameter)
    elif name == "contrast":
        x = contrast(x, parameter)
    elif name == "elastic_transform":
        x = elastic_transform(x, *parameter, generator, reference_size)
    elif name == "pixelate":
        x = pixelate(x, parameter)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
