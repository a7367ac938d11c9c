"""`residual bench`: the toolkit's training and inference speed beside a standard PyTorch loop.

For each workload and setting (fp32 eager; bf16 autocast + channels_last; the same
under torch.compile) two paths run in one process on synthetic data already on the
device:

- residual: the engine's own training step (`Trainer._train_step`: uint8 batch ->
  float, crop to size, normalise, autocast, loss, backward, fused optimizer step,
  schedule; like the peer it never waits for the device, and real training reads the
  loss back twice a second), or for inference the
  predict path (`prepare_for_inference`: BN folded, channels_last, bf16 weights in
  the bf16 settings; then `probabilities_in_flight`: normalise, forward, softmax, to the
  host one batch behind the device; compiled as `residual predict --compile` compiles it);
- peer: the loop the issue's reference figures use, on torchvision's model when
  torchvision is importable (our own architecture otherwise): SGD with momentum on
  a float batch, or a forward pass in inference mode.

The end-to-end workloads train from a folder of generated JPEGs through the file
loader, or predict from it through `inference_batches` (predict's and eval's
stream): decoded by Pillow in the workers (draft mode), or read by the workers and
decoded on the device (`--decoder torchvision`: nvjpeg on CUDA; skipped where
torchvision cannot decode). Their peer is the same path on synthetic data already
on the device, so the ratio is the share of the synthetic rate that survives decoding
(the speed issue asks for 80% in training).

Images/s is measured after warm-up steps with the device synchronised; MFU is
FLOPs per image (2 x MACs, x3 for a training step) x images/s / `peak_tflops`.
Each compiled row compiles with torch.compile's caches emptied (`fresh_compile_caches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from .data.datasets import Dataset, Split, open_dataset
from .data.device_decode import check_decoder
from .data.loaders import InferenceBatch, inference_batches
from .data.transforms import AugmentConfig
from .errors import ConfigError
from .models import build_model, compile_for_inference, count_macs, prepare_for_inference
from .predict import INFERENCE_COMPILE_FROM_IMAGES, probabilities_in_flight
from .progress import message_console
from .runs import pick_device
from .train.config import COMPILE_FROM_STEPS, TrainConfig, auto_compile_mode, resolve
from .train.optim import OptimConfig
from .train.trainer import Trainer


@dataclass(frozen=True)
class Workload:
    name: str
    arch: str
    image_size: int
    batch: int
    train: bool
    options: dict = dataclasses.field(default_factory=dict)  # ResNetConfig overrides
    torchvision: str | None = None  # the peer's torchvision builder (None: torchvision has no such net)
    jpeg_size: tuple[int, int] | None = None  # train or infer from a folder of JPEGs this size (peer: synthetic data)
    decoder: str = "pillow"  # the decoder for those JPEGs ('torchvision': on the device)


@dataclass(frozen=True)
class Setting:
    name: str
    bf16: bool
    channels_last: bool
    compile: bool


# The reference table (an H200 with torch 2.11 and torchvision 0.26).
WORKLOADS = (
    Workload("resnet50 train, batch 256, 224 px", "resnet50", 224, 256, True, torchvision="resnet50"),
    Workload("resnet50 inference, batch 256, 224 px", "resnet50", 224, 256, False, torchvision="resnet50"),
    Workload("CIFAR resnet56 train, batch 512, 32 px", "resnet56", 32, 512, True),
    Workload("CIFAR-style resnet18 train, batch 512, 32 px", "resnet18", 32, 512, True,
             {"stem": "cifar", "num_classes": 10}, torchvision="resnet18"),
    Workload("resnet50 train from 500x375 JPEGs, batch 256, 224 px", "resnet50", 224, 256, True,
             jpeg_size=(500, 375)),
    Workload("resnet50 train from 500x375 JPEGs decoded on the device, batch 256, 224 px", "resnet50", 224, 256,
             True, jpeg_size=(500, 375), decoder="torchvision"),
    Workload("resnet50 inference from 500x375 JPEGs, batch 256, 224 px", "resnet50", 224, 256, False,
             jpeg_size=(500, 375)),
    Workload("resnet50 inference from 500x375 JPEGs decoded on the device, batch 256, 224 px", "resnet50", 224,
             256, False, jpeg_size=(500, 375), decoder="torchvision"),
)
# Minutes on a CPU: the demo's training step and ResNet-50 prediction, from memory and from JPEG files.
CPU_WORKLOADS = (
    Workload("resnet20 train, batch 128, 32 px", "resnet20", 32, 128, True),
    Workload("resnet50 inference, batch 32, 224 px", "resnet50", 224, 32, False, torchvision="resnet50"),
    Workload("resnet50 inference from 500x375 JPEGs, batch 32, 224 px", "resnet50", 224, 32, False,
             jpeg_size=(500, 375)),
    Workload("resnet50 inference from 500x375 JPEGs decoded on the device, batch 32, 224 px", "resnet50", 224, 32,
             False, jpeg_size=(500, 375), decoder="torchvision"),
)
# A few seconds on a CPU: what the tests run.
TINY_WORKLOADS = (
    Workload("tiny resnet20 train, batch 8, 16 px", "resnet20", 16, 8, True),
    Workload("tiny resnet18 inference, batch 8, 32 px", "resnet18", 32, 8, False,
             {"stem": "cifar", "num_classes": 10}, torchvision="resnet18"),
    Workload("tiny resnet20 train from 48x40 JPEGs, batch 8, 32 px", "resnet20", 32, 8, True, jpeg_size=(48, 40)),
    Workload("tiny resnet20 train from 48x40 JPEGs decoded on the device, batch 8, 32 px", "resnet20", 32, 8, True,
             jpeg_size=(48, 40), decoder="torchvision"),
    Workload("tiny resnet18 inference from 48x40 JPEGs, batch 8, 32 px", "resnet18", 32, 8, False,
             {"stem": "cifar", "num_classes": 10}, jpeg_size=(48, 40)),
    Workload("tiny resnet18 inference from 48x40 JPEGs decoded on the device, batch 8, 32 px", "resnet18", 32, 8,
             False, {"stem": "cifar", "num_classes": 10}, jpeg_size=(48, 40), decoder="torchvision"),
)
SETTINGS = (
    Setting("fp32 eager", False, False, False),
    Setting("bf16 + channels_last", True, True, False),
    Setting("+ torch.compile", True, True, True),
)


def select_workloads(workloads, names: list[str] | None) -> list[Workload]:
    """The workloads whose name contains any of `names` (all without any), so a run fits a time limit."""
    if not names:
        return list(workloads)
    chosen = [w for w in workloads if any(name.lower() in w.name.lower() for name in names)]
    if not chosen:
        raise ConfigError(f"--only {' '.join(names)} matches no workload; they are: "
                          + "; ".join(w.name for w in workloads))
    return chosen


@dataclass
class BenchRow:
    workload: str
    setting: str
    residual: float  # images/s
    peer: float  # images/s
    peer_name: str
    flops_per_image: float
    warmup_seconds: float  # residual's warm-up (compilation, autotuning)
    batch: int
    train: bool
    options: Setting  # what `setting` names

    @property
    def ratio(self) -> float:
        return self.residual / self.peer


def torchvision_model(builder: str | None, options: dict):
    """torchvision's model for the peer, made CIFAR-style as our options say; None without torchvision."""
    if builder is None:
        return None
    try:
        import torchvision
    except Exception:  # not installed, or installed without a working build (CPU-only machines here)
        return None
    model = getattr(torchvision.models, builder)(num_classes=options.get("num_classes", 1000))
    if options.get("stem") == "cifar":  # the usual CIFAR adaptation: 3x3 stride-1 stem, no max-pool
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def images_per_second(step: Callable[[], None], batch: int, steps: int, warmup: int,
                      device: torch.device) -> tuple[float, float]:
    """(images/s over `steps` calls of `step` after `warmup` calls, seconds the warm-up took)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmed = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - warmed), warmed - start


def synthetic_dataset(stored: int, count: int, classes: int, root: Path) -> Dataset:
    """Random uint8 images and labels, in memory like a CIFAR split (one image as the validation split)."""
    images = torch.randint(0, 256, (count, 3, stored, stored), dtype=torch.uint8)
    labels = torch.randint(0, classes, (count,)).tolist()
    split = Split(labels=labels, images=images)
    return Dataset(root, "cifar", [str(i) for i in range(classes)], split, Split(labels=labels[:1], images=images[:1]))


def write_jpegs(folder: Path, size: tuple[int, int], count: int, classes: int = 2, seed: int = 0) -> Path:
    """An ImageFolder (train/ and val/) of `count` photo-like JPEGs: smooth colour waves plus sensor noise,
    so they compress like photographs rather than like flat colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    noise = 12 * rng.standard_normal((height, 2 * width, 3), dtype=np.float32)  # each image a window of it
    for index in range(count + classes):
        split = "train" if index < count else "val"
        phase = rng.uniform(0, 6.28, 3)
        # Each wave is a column wave times a row wave: an outer product, 100x cheaper than on the full grid.
        pixels = np.stack([127 + 100 * np.outer(np.cos(y / (50 + 20 * c)), np.sin(x / (40 + 30 * c) + phase[c]))
                           for c in range(3)], axis=2)
        start = rng.integers(0, width + 1)
        pixels += noise[:, start:start + width]
        path = folder / split / f"class{index % classes}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def jpeg_folder(root: Path, workload: Workload, steps: int) -> Path:
    """The JPEGs a workload reads over `steps` batches (16 batches' worth at most, then again), written
    once per size and count under `root` and shared by every setting and workload that reads them:
    writing thousands of photo-sized JPEGs takes longer than measuring."""
    count = workload.batch * min(steps, 16)
    folder = root / f"jpegs-{workload.jpeg_size[0]}x{workload.jpeg_size[1]}-{count}"
    return folder if folder.is_dir() else write_jpegs(folder, workload.jpeg_size, count, classes=2)


def residual_train_step(workload: Workload, setting: Setting, device: torch.device, steps: int,
                        root: Path, jpegs: Path | None = None, augment: str = "none",
                        compile_mode: str | None = None) -> Callable[[], None]:
    """A closure running the engine's training step on its next batch: synthetic and on the device, or
    read from the ImageFolder of JPEGs `jpegs` by the file loader (decoded as the workload's `decoder`
    says). `augment`: the preset ('none': the peer's work; 'auto': what `residual train` would choose)."""
    classes = workload.options.get("num_classes", 10 if workload.image_size <= 64 else 1000)
    stored = workload.image_size if workload.image_size <= 64 else round(workload.image_size / 0.875)
    if jpegs:
        dataset = open_dataset(jpegs)
    else:
        dataset = synthetic_dataset(stored, workload.batch * min(steps, 8), classes, root)
    decoder = workload.decoder if jpegs else "pillow"
    config = TrainConfig(data=str(jpegs or root), model=workload.arch,
                         model_options={k: v for k, v in workload.options.items() if k != "num_classes"},
                         image_size=workload.image_size, epochs=1, batch_size=workload.batch,
                         optim=OptimConfig(lr=0.1, schedule="constant"),
                         augment=AugmentConfig(preset=None if augment == "auto" else augment),
                         amp=setting.bf16, channels_last=setting.channels_last, compile=setting.compile,
                         compile_mode=compile_mode,
                         device=str(device), in_memory=not jpegs, decoder=decoder, quiet=True, report=False,
                         out=str(root))
    trainer = Trainer(resolve(config, dataset), dataset, root, Console(quiet=True))
    trainer.model.train()
    epoch, batches = 0, iter(())

    def step():
        nonlocal epoch, batches
        batch = next(batches, None)
        if batch is None:  # the next epoch: the file loader's workers keep decoding ahead
            epoch, batches = epoch + 1, iter(trainer.train_loader.epoch(epoch + 1))
            batch = next(batches)
        trainer._train_step(*batch)

    return step


def residual_infer_step(workload: Workload, setting: Setting, device: torch.device, steps: int,
                        jpegs: Path | None = None, compile_mode: str | None = None) -> Callable[[], None]:
    """`residual predict`'s path: the model prepared for inference (BN folded, channels_last; bf16 weights
    in the bf16 settings), then `probabilities_in_flight` over uint8 batches: synthetic and on the device,
    or from `inference_batches` over the training files of the ImageFolder `jpegs` (decoded as the
    workload's `decoder` says, resized and centre-cropped as the model's preprocessing says). A step is
    one batch's probabilities reaching the host."""
    model = build_model(workload.arch, **workload.options).to(device).eval()
    if setting.channels_last:
        model = prepare_for_inference(model, device, "bf16" if setting.bf16 else "fp32")
    forward = compile_for_inference(model, workload.batch, compile_mode) if setting.compile else model  # as predict
    if jpegs:
        files = sorted(jpegs.glob("train/*/*.jpg"))
        pre = model.preprocessing
        # One stream over the files as often as the steps need: its workers stay up and decode ahead.
        repeats = math.ceil((steps + 1) * workload.batch / len(files))
        batches = inference_batches(files * repeats, pre.resize_size, pre.input_size, pre.interpolation,
                                    workload.batch, decoder=workload.decoder, device=device)
    else:
        images = torch.randint(0, 256, (workload.batch, 3, workload.image_size, workload.image_size),
                               dtype=torch.uint8, device=device)
        batch = InferenceBatch(list(range(workload.batch)), images, [])
        batches = (batch for _ in range(steps + 1))  # the stream runs one batch ahead of the answers
    answers = probabilities_in_flight(forward, batches)
    return lambda: next(answers)


def peer_step(workload: Workload, setting: Setting, device: torch.device) -> tuple[Callable[[], None], str]:
    """The standard loop on torchvision's model (or ours): what the reference figures measure."""
    model = torchvision_model(workload.torchvision, workload.options)
    name = f"torchvision {workload.torchvision}" if model is not None else "plain loop"
    model = (model or build_model(workload.arch, **workload.options)).to(device)
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train(workload.train)
    forward = torch.compile(model) if setting.compile else model
    x = torch.randn(workload.batch, 3, workload.image_size, workload.image_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, model.fc.out_features, (workload.batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.bf16)  # noqa: E731

    def train_step():
        with autocast():
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), autocast():
            forward(x)

    return (train_step if workload.train else infer_step), name


@contextlib.contextmanager
def fresh_compile_caches(folder: Path):
    """torch.compile with Dynamo's compiled code dropped and empty inductor and Triton cache folders:
    without this a row reused the kernels of an earlier row of the same net (the JPEG rows after the
    synthetic ones) and reported a warm-up near 0 s. The process's in-memory kernel caches and
    inductor's start-up, paid by its first compile, stay: one workload per process gives first-run
    warm-ups (benchmarks/gpu_session.sh)."""
    torch.compiler.reset()
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = tempfile.mkdtemp(prefix=name.split("_")[0].lower() + "-", dir=folder)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def bench(workloads=WORKLOADS, settings=SETTINGS, device: str = "auto", steps: int = 30, warmup: int = 10,
          console: Console | None = None, augment: str = "none", compile_mode: str | None = None,
          on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Every workload under every setting, residual's path and the peer's, measured in turn; `on_row`
    is given each row as it is measured (a run cut short by a time limit still reports what it measured).

    `augment` is the training rows' augmentation preset: 'none' does the peer's work (a centre
    crop), 'auto' what `residual train` would choose, or a preset by name; it joins the workload's
    name in the table when it is not 'none'. `compile_mode` is torch.compile's mode for residual's
    compiled rows (default: the one `residual train` chooses; plain `default` for inference); the
    peer always compiles in the default mode, as the reference figures do.
    """
    console = console or message_console(stderr=True)
    torch_device = pick_device(device)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    with tempfile.TemporaryDirectory(prefix="residual-bench-") as folder:
        for workload in workloads:
            try:
                check_decoder(workload.decoder, torch_device)
            except ConfigError as error:
                console.print(f"[yellow]skipped {workload.name}: {error}")
                continue
            macs = count_macs(build_model(workload.arch, **workload.options).eval(), workload.image_size)
            flops = 2 * macs * (3 if workload.train else 1)
            name = f"{workload.name}, augment {augment}" if workload.train and augment != "none" else workload.name
            auto_mode = auto_compile_mode(torch_device.type, workload.image_size, 1)[0] if workload.train else "default"
            mode = compile_mode or auto_mode
            for setting in settings:
                label = f"{setting.name} ({mode})" if setting.compile else setting.name
                console.print(f"{name}: {label} ...")
                run_dir = Path(tempfile.mkdtemp(dir=folder))

                def residual_step(jpegs: Path | None) -> Callable[[], None]:
                    if workload.train:
                        return residual_train_step(workload, setting, torch_device, steps + warmup, run_dir,
                                                   jpegs, augment, mode)
                    return residual_infer_step(workload, setting, torch_device, steps + warmup, jpegs, mode)

                jpegs = jpeg_folder(Path(folder), workload, steps + warmup) if workload.jpeg_size else None
                with fresh_compile_caches(Path(folder)) if setting.compile else contextlib.nullcontext():
                    ours, warmup_seconds = images_per_second(residual_step(jpegs), workload.batch, steps, warmup,
                                                             torch_device)
                # Said before the peer runs: a run cut short while the peer compiles keeps residual's figure.
                console.print(f"{name}: {label}: residual {ours:,.0f} images/s after a {warmup_seconds:.1f} s warm-up")
                if jpegs:
                    peer, peer_name = residual_step(None), "residual, synthetic data"
                else:
                    peer, peer_name = peer_step(workload, setting, torch_device)
                theirs, _ = images_per_second(peer, workload.batch, steps, warmup, torch_device)
                if setting.compile and warmup_seconds > 30:
                    console.print(f"[yellow]warning: torch.compile warm-up took {warmup_seconds:.0f} s for "
                                  f"{name}; short runs pay it before they gain anything")
                rows.append(BenchRow(name, label, ours, theirs, peer_name, flops, warmup_seconds, workload.batch,
                                     workload.train, setting))
                if on_row:
                    on_row(rows[-1])
    return rows


BENCH_HEADER = ("| workload | setting | residual img/s | peer | peer img/s | ratio | residual MFU | warm-up s |\n"
                "|---|---|---:|---|---:|---:|---:|---:|")


def bench_line(r: BenchRow, peak_tflops: float | None) -> str:
    """One row of the table: images/s of both paths, their ratio, and MFU where the peak is known."""
    mfu = f"{r.flops_per_image * r.residual / (peak_tflops * 1e12):.1%}" if peak_tflops else "-"
    return (f"| {r.workload} | {r.setting} | {r.residual:,.0f} | {r.peer_name} | {r.peer:,.0f} | "
            f"{r.ratio:.2f} | {mfu} | {r.warmup_seconds:.1f} |")


def bench_table(rows: list[BenchRow], peak_tflops: float | None) -> str:
    """Markdown: the header and a line per row."""
    return "\n".join([BENCH_HEADER] + [bench_line(r, peak_tflops) for r in rows])


def compile_payback(rows: list[BenchRow]) -> list[str]:
    """For each workload measured eager and compiled in bf16: after how many optimizer steps (training)
    or images (prediction) torch.compile's extra warm-up is repaid, beside the automatic threshold."""
    def key(row: BenchRow, compiled: bool) -> tuple:
        return row.workload, row.options.bf16, row.options.channels_last, compiled

    measured = {key(row, row.options.compile): row for row in rows}
    lines = []
    for compiled in (r for r in rows if r.options.compile):
        eager = measured.get(key(compiled, False))  # the same precision and layout, not compiled
        if eager is None:
            continue
        per, unit, threshold = ((compiled.batch, "steps", COMPILE_FROM_STEPS) if compiled.train
                                else (1, "images", INFERENCE_COMPILE_FROM_IMAGES))
        saved = per / eager.residual - per / compiled.residual  # seconds per step or image
        extra = max(0.0, compiled.warmup_seconds - eager.warmup_seconds)
        verdict = (f"repays its {extra:.0f} s warm-up after about {math.ceil(extra / saved):,} {unit}" if saved > 0
                   else f"never repays its warm-up: compiled {unit} were not faster")
        lines.append(f"{compiled.workload}: torch.compile {verdict} (compiling is chosen automatically "
                     f"from {threshold:,} {unit})")
    return lines
