"""Deployment formats on the CPU, one run, one table: torch eager fp32, ONNX Runtime fp32 and INT8, OpenVINO
fp32, bf16 (the same ONNX file; bf16 where the CPU computes it) and INT8, ExecuTorch (XNNPACK) fp32 and INT8,
pruned.

Two workloads: a trained `shapes` ResNet-20 (32 px; the demo recipe is trained
first unless --model gives one) and an untrained ResNet-50 at 224 px (shapes
drawn at 224 px serve as its images; an untrained net's top-1 agreement says
little, its speed is the point). Every path is the toolkit's own: export_onnx
(parity-checked), quantize (per-channel static INT8, MinMax calibration on the
training images; for each runtime in its own format; ExecuTorch's programs take batches of up to 32, so that
the b32 column is one call) and prune (L1 channel pruning, fine-tuned on the shapes model;
the untrained ResNet-50 is pruned without fine-tuning). Speeds: median latency
of single images and images/s at batch 32, on random inputs after warm-up.
Agreement: the share of validation images whose top-1 class is the fp32 model's.

    python benchmarks/deploy_cpu.py [--model runs/demo/resnet20-shapes/model.safetensors --data data/shapes-32]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch
from rich.console import Console

import residual
from residual.data.datasets import sample_items
from residual.data.shapes import write_shapes
from residual.demo import DEMO_RECIPE
from residual.deploy.executorch import ExecuTorchModel, export_executorch
from residual.deploy.onnx import OnnxModel, export_onnx, openvino_computes_bf16
from residual.deploy.prune import prune, prune_channels
from residual.deploy.quantize import quantize
from residual.deploy.speed import measure_speed
from residual.predict import iter_predict
from residual.train import TrainConfig, train


def top1(model, items: list) -> list[int]:
    return [p.top[0][0] for p in iter_predict(model, items, topk=1, batch_size=32, workers=0)]


def row(workload: str, runtime: str, model, size_mb: float, predictions: list[int], reference: list[int],
        repeats: int) -> dict:
    speed = measure_speed(model, model.preprocessing.input_size, throughput_repeats=repeats)
    agreement = sum(a == b for a, b in zip(predictions, reference)) / len(reference)
    return {"workload": workload, "runtime": runtime, "latency_ms": speed.latency_ms,
            "images_per_s": speed.images_per_s, "size_mb": size_mb, "agreement": agreement}


def workload(name: str, model_path: Path, data: Path, folder: Path, fine_tune_epochs: int, repeats: int) -> list[dict]:
    """The runtimes of one model; returns table rows."""
    console = Console(stderr=True)
    model = residual.load_model(model_path).eval()
    items = sample_items(data, "val", 1000)
    reference = top1(model, items)
    size = lambda path: path.stat().st_size / 2**20  # noqa: E731
    rows = [row(name, "torch eager fp32", model, size(model_path), reference, reference, repeats)]
    console.print(f"{name}: exporting")
    exported = export_onnx(model, folder / f"{name}.onnx", items[:128], str(data))
    onnx_fp32 = OnnxModel(exported.path)
    rows.append(row(name, onnx_fp32.runtime_text, onnx_fp32, size(exported.path), top1(onnx_fp32, items), reference,
                    repeats))
    for bf16 in (False, True):
        if bf16 and not openvino_computes_bf16():
            continue
        openvino = OnnxModel(exported.path, runtime="openvino", bf16=bf16)
        rows.append(row(name, openvino.runtime_text, openvino, size(exported.path), top1(openvino, items), reference,
                        repeats))
    console.print(f"{name}: quantizing")
    for runtime in ("onnxruntime", "openvino"):
        quantized = quantize(exported.path, data, folder / f"{name}.{runtime}.int8.onnx", calib_size=256, force=True,
                             runtime=runtime)
        int8 = OnnxModel(quantized.path, runtime=runtime)
        rows.append(row(name, int8.runtime_text, int8, size(quantized.path), top1(int8, items), reference, repeats))
    console.print(f"{name}: ExecuTorch")
    program_path = export_executorch(model, folder / f"{name}.pte", items[:128], str(data), max_batch=32).path
    quantized_path = quantize(model_path, data, folder / f"{name}.int8.pte", calib_size=256, force=True,
                              runtime="executorch", max_batch=32).path
    for path in (program_path, quantized_path):
        program = ExecuTorchModel(path)
        rows.append(row(name, program.runtime_text, program, size(path), top1(program, items), reference, repeats))
    console.print(f"{name}: pruning")
    if fine_tune_epochs:
        pruned_path = prune(model_path, data, folder / f"{name}-pruned.safetensors", amount=0.3,
                            epochs=fine_tune_epochs, runs=str(folder / "runs")).path
        label = f"pruned 30% + {fine_tune_epochs} epochs, torch eager fp32"
    else:
        pruned_path = residual.save_model(prune_channels(model, 0.3), folder / f"{name}-pruned.safetensors")
        label = "pruned 30% (no fine-tuning), torch eager fp32"
    pruned = residual.load_model(pruned_path).eval()
    rows.append(row(name, label, pruned, size(pruned_path), top1(pruned, items), reference, repeats))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| workload | runtime | latency b1 (ms) | img/s b32 | size (MB) | top-1 agreement with fp32 | "
             "x eager | x ORT fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eager = next(e for e in rows if e["workload"] == r["workload"] and e["runtime"] == "torch eager fp32")
        ort32 = next(e for e in rows if e["workload"] == r["workload"] and e["runtime"] == "ONNX Runtime fp32")
        lines.append(f"| {r['workload']} | {r['runtime']} | {r['latency_ms']:.2f} | {r['images_per_s']:,.0f} | "
                     f"{r['size_mb']:.2f} | {r['agreement']:.2%} | {r['images_per_s'] / eager['images_per_s']:.2f} | "
                     f"{r['images_per_s'] / ort32['images_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained shapes model file (default: train the demo recipe first)")
    parser.add_argument("--data", help="its shapes dataset (default: written here)")
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as folder:
        folder = Path(folder)
        data = Path(args.data) if args.data else write_shapes(folder / "shapes-32", size=32, per_class=600, seed=0)
        model_path = Path(args.model) if args.model else train(TrainConfig(
            data=str(data), out=str(folder / "runs"), name="resnet20-shapes", quiet=True, **DEMO_RECIPE)).model_path
        rows = workload("shapes resnet20 (trained)", model_path, data, folder, fine_tune_epochs=3, repeats=20)
        if not args.skip_resnet50:
            big = write_shapes(folder / "shapes-224", size=224, per_class=60, seed=1)
            resnet50 = residual.create_model("resnet50", num_classes=10)
            resnet50.class_names = sorted(p.name for p in (big / "train").iterdir())
            r50_path = residual.save_model(resnet50, folder / "resnet50.safetensors")
            rows += workload("resnet50 (untrained)", r50_path, big, folder, fine_tune_epochs=0, repeats=3)
    print(f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"openvino {__import__('openvino').__version__}, executorch {importlib.metadata.version('executorch')}")
    print(table(rows))


if __name__ == "__main__":
    main()
