"""Does the fast training path learn as well as the plain one? The demo recipe three ways, on `shapes`.

The demo's recipe (resnet20, one-cycle, pad-crop + flip; 16 epochs from 24 px since 2026-12-07, 12 at 32 px
before) trained with
- fp32 eager (the reference),
- bf16 autocast + channels_last,
- the same under torch.compile (on CUDA in the mode `residual train` would choose),
each for every seed given, then the best epoch's model scored on the test split that no run
saw. The issue asks the fast path for the same accuracy: the differences between paths are
to be read against the spread between seeds of one path, and each path is set against fp32
eager of the same seed image by image (McNemar's exact test: is the gap more than chance?).
Also prints each run's training images/s (median over epochs after the first) and wall time,
compile warm-up included.

    python benchmarks/fast_path_accuracy.py [--device cpu|cuda] [--seeds 0 1] [--epochs 12]

The first run writes the data to --data (default data/shapes-32, the demo's folder).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from rich.console import Console

from residual.data.shapes import write_shapes
from residual.demo import DEMO_RECIPE
from residual.evaluate import evaluate
from residual.metrics import paired_comparison
from residual.train import TrainConfig, train
from residual.weights import load_model

PATHS = {
    "fp32 eager": dict(amp=False, channels_last=False, compile=False),
    "bf16 + channels_last": dict(amp=True, channels_last=True, compile=False),
    "+ torch.compile": dict(amp=True, channels_last=True, compile=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=DEMO_RECIPE["epochs"])
    parser.add_argument("--data", default="data/shapes-32")
    args = parser.parse_args()
    write_shapes(args.data, size=32, per_class=600, seed=0)  # the demo's data; kept if already there
    print("| path | seed | best val top-1 | test top-1 | train images/s | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    tests: dict[str, list[float]] = {name: [] for name in PATHS}
    correct = {}  # (path, seed) -> per test image, whether its top-1 was right
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            for name, flags in PATHS.items():
                config = TrainConfig(data=args.data, out=out, name=f"{name}-{seed}", device=args.device, seed=seed,
                                     quiet=True, report=False, **{**DEMO_RECIPE, "epochs": args.epochs, **flags})
                start = time.perf_counter()
                result = train(config, console=Console(quiet=True))  # the table alone
                wall = time.perf_counter() - start
                scored = evaluate(load_model(result.model_path).eval(), args.data, "test", gallery_size=0)
                test = scored.metrics["top1"]
                tests[name].append(test)
                correct[name, seed] = scored.probs.argmax(1) == scored.labels
                rate = statistics.median(row["images_per_s"] for row in result.history[1:] or result.history)
                print(f"| {name} | {seed} | {result.best['val_top1']:.2%} | {test:.2%} | {rate:,.0f} | {wall:.0f} |",
                      flush=True)
    for name, values in tests.items():
        print(f"| {name} | mean | | {statistics.mean(values):.2%} | | |")
    reference = next(iter(PATHS))
    print(f"\n| path | seed | test images only {reference} got right | only this path | McNemar p |")
    print("|---|---:|---:|---:|---:|")
    for seed in args.seeds:
        for name in list(PATHS)[1:]:
            versus = paired_comparison(correct[reference, seed], correct[name, seed])
            print(f"| {name} | {seed} | {versus['only_first']} | {versus['only_second']} | {versus['p_value']:.3g} |")


if __name__ == "__main__":
    main()
