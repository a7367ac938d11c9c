"""How long a command takes to start: `residual --version` and `residual predict` on one image, against the
floor every PyTorch program pays, a Python that only imports torch.

Each path is a fresh interpreter (`sys.executable`; the package is the one it imports, so PYTHONPATH=OTHER/src
times another checkout the same way). Rounds alternate the paths so the machine's drift hits them alike.
Prints a table; record it in docs/BENCHMARKS.md.

    python benchmarks/startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

import residual


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model, image = Path(folder) / "model.safetensors", Path(folder) / "image.png"
        residual.save_model(residual.create_model("resnet20", num_classes=10), model)
        Image.new("RGB", (32, 32), (200, 20, 20)).save(image)
        paths = {"python -c 'import torch' (the floor)": ["-c", "import torch"],
                 "residual --version": ["-m", "residual", "--version"],
                 "residual predict MODEL IMAGE (resnet20)": ["-m", "residual", "predict", str(model), str(image)]}
        times: dict[str, list[float]] = {name: [] for name in paths}
        timed(["-c", "import residual"])  # warm the file cache: the first round is not slower than the rest
        for _ in range(args.rounds):
            for name, argv in paths.items():
                times[name].append(timed(argv))
    floor = statistics.median(next(iter(times.values())))
    print(f"residual from {Path(residual.__file__).parent}, {args.rounds} rounds")
    print("| path | seconds, median | min - max | over the floor |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {min(values):.2f} - {max(values):.2f} | {median - floor:+.2f} |")


if __name__ == "__main__":
    main()
