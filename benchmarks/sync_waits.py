"""How often does a real training run wait for the GPU? Synchronising CUDA calls counted over one epoch.

`residual train` on `shapes` (32 px, the size the small-net goals use), one epoch per augmentation
preset, with PyTorch's sync debug mode on: every call that makes the host wait for the device
warns, and the warnings are counted and grouped by the line that made them. A handful per epoch
are expected (the loss read back twice a second, the epoch's end, the checkpoint); anything per
step is a wait to remove. On a CPU nothing waits, and the script says so.

    python benchmarks/sync_waits.py [--presets cifar strong] [--per-class 600] [--epochs 1]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path

import torch

from residual.data.shapes import write_shapes
from residual.data.transforms import AugmentConfig
from residual.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cifar", "strong"])
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    counting = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if not counting:
        print("no CUDA device: nothing waits for one, so there is nothing to count")
    with tempfile.TemporaryDirectory(prefix="residual-sync-") as root:
        data = write_shapes(Path(root) / "shapes", size=32, per_class=args.per_class, seed=0, progress=False)
        rows = ["| preset | epochs | synchronising calls | per epoch | where (top 3) |", "|---|---:|---:|---:|---|"]
        for preset in args.presets:
            config = TrainConfig(data=str(data), epochs=args.epochs, augment=AugmentConfig(preset=preset), ema=0.999,
                                 device=args.device, quiet=True, report=False, out=str(Path(root) / "runs"),
                                 name=preset)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if counting:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    train(config)
                finally:
                    if counting:
                        torch.cuda.set_sync_debug_mode("default")
            waits = [w for w in caught if "synchroniz" in str(w.message)]
            sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in waits)
            where = ", ".join(f"{site} x{count}" for site, count in sites.most_common(3)) or "-"
            rows.append(f"| {preset} | {args.epochs} | {len(waits)} | {len(waits) / args.epochs:.1f} | {where} |")
    print("\n".join(rows))  # after the runs' own epoch lines


if __name__ == "__main__":
    main()
