"""JPEG decoding for a 224 px model: reduced-size (draft mode) decoding against full decoding, on the CPU.

Two folders of generated photo-like JPEGs: ImageNet-like (500x375) and phone-camera-like
(4000x3000). Each image is read and resized/cropped to 256 -> 224 exactly as the loaders
do, once with `read_image(path)` (full decode) and once with `read_image(path, 256)`
(Pillow draft mode: the JPEG's DCT scales 1/2, 1/4, 1/8 that keep the short side >= 256),
and by a plain PIL loop (open, convert, resize, crop) as the peer. One process, rounds
alternating; the first round is warm-up. Also reports how far the reduced decode moves
the model's input (mean absolute pixel difference, of 255).

    .venv/bin/python benchmarks/decode_cpu.py [--images 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from residual.bench import write_jpegs
from residual.data.decode import read_image
from residual.data.transforms import resize_center_crop


def plain(path: Path) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    return torch.from_numpy(np.asarray(image.crop((left, top, left + 224, top + 224))).copy())


PATHS = {
    "plain PIL loop": plain,
    "read_image (full decode)": lambda path: resize_center_crop(read_image(path), 256, 224),
    "read_image (draft, min_side 256)": lambda path: resize_center_crop(read_image(path, 256), 256, 224),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| images | path | images/s median | min - max | vs full decode |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        for label, size in (("500x375", (500, 375)), ("4000x3000", (4000, 3000))):
            paths = sorted((write_jpegs(Path(root) / label, size, args.images) / "train").rglob("*.jpg"))
            rates: dict[str, list[float]] = {name: [] for name in PATHS}
            for round_index in range(args.rounds + 1):
                for name, read in PATHS.items():
                    start = time.perf_counter()
                    for path in paths:
                        read(path)
                    if round_index:  # the first round warms caches
                        rates[name].append(len(paths) / (time.perf_counter() - start))
            full = statistics.median(rates["read_image (full decode)"])
            for name, r in rates.items():
                print(f"| {args.images} x {label} | {name} | {statistics.median(r):.1f} | {min(r):.1f} - {max(r):.1f} "
                      f"| {statistics.median(r) / full:.2f} |")
            diff = np.mean([(PATHS["read_image (full decode)"](p).int() - PATHS["read_image (draft, min_side 256)"](p)
                             .int()).abs().float().mean().item() for p in paths[:20]])
            print(f"| {label} | mean abs pixel difference, draft vs full | {diff:.2f} | | |")


if __name__ == "__main__":
    main()
