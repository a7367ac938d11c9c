"""Random crops and flips: the toolkit's own (`RandomCropFlip`, `RandomResizedCropFlip`) against
kornia's RandomCrop / RandomResizedCrop + RandomHorizontalFlip, milliseconds per batch on the CPU.

On tiny batches the time is almost all host overhead: Python, parameter sampling, dispatch.
On a GPU this is what a launch-bound step pays before its kernels run (kornia draws its
parameters on the host and copies them to the device without blocking; ours draws them on
the device). The large batches show the work itself on this CPU. Median over rounds that
alternate the two paths.

    .venv/bin/python benchmarks/augment_cpu.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import kornia.augmentation as K
import torch

from residual.data.transforms import RandomCropFlip, RandomResizedCropFlip


def milliseconds(augment, images: torch.Tensor, calls: int) -> float:
    augment(images)
    start = time.perf_counter()
    for _ in range(calls):
        augment(images)
    return (time.perf_counter() - start) / calls * 1e3


CASES = [  # name, kornia, residual, batch, stored size, calls per round
    ("pad-crop + flip, 32 px", K.AugmentationSequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip()),
     RandomCropFlip(32, 4, hflip=True), 2, 32, 200),
    ("pad-crop + flip, 32 px", K.AugmentationSequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip()),
     RandomCropFlip(32, 4, hflip=True), 512, 32, 20),
    ("resized crop + flip, 16 -> 14 px",
     K.AugmentationSequential(K.RandomResizedCrop((14, 14), scale=(0.08, 1.0)), K.RandomHorizontalFlip()),
     RandomResizedCropFlip(14, (0.08, 1.0), hflip=True), 2, 16, 200),
    ("resized crop + flip, 256 -> 224 px",
     K.AugmentationSequential(K.RandomResizedCrop((224, 224), scale=(0.08, 1.0)), K.RandomHorizontalFlip()),
     RandomResizedCropFlip(224, (0.08, 1.0), hflip=True), 64, 256, 5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| augmentation | batch | kornia ms | residual ms | kornia / residual |")
    print("|---|---:|---:|---:|---:|")
    for name, kornia_augment, ours, batch, stored, calls in CASES:
        images = torch.rand(batch, 3, stored, stored)
        theirs, mine = [], []
        for _ in range(args.rounds):
            theirs.append(milliseconds(kornia_augment, images, calls))
            mine.append(milliseconds(ours, images, calls))
        k, r = statistics.median(theirs), statistics.median(mine)
        print(f"| {name} | {batch} | {k:.2f} | {r:.2f} | {k / r:.1f}x |")


if __name__ == "__main__":
    main()
