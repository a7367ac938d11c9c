"""Training throughput of the engine against a plain hand-written PyTorch loop, same process.

Both train the same model on the same `shapes` images with the same work per
batch: CIFAR-style pad-crop + flip (kornia), normalisation, channels_last,
SGD with Nesterov momentum and weight decay, cross-entropy. The engine runs as
users run it (residual.train, which also validates each epoch; its images/s
counts the training loop only, as the plain loop's does). Rounds alternate
engine, plain, engine, plain ... because this machine's speed drifts by a few
percent over minutes; the first epoch of every round is warm-up and is left
out. Prints a table; record it in docs/BENCHMARKS.md.

    python benchmarks/train_cpu.py [--model resnet20] [--per-class 200] [--epochs 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import residual
from residual.data.shapes import write_shapes
from residual.data.transforms import AugmentConfig
from residual.train import TrainConfig, train
from residual.train.optim import OptimConfig


def engine_rates(data: Path, out: Path, model: str, epochs: int, batch_size: int) -> list[float]:
    result = train(TrainConfig(data=str(data), model=model, epochs=epochs, batch_size=batch_size, quiet=True,
                               out=str(out), augment=AugmentConfig(preset="cifar"),
                               optim=OptimConfig(lr=0.1, weight_decay=5e-4, schedule="constant")))
    return [row["images_per_s"] for row in result.history[1:]]


def plain_rates(data: Path, model_name: str, epochs: int, batch_size: int) -> list[float]:
    """The loop a careful user would write by hand."""
    classes = sorted(p.name for p in (data / "train").iterdir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((data / "train" / c).glob("*.png"))]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files]))
    images = images.permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([i for _, i in files])
    mean = images.float().div(255).mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    std = images.float().div(255).std(dim=(0, 2, 3)).view(1, 3, 1, 1)
    model = residual.create_model(model_name, num_classes=len(classes)).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                                lr=0.1, momentum=0.9, nesterov=True)
    augment = K.AugmentationSequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip())
    rates = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(labels))
        for begin in range(0, len(labels), batch_size):
            index = order[begin:begin + batch_size]
            x = (augment(images[index].float().div_(255)) - mean) / std
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the engine reads the loss every step too (progress bar, NaN check)
        rates.append(len(labels) / (time.perf_counter() - start))
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3, help="per round; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes(Path(tmp) / "shapes", size=32, per_class=args.per_class, seed=0, progress=False)
        engine, plain = [], []
        for _ in range(args.rounds):
            engine += engine_rates(data, Path(tmp) / "runs", args.model, args.epochs, args.batch_size)
            plain += plain_rates(data, args.model, args.epochs, args.batch_size)
    print(f"\n{args.model}, {10 * args.per_class} images of 32 px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'path':<26}{'images/s median':>16}{'min - max':>14}{'epochs timed':>14}")
    for label, rates in (("residual.train (engine)", engine), ("plain PyTorch loop", plain)):
        print(f"{label:<26}{statistics.median(rates):>16.0f}{f'{min(rates):.0f} - {max(rates):.0f}':>14}"
              f"{len(rates):>14}")
    print(f"{'ratio engine / plain':<26}{statistics.median(engine) / statistics.median(plain):>16.3f}")


if __name__ == "__main__":
    main()
