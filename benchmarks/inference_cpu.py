"""The inference fast path on the CPU, lever by lever, against plain PyTorch and ONNX Runtime in one run.

Paths for each model: the model as built (torch eager fp32, NCHW); + channels_last;
`prepare_for_inference(..., "fp32")` (BN folded into the convs, channels_last), which
is what `residual predict` and `residual eval` run on a CPU; the same with bf16 weights
(`--precision bf16`; fast only on CPUs with native bf16, e.g. AVX512-BF16 or AMX); and
ONNX Runtime fp32 on the exported model as the outside peer. Speeds come from
`residual.deploy.speed.measure_speed` (median latency at batch 1, images/s at batch 32,
random inputs, after warm-up; the export is parity-checked on a few drawn shapes).
"max diff" is the largest logit difference from the model as built over the largest
logit, on one random batch.

    python benchmarks/inference_cpu.py
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch
from torch import nn

from residual.data.datasets import sample_items
from residual.data.shapes import write_shapes
from residual.deploy.onnx import OnnxModel, export_onnx
from residual.deploy.speed import measure_speed
from residual.models import build_model, prepare_for_inference

WORKLOADS = (("resnet50", 224, 6), ("resnet20", 32, 300))  # (arch, image size, timed batches of 32)


def trained_like(model: nn.Module) -> nn.Module:
    """BN statistics away from the identity of a fresh net, so folding does real arithmetic."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def paths(arch: str, size: int, folder: Path) -> dict:
    base = trained_like(build_model(arch, num_classes=10))
    data = write_shapes(folder / f"shapes-{size}", size=size, per_class=2, seed=0, progress=False)
    exported = export_onnx(copy.deepcopy(base), folder / f"{arch}.onnx", sample_items(data, "val", 16), str(data))
    return {"torch eager fp32": base,
            "+ channels_last": copy.deepcopy(base).to(memory_format=torch.channels_last),
            "prepare_for_inference fp32 (BN folded, channels_last)": prepare_for_inference(copy.deepcopy(base)),
            "prepare_for_inference bf16": prepare_for_inference(copy.deepcopy(base), "cpu", "bf16"),
            "ONNX Runtime fp32": OnnxModel(exported.path)}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lines = ["| model | path | latency b1 (ms) | img/s b32 | x eager | max diff |", "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as folder:
        for arch, size, repeats in WORKLOADS:
            x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
            candidates = paths(arch, size, Path(folder))
            with torch.inference_mode():
                reference = candidates["torch eager fp32"](x)
            eager = None
            for name, model in candidates.items():
                with torch.inference_mode():
                    diff = (model(x).float() - reference).abs().max() / reference.abs().max()
                speed = measure_speed(model, size, throughput_repeats=repeats)
                eager = eager or speed.images_per_s
                lines.append(f"| {arch} {size} px | {name} | {speed.latency_ms:.2f} | {speed.images_per_s:,.1f} | "
                             f"{speed.images_per_s / eager:.2f} | {diff:.1e} |")
    print(f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
