"""Activation checkpointing (`residual train --grad-checkpointing`): memory and speed of a training step
with and without it, the same model, batch and settings.

Each mode runs in a fresh process, so its peak memory is its own: on CUDA the peak the allocator
handed out (torch.cuda.max_memory_allocated), on the CPU the process's peak resident size less
its size before the first step. Also the bytes autograd kept for the backward pass in one step
(saved-tensor hooks, each storage once), which is what checkpointing cuts. Images/s is the median of the timed steps'
rates.

    .venv/bin/python benchmarks/grad_checkpointing.py [--model resnet50] [--batch 32] [--size 224]
        [--steps 6] [--device cpu|cuda] [--amp]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from residual.models import build_model


def kept_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for one step's backward pass (a tensor that several
    operations keep counts once; the weights, which are kept anyway, are left out)."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    return sum(saved.values())


def measure(args: argparse.Namespace, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=1000).to(device).to(memory_format=torch.channels_last).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.amp)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with autocast:
        kept = kept_bytes(model, x)
    optimizer.zero_grad(set_to_none=True)
    rates = []
    for step in range(args.steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            rates.append(args.batch / (time.perf_counter() - start))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    return {"kept_mb": kept / 2**20, "peak_mb": peak / 2**20, "images_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--child", choices=("plain", "checkpointed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child == "checkpointed")))
        return
    results = {}
    for mode in ("plain", "checkpointed"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode], check=True,
                             capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    peak = "peak allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"{args.model}, batch {args.batch}, {args.size} px, {args.device}, {'bf16' if args.amp else 'fp32'}, "
          f"median of {args.steps} steps")
    print(f"{'':>14} {'kept for backward':>18} {peak:>16} {'images/s':>9}")
    for mode, r in results.items():
        print(f"{mode:>14} {r['kept_mb']:>15.0f} MB {r['peak_mb']:>13.0f} MB {r['images_per_s']:>9.1f}")
    plain, checkpointed = results["plain"], results["checkpointed"]
    print(f"{'ratio':>14} {checkpointed['kept_mb'] / plain['kept_mb']:>17.2f}x "
          f"{checkpointed['peak_mb'] / plain['peak_mb']:>15.2f}x "
          f"{checkpointed['images_per_s'] / plain['images_per_s']:>8.2f}x")


if __name__ == "__main__":
    main()
