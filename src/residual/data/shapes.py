"""The built-in synthetic images: one filled shape on a noisy, textured background, or for
multi-label training none to three different shapes on one background (`write_multi_label_shapes`).

Each of the ten classes is distinguishable under any rotation (no square vs
diamond). Position, size, rotation and colours are random; the background is a
colour gradient with low-frequency blotches, pixel noise and a few clutter
lines, so a linear model cannot just threshold colours. Every image comes with
its exact shape mask, used to check that explanations look at the shape.
Rendering is 4x supersampled for clean edges, and deterministic given the
random generator.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_path, write_json
from ..progress import progress_bar

SHAPE_CLASSES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "arrow")
_SUPERSAMPLE = 4


def _regular_polygon(sides: int, radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(2 * math.pi * k / sides), radius * math.sin(2 * math.pi * k / sides))
            for k in range(sides)]


def _outline(shape: str) -> list[tuple[float, float]]:
    """Polygon vertices in unit coordinates (radius about 1) for polygonal shapes."""
    if shape in ("triangle", "square", "pentagon", "hexagon"):
        return _regular_polygon({"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape])
    if shape == "star":
        return [(r * math.cos(math.pi * k / 5), r * math.sin(math.pi * k / 5))
                for k, r in zip(range(10), [1.0, 0.42] * 5)]
    if shape == "cross":
        a, b = 0.3, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "arrow":
        return [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)]
    raise ValueError(f"unknown shape {shape!r}; classes are {SHAPE_CLASSES}")


def _draw_mask(shape: str, size: int, center: tuple[float, float], radius: float, angle: float) -> Image.Image:
    """The shape's mask at `size` x `size` (0 outside, 255 inside), anti-aliased."""
    big = size * _SUPERSAMPLE
    cx, cy, r = center[0] * _SUPERSAMPLE, center[1] * _SUPERSAMPLE, radius * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)

    def disc(dx: float, dy: float, rr: float, fill: int) -> None:
        ox, oy = dx * math.cos(angle) - dy * math.sin(angle), dx * math.sin(angle) + dy * math.cos(angle)
        x, y = cx + ox * r, cy + oy * r
        draw.ellipse([x - rr * r, y - rr * r, x + rr * r, y + rr * r], fill=fill)

    if shape == "circle":
        disc(0, 0, 0.9, 255)
    elif shape == "ring":
        disc(0, 0, 1.0, 255)
        disc(0, 0, 0.55, 0)
    elif shape == "crescent":
        disc(0, 0, 0.95, 255)
        disc(0.45, 0, 0.8, 0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _outline(shape)]
        draw.polygon(points, fill=255)
    return mask.resize((size, size), Image.Resampling.BOX)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A float RGB array: gradient between two colours, blotches, noise and clutter lines."""
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = ((xs - 0.5) * math.cos(theta) + (ys - 0.5) * math.sin(theta) + 0.71) / 1.42
    image = c1 * (1 - t[..., None]) + c2 * t[..., None]
    blotches = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((size, size),
                                                                                        Image.Resampling.BICUBIC)
    image += (np.asarray(blotches, dtype=np.float64) - 127.5) * 0.35
    lines = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(lines)
    for _ in range(rng.integers(1, 4)):
        draw.line([tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))], fill=255,
                  width=max(1, size // 32))
    image += (np.asarray(lines, dtype=np.float64)[..., None] / 255.0) * rng.uniform(-90, 90, 3)
    return image + rng.normal(0, 10, image.shape)


def _paint(background: np.ndarray, mask: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """`background` with the mask's shape painted on in a colour far from the background's mean (so the
    shape is always visible), shaded with noise."""
    mean = background.reshape(-1, 3).mean(0)
    colour = rng.uniform(0, 255, 3)
    while np.linalg.norm(colour - mean) < 110:
        colour = rng.uniform(0, 255, 3)
    shaded = colour + rng.normal(0, 12, background.shape)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    return background * (1 - alpha) + shaded * alpha


def render_shape(shape: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """One RGB image of `shape` and its L-mode mask (255 on the shape), both `size` x `size`."""
    if shape not in SHAPE_CLASSES:
        raise ValueError(f"unknown shape {shape!r}; classes are {SHAPE_CLASSES}")
    background = _background(size, rng)
    radius = rng.uniform(0.22, 0.42) * size
    center = tuple(rng.uniform(radius, size - radius, 2))
    mask = _draw_mask(shape, size, center, radius, rng.uniform(0, 2 * math.pi))
    image = np.clip(_paint(background, mask, rng), 0, 255).astype(np.uint8)
    return Image.fromarray(image, "RGB"), mask


def render_shapes(shapes: list[str], size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image holding each of `shapes` (any number, none included) side by side, none overlapping:
    each in a disc of its own."""
    unknown = [shape for shape in shapes if shape not in SHAPE_CLASSES]
    if unknown:
        raise ValueError(f"unknown shape {unknown[0]!r}; classes are {SHAPE_CLASSES}")
    image = _background(size, rng)
    for shape, (x, y, radius) in zip(shapes, _disc_layout(len(shapes), size, rng)):
        image = _paint(image, _draw_mask(shape, size, (x, y), radius, rng.uniform(0, 2 * math.pi)), rng)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def _disc_layout(count: int, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """`count` discs (x, y, radius) inside the image, none overlapping, by rejection sampling. A first disc
    in the middle can leave no room for a third, so a layout not complete after 20 draws per disc starts over."""
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(20 * count):
            if len(placed) == count:
                break
            radius = rng.uniform(0.15, 0.22) * size
            x, y = rng.uniform(radius, size - radius, 2)
            if all(math.dist((x, y), (px, py)) > radius + pr for px, py, pr in placed):
                placed.append((float(x), float(y), float(radius)))
        if len(placed) == count:
            return placed


SPLITS = ("train", "val", "test")
MANIFEST = "shapes.json"


def split_sizes(per_class: int) -> dict[str, int]:
    """Images per class in each split: `per_class` to train, a fifth of it each to val and test."""
    held_out = max(10, per_class // 5)
    return {"train": per_class, "val": held_out, "test": held_out}


def write_shapes(out_dir: str | Path, size: int = 32, per_class: int = 1000, seed: int = 0, masks: bool = False,
                 progress: bool = True) -> Path:
    """Write the `shapes` dataset as an ImageFolder of PNGs: OUT/{train,val,test}/<class>/NNNNN.png.

    With masks=True each image's mask goes to OUT/masks/<split>/<class>/NNNNN.png, outside the
    class folders. Every image has its own generator seeded by (seed, split, class, index), so
    the data is the same on every machine and any one image can be redrawn alone. If OUT already
    holds this exact dataset (same manifest), nothing is redrawn.
    """
    out_dir = Path(out_dir)
    manifest = {"dataset": "shapes", "size": size, "per_class": per_class, "seed": seed, "masks": masks,
                "classes": list(SHAPE_CLASSES), "splits": split_sizes(per_class), "format": 1}
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return out_dir
    jobs = [(split, class_index, index) for split in SPLITS for class_index in range(len(SHAPE_CLASSES))
            for index in range(split_sizes(per_class)[split])]
    with progress_bar("drawing shapes", progress) as bar:
        task = bar.add_task("shapes", total=len(jobs))
        for split, class_index, index in jobs:
            shape = SHAPE_CLASSES[class_index]
            rng = np.random.default_rng([seed, SPLITS.index(split), class_index, index])
            image, mask = render_shape(shape, size, rng)
            name = f"{index:05d}.png"
            (out_dir / split / shape).mkdir(parents=True, exist_ok=True)
            image.save(out_dir / split / shape / name)
            if masks:
                (out_dir / "masks" / split / shape).mkdir(parents=True, exist_ok=True)
                mask.save(out_dir / "masks" / split / shape / name)
            bar.advance(task)
    # The manifest is written last: its presence means the dataset is complete.
    write_json(manifest_path, manifest)
    return out_dir


MULTI_LABEL_CSV = "labels.csv"
# How many shapes a multi-label image holds: 0 to 3, a tenth of the images none (a picture can have no label).
SHAPES_PER_IMAGE = {0: 0.1, 1: 0.3, 2: 0.3, 3: 0.3}


def multi_label_split_sizes(train_images: int) -> dict[str, int]:
    """Images in each split of the multi-label set: `train_images` to train, a fifth of it (at least 10) each to
    val and test."""
    held_out = max(10, train_images // 5)
    return {"train": train_images, "val": held_out, "test": held_out}


def write_multi_label_shapes(out_dir: str | Path, size: int = 48, train_images: int = 4000, seed: int = 0,
                             progress: bool = True) -> Path:
    """Write the multi-label `shapes` dataset: OUT/{train,val,test}/NNNNN.png, and OUT/labels.csv with one
    image,labels,split row per image, its labels the shapes it holds separated by spaces (what `residual
    train OUT/labels.csv` reads as multi-label); split sizes as `multi_label_split_sizes`. Seeded per image,
    as `write_shapes`; an OUT holding this exact dataset is left as it is."""
    out_dir = Path(out_dir)
    sizes = multi_label_split_sizes(train_images)
    manifest = {"dataset": "shapes-multi-label", "size": size, "train_images": train_images, "seed": seed,
                "classes": list(SHAPE_CLASSES), "shapes_per_image": SHAPES_PER_IMAGE, "splits": sizes, "format": 1}
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return out_dir
    counts, shares = list(SHAPES_PER_IMAGE), list(SHAPES_PER_IMAGE.values())
    rows = []
    with progress_bar("drawing shapes", progress) as bar:
        task = bar.add_task("shapes", total=sum(sizes.values()))
        for split in SPLITS:
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            for index in range(sizes[split]):
                rng = np.random.default_rng([seed, SPLITS.index(split), index, len(SHAPE_CLASSES)])
                chosen = rng.choice(len(SHAPE_CLASSES), rng.choice(counts, p=shares), replace=False)
                shapes = [SHAPE_CLASSES[c] for c in chosen]
                name = f"{split}/{index:05d}.png"
                render_shapes(shapes, size, rng).save(out_dir / name)
                rows.append((name, " ".join(sorted(shapes)), split))
                bar.advance(task)
    with atomic_path(out_dir / MULTI_LABEL_CSV) as tmp, open(tmp, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(("image", "labels", "split"))
        writer.writerows(rows)
    write_json(manifest_path, manifest)  # last: its presence means the dataset is complete
    return out_dir
