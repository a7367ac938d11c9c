"""JPEG decoding for a 224 px model: reduced-size (draft mode) decoding against full decoding, on the CPU.

Two folders of generated photo-like JPEGs: ImageNet-like (500x375) and phone-camera-like
(4000x3000). Each image is read and resized/cropped to 256 -> 224 exactly as the loaders
do, once with `read_image(path)` (full decode) and once with `read_image(path, 256)`
(Pillow draft mode: the JPEG's DCT scales 1/2, 1/4, 1/8 that keep the short side >= 256),
and by a plain PIL loop (open, convert, resize, crop) as the peer. One process, rounds
alternating; the first round is warm-up. Also reports how far the reduced decode moves
the model's input (mean absolute pixel difference, of 255).

Then the training file loader (`FileLoader`: DataLoader workers, batches of 64 stored
256 x 256 images, as `residual train` stores them for a 224 px model) on the ImageNet-like
folder with 1 and 2 decoding workers, beside the same read in a plain loop on one core:
whether N workers deliver N cores' worth of decoding, which is what the JPEG goal's
estimate for 15 workers on the GPU machine assumes.

`--decoder torchvision` leaves the workers only reading each file and checking its
header (`read_encoded`): its row in the first table is that per-image cost on one core,
and, where torchvision imports, the loader table adds how many images/s 1 and 2 such
workers hand over (the device decode that follows is left out: on a CPU it is
libjpeg-turbo in the training process, not the GPU's decoder it stands in for).

    .venv/bin/python benchmarks/decode_cpu.py [--images 100] [--rounds 3] [--loader-images 512]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from residual.bench import write_jpegs
from residual.data.datasets import Split
from residual.data.decode import read_image
from residual.data.device_decode import read_encoded
from residual.data.loaders import BadFileLog, FileLoader
from residual.errors import ConfigError
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
    "read_encoded (a --decoder torchvision worker)": lambda path: read_encoded(path, 256, 224, "bilinear"),
}


def loader_table(paths: list[Path], rounds: int) -> None:
    """images/s of the training file loader with 1 and 2 workers against one core's plain loop."""
    split = Split(files=paths, labels=[0] * len(paths))
    print("\n| 500x375 JPEGs -> 256 px stored | images/s median | min - max | x one core |")
    print("|---|---:|---:|---:|")
    one_core = []
    for round_index in range(rounds + 1):
        start = time.perf_counter()
        for path in paths:
            resize_center_crop(read_image(path, 256), 256, 256)
        if round_index:
            one_core.append(len(paths) / (time.perf_counter() - start))
    print(f"| {len(paths)} images, plain loop, one core | {statistics.median(one_core):.0f} "
          f"| {min(one_core):.0f} - {max(one_core):.0f} | 1.00 |")
    for decoder in ("pillow", "torchvision"):
        for workers in (1, 2):
            try:
                loader = FileLoader(split, 64, True, 0, torch.device("cpu"), 256, 256, "bilinear", workers,
                                    BadFileLog(), decoder=decoder)
            except ConfigError as error:
                print(f"| FileLoader --decoder {decoder}: skipped ({error}) | | | |")
                break
            rates = []
            for epoch in range(rounds + 1):  # the first epoch starts the workers
                loader.sampler.epoch = epoch
                start = time.perf_counter()
                if decoder == "pillow":
                    count = sum(len(images) for images, _ in loader.epoch(epoch))
                else:  # what the workers hand over: bytes and header checks, decoding on the device left out
                    count = sum(len(batch.indices) for batch in loader.loader)
                if epoch:
                    rates.append(count / (time.perf_counter() - start))
            label = "FileLoader" if decoder == "pillow" else "FileLoader --decoder torchvision, workers only"
            del loader  # its persistent workers end before the next loader's fork
            gc.collect()
            median = statistics.median(rates)
            print(f"| {label}, {workers} worker{'s' * (workers > 1)} | {median:.0f} | {min(rates):.0f} - "
                  f"{max(rates):.0f} | {median / statistics.median(one_core):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loader-images", type=int, default=512)
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
        loader_paths = sorted((write_jpegs(Path(root) / "loader", (500, 375), args.loader_images) / "train")
                              .rglob("*.jpg"))
        loader_table(loader_paths, args.rounds)


if __name__ == "__main__":
    main()
