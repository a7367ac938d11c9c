"""How short can the demo's training be? Its recipe with fewer epochs, fewer images, a smaller batch or AdamW.

`residual demo` trains resnet20 on 6,000 `shapes` images (the recipe in residual/demo.py: 16 epochs, progressive
resizing from 24 px, since 2026-12-07; before, 12 epochs at 32 px, the variant "12 epochs at 32 px"): minutes on a
CPU, and the largest single cost of the test suite, which runs the real demo, on 2 cores. Each
variant here trains from the same seed and prints its best validation top-1, its test top-1 (the split no run
saw) and its training time, beside the demo's own recipe. A variant is a shorter demo only if it keeps the
demo's promise: 95% validation top-1 (tests/test_cli.py) and more.

    python benchmarks/demo_budget.py [--only NAME ...] [--data-root data]
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from residual.data.shapes import write_shapes
from residual.demo import DEMO_RECIPE
from residual.evaluate import evaluate
from residual.train import TrainConfig, train
from residual.train.optim import OptimConfig
from residual.weights import load_model

VARIANTS = {  # name -> (images per class, what changes in the recipe)
    "demo": (600, {}),
    "12 epochs at 32 px": (600, dict(epochs=12, progressive_resize=None)),
    "6 epochs": (600, dict(epochs=6)),
    "6 epochs, lr 0.1": (600, dict(epochs=6, optim=OptimConfig(lr=0.1, schedule="onecycle", weight_decay=5e-4))),
    "6 epochs, AdamW 3e-3": (600, dict(epochs=6, optim=OptimConfig(optimizer="adamw", lr=3e-3, schedule="onecycle",
                                                                   weight_decay=5e-4))),
    "6 epochs, batch 64, lr 0.1": (600, dict(epochs=6, batch_size=64, optim=OptimConfig(lr=0.1, schedule="onecycle",
                                                                                         weight_decay=5e-4))),
    "300 per class": (300, {}),
    "400 per class, 8 epochs": (400, dict(epochs=8)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=VARIANTS, help="these variants (default: all)")
    parser.add_argument("--data-root", default="data", help="where the shapes folders are written (or found)")
    parser.add_argument("--out", default="runs/demo-budget")
    args = parser.parse_args()
    print("| variant | images per class | epochs | batch | best val top-1 | test top-1 | training s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.only or VARIANTS:
        per_class, changes = VARIANTS[name]
        recipe = {**DEMO_RECIPE, **changes}
        data = write_shapes(f"{args.data_root}/shapes-32-{per_class}", size=32, per_class=per_class, seed=0,
                            progress=False)
        start = time.perf_counter()
        result = train(TrainConfig(data=str(data), out=args.out, name=name.replace(" ", "-").replace(",", ""),
                                   quiet=True, report=False, **recipe), console=Console(quiet=True))
        took = time.perf_counter() - start
        test = evaluate(load_model(result.model_path).eval(), data, "test", gallery_size=0).metrics["top1"]
        print(f"| {name} | {per_class} | {recipe['epochs']} | {recipe['batch_size']} | {result.best['val_top1']:.2%} "
              f"| {test:.2%} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
