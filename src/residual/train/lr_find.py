"""The learning-rate range test (Smith 2017; fastai's lr_find).

Train from the configured start (fresh or pretrained, same data, augmentation and
optimizer) while the learning rate grows exponentially from `start_lr` to `end_lr`, and
record the smoothed loss. The suggestion is a tenth of the rate at the lowest loss
(fastai's lr_min), a rate still safely on the falling side. It runs the engine's own
training step, only with this schedule; the model it trains is thrown away. The curve
goes to `runs`/NAME/lr_find.png: by default lr-find beside the training runs (runs/lr-find
for config.out runs/train).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..data.datasets import open_dataset
from ..errors import ConfigError
from ..figures import new_figure, save_png
from ..progress import message_console
from ..runs import output_dir
from .config import TrainConfig, resolve
from .trainer import Trainer, TrainingError, seeded, step_groups


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float
    plot: Path


def lr_find(config: TrainConfig, start_lr: float = 1e-6, end_lr: float = 10.0, steps: int = 100,
            smoothing: float = 0.9, diverge: float = 4.0, runs: str | None = None,
            console: Console | None = None) -> LRFindResult:
    sweep = math.ceil(steps / config.accumulate)  # optimizer steps: the rate changes once per step
    if sweep < 2 or not 0 < start_lr < end_lr:
        raise ConfigError(f"the range test needs --steps of {2 * config.accumulate} or more (two optimizer steps) and "
                          f"0 < --start-lr < --end-lr, got {steps}, {start_lr} and {end_lr}")
    console = console or message_console()
    with seeded(config.seed, config.deterministic):  # the flags it sets end with the sweep
        dataset = open_dataset(config.data, config.val_split, config.seed)
        config = replace(resolve(config, dataset), tensorboard=False, mlflow=None, wandb=None)  # a sweep, not a run
        with output_dir(None, runs or str(Path(config.out).parent / "lr-find"), config.name or config.model) as run_dir:
            trainer = Trainer(config, dataset, run_dir, console)
            lrs, losses = _range_test(trainer, start_lr, end_lr, steps, sweep, smoothing, diverge)
            suggestion = suggest(lrs, losses)
            plot = run_dir / "lr_find.png"
            _plot(lrs, losses, suggestion, plot, f"{config.model} on {Path(config.data).name}")
    console.print(f"suggested learning rate {suggestion:.3g} (a tenth of the rate at the lowest loss); curve: {plot}")
    return LRFindResult(lrs, losses, suggestion, plot)


def _range_test(trainer: Trainer, start_lr: float, end_lr: float, steps: int, sweep: int, smoothing: float,
                diverge: float) -> tuple[list[float], list[float]]:
    """The rate raised exponentially from start_lr to end_lr over `sweep` optimizer steps -> (rates, smoothed
    losses), stopped where the loss diverges."""
    ratio = end_lr / start_lr
    base = trainer.config.optim.lr  # the optimizer's groups start at base x their layer scale
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda step: start_lr * ratio ** (min(step, sweep - 1) / (sweep - 1)) / base)
    trainer.model.train()
    trainer._apply_freezing()  # the trainable set of the first epoch (head only for two-stage fine-tuning)
    lrs, losses, average, best = [], [], 0.0, math.inf
    for step, (lr, loss) in enumerate(_sweep(trainer, steps, trainer.config.accumulate)):
        if not math.isfinite(loss):  # the sweep has gone past any usable rate
            break
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (step + 1))  # bias-corrected, as in fastai
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if step > 5 and smoothed > diverge * best:
            break
    return lrs, losses


def _sweep(trainer: Trainer, steps: int, accumulate: int) -> Iterator[tuple[float, float]]:
    """(learning rate, loss) of each of the sweep's `steps` batches; its optimizer steps span epochs."""
    batches = (batch for epoch in itertools.count() for batch in trainer.train_loader.epoch(epoch))
    for group in step_groups(itertools.islice(batches, steps), accumulate):
        lr = trainer.optimizer.param_groups[0]["lr"] / trainer.optimizer.param_groups[0]["lr_scale"]
        for (_, labels), (loss, _, _, _) in zip(group, trainer._optimizer_step(group)):
            if len(labels):  # a batch none of whose images could be read says nothing about the rate
                yield lr, loss.item()


def suggest(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the rate at the lowest smoothed loss (fastai's lr_min).

    The steepest-slope rule was tried first: the noisy first points of the smoothed
    curve won it (1e-6 on shapes, where the loss really falls around 1e-3 to 1e-2).
    """
    if len(lrs) < 3:
        raise TrainingError("the range test diverged at once; lower --start-lr")
    return float(lrs[int(np.argmin(losses))]) / 10


def _plot(lrs: list[float], losses: list[float], suggestion: float, path: Path, title: str) -> None:
    figure = new_figure(figsize=(7, 4))
    ax = figure.subplots()
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", ls="--", label=f"suggested {suggestion:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title=f"LR range test: {title}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figure.tight_layout()
    save_png(figure, path)
