"""Prediction throughput of `residual predict` against plain PyTorch loops over the same files.

Decoding is included on both sides. Two workloads: many small PNGs through a
small network (resnet20 on 32 px `shapes`, where reading files dominates) and
larger JPEGs through resnet18 at 224 px (where the network dominates). Peers,
timed in the same process: a plain loop that decodes each batch in the main
process, and a plain DataLoader with as many workers as `residual` uses. Rounds
alternate so the machine's drift hits every path alike; the first round is
warm-up and left out. Prints a table; record it in docs/BENCHMARKS.md.

    python benchmarks/predict_cpu.py [--images 2000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import residual
from residual.data.decode import image_files
from residual.data.shapes import write_shapes
from residual.models.preprocessing import CIFAR_EVAL
from residual.predict import iter_predict

WORKERS = min(8, os.cpu_count() or 1)  # what residual predict uses by default


def prepare(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """Shorter side to `resize`, central `crop`: what anyone writes with PIL alone."""
    image = image.convert("RGB")
    scale = resize / min(image.size)
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class Files(torch.utils.data.Dataset):
    def __init__(self, files, resize, crop):
        self.files, self.resize, self.crop = files, resize, crop

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as image:
            return prepare(image, self.resize, self.crop)


@torch.inference_mode()
def classify(model, batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> list:
    probs = model((batch.float() / 255 - mean) / std).softmax(1)
    return probs.topk(5, dim=1).indices.tolist()


def plain_loop(model, files, batch_size) -> float:
    pre = model.preprocessing
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    start = time.perf_counter()
    for begin in range(0, len(files), batch_size):
        batch = []
        for path in files[begin:begin + batch_size]:
            with Image.open(path) as image:
                batch.append(prepare(image, pre.resize_size, pre.input_size))
        classify(model, torch.stack(batch), mean, std)
    return len(files) / (time.perf_counter() - start)


def plain_dataloader(model, files, batch_size) -> float:
    pre = model.preprocessing
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(Files(files, pre.resize_size, pre.input_size), batch_size=batch_size,
                                         num_workers=WORKERS)
    start = time.perf_counter()
    for batch in loader:
        classify(model, batch, mean, std)
    return len(files) / (time.perf_counter() - start)


def residual_predict(model, files, batch_size) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in iter_predict(model, files, topk=5, batch_size=batch_size))
    assert count == len(files)
    return len(files) / (time.perf_counter() - start)


def write_photos(folder: Path, count: int, size: tuple[int, int] = (320, 256)) -> list[Path]:
    """JPEGs of a typical camera-upload size, drawn from noise so nothing is downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(folder / f"{index:05d}.jpg", quality=90)
    return image_files([folder])


def measure(name, model, files, batch_size, rounds) -> list[str]:
    paths = {"residual predict": residual_predict, "plain loop": plain_loop, "plain DataLoader": plain_dataloader}
    rates = {key: [] for key in paths}
    for round_index in range(rounds + 1):
        for key, run in paths.items():
            rate = run(model, files, batch_size)
            if round_index:  # round 0 warms up caches, threads and workers
                rates[key].append(rate)
    best_peer = max(statistics.median(rates["plain loop"]), statistics.median(rates["plain DataLoader"]))
    rows = [f"| {name} | {key} | {statistics.median(r):.0f} | {min(r):.0f} - {max(r):.0f} |"
            for key, r in rates.items()]
    ratio = statistics.median(rates["residual predict"]) / best_peer
    return rows + [f"| {name} | ratio residual / best plain | {ratio:.3f} | |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="32 px PNGs for resnet20")
    parser.add_argument("--photos", type=int, default=200, help="320 x 256 JPEGs for resnet18 at 224 px")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shapes(Path(tmp) / "shapes", size=32, per_class=args.images // 10, seed=0, progress=False)
        small = image_files([root / "train"])[:args.images]
        resnet20 = residual.create_model("resnet20", num_classes=10).eval()
        resnet20.preprocessing = CIFAR_EVAL
        photos = write_photos(Path(tmp) / "photos", args.photos)
        resnet18 = residual.create_model("resnet18").eval()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {WORKERS} decoding workers")
        print("| workload | path | images/s median | min - max |\n|---|---|---:|---:|")
        for line in (measure(f"resnet20, {len(small)} PNGs 32 px, batch 256", resnet20, small, 256, args.rounds)
                     + measure(f"resnet18, {len(photos)} JPEGs 320x256 -> 224, batch 32", resnet18, photos, 32,
                               args.rounds)):
            print(line)


if __name__ == "__main__":
    main()
