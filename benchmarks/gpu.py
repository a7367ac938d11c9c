"""GPU speed of the toolkit against torchvision's ResNets in a standard loop, one run, one table.

The four workloads of the speed issue (resnet50 train and inference at 224 px, CIFAR
resnet56 and CIFAR-style resnet18 training at 32 px), each under fp32 eager, bf16 +
channels_last and + torch.compile, residual's own training step / predict path beside
torchvision's model (or ours, where torchvision has no such net) in a plain loop; and
resnet50 training and prediction from a folder of JPEGs, decoded by Pillow in the
workers or on the GPU (`--decoder torchvision`), beside the same path on synthetic data.
MFU uses 790 TFLOP/s, the bf16 matrix rate measured on the project's H200.

    PYTHONPATH=src python benchmarks/gpu.py [--steps 30] [--warmup 10] [--no-compile]
        [--only TEXT] [--compile-mode MODE] [--augment auto]
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import torch

from residual.bench import BENCH_HEADER, SETTINGS, WORKLOADS, bench, bench_line, compile_payback, select_workloads
from residual.train.config import COMPILE_MODES

PEAK_TFLOPS = 790.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compiled-only", action="store_true", help="only the torch.compile rows (the eager rows "
                                                                     "were measured on 2026-12-04)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="only the workloads whose name contains TEXT (repeatable)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="torch.compile's mode for residual's rows (default: as residual train chooses)")
    parser.add_argument("--augment", default="none", choices=("auto", "none", "cifar", "standard", "strong"),
                        help="the training rows' augmentation (none: the peer's work; auto: residual train's)")
    args = parser.parse_args()
    settings = [s for s in SETTINGS
                if not (args.no_compile and s.compile) and not (args.compiled_only and not s.compile)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    peak = PEAK_TFLOPS if torch.cuda.is_available() else None
    print(f"{date.today()}, {device}, torch {torch.__version__}")
    print(BENCH_HEADER, flush=True)
    # Each row as soon as it is measured: a run stopped by a time limit keeps what it measured.
    rows = bench(select_workloads(WORKLOADS, args.only), settings, args.device, args.steps, args.warmup,
                 augment=args.augment, compile_mode=args.compile_mode,
                 on_row=lambda row: print(bench_line(row, peak), flush=True))
    for line in compile_payback(rows):
        print(line)


if __name__ == "__main__":
    main()
