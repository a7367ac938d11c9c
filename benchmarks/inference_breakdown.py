"""Where `residual predict`'s bf16 path spends its time, one step at a time, beside torchvision under autocast.

The first GPU session measured the predict path (BN folded, bf16 weights, channels_last; uint8 batches
normalised on the device, probabilities copied to the host) at 0.83x torchvision's ResNet-50 in a plain
autocast loop. Each row here adds one piece of the path to the one above it, so the step where the
images/s drop is the piece that costs them. All rows run in one process on one batch already on the
device; images/s after warm-up steps, device synchronised.

    PYTHONPATH=src python3 benchmarks/inference_breakdown.py [--device cuda] [--arch resnet50] [--batch 256]
"""

from __future__ import annotations

import argparse
import copy
import itertools
from datetime import date

import torch

from residual.bench import images_per_second, torchvision_model
from residual.data.loaders import InferenceBatch
from residual.data.transforms import normalize
from residual.models import build_model, prepare_for_inference
from residual.predict import class_probabilities, probabilities_in_flight
from residual.runs import pick_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True
    # bf16 where the hardware has it (the GPU question); on the CPU, fp32 keeps the rows about the path.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    ours = build_model(args.arch).to(device).eval()
    peer = torchvision_model(args.arch, {})
    peer_name = "our model (no torchvision here)" if peer is None else "torchvision's model"
    peer = (peer or copy.deepcopy(ours)).to(device, memory_format=torch.channels_last).eval()
    unfolded = copy.deepcopy(ours).to(dtype=dtype, memory_format=torch.channels_last)
    prepared = prepare_for_inference(copy.deepcopy(ours), device, precision)

    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           device=device)
    normalised = normalize(images.float() / 255, ours.preprocessing)
    ready = normalised.to(dtype=dtype, memory_format=torch.channels_last)
    stream = probabilities_in_flight(prepared, itertools.repeat(InferenceBatch([], images, [])))

    def under_autocast(model, x):
        def step():
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                model(x)
        return step

    def plain(model, x):
        def step():
            with torch.inference_mode():
                model(x)
        return step

    rows = [
        (f"{peer_name}, autocast, float channels_last input",
         under_autocast(peer, normalised.contiguous(memory_format=torch.channels_last))),
        ("our model, the same", under_autocast(ours.to(memory_format=torch.channels_last),
                                               normalised.contiguous(memory_format=torch.channels_last))),
        (f"{precision} weights, BN kept, input ready", plain(unfolded, ready)),
        (f"{precision} weights, BN folded (prepare_for_inference), input ready", plain(prepared, ready)),
        ("+ the pre-hook's cast of a float NCHW input", plain(prepared, normalised)),
        ("+ uint8 -> normalised on the device, softmax (class_probabilities)",
         lambda: class_probabilities(prepared, images)),
        ("+ answers to the host after every batch (the path before 2026-12-04)",
         lambda: class_probabilities(prepared, images).cpu()),
        ("+ one batch in flight instead (probabilities_in_flight, predict's path now)", lambda: next(stream)),
    ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{date.today()}, {name}, torch {torch.__version__}, {args.arch}, batch {args.batch}, "
          f"{args.image_size} px")
    print("| step | images/s | vs the first row |\n|---|---:|---:|", flush=True)
    first = None
    for label, step in rows:
        rate, _ = images_per_second(step, args.batch, args.steps, args.warmup, device)
        first = first or rate
        print(f"| {label} | {rate:,.0f} | {rate / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
