"""Deleting blocks from trained nets (Veit et al. 2016, "Residual Networks Behave Like Ensembles of
Relatively Shallow Networks"): a residual net survives the loss of a block, a plain net does not.

At test time, one block at a time is deleted: a residual block keeps only its shortcut (the identity,
or its projection where the shape changes), a plain block is replaced by the identity where its input
and output shapes match (a block that changes the shape cannot be deleted from a plain net). The
paper's Fig. 3: deleting any single block of ResNet-110 on CIFAR-10 barely moved its test error, except
the blocks that downsample, while deleting a layer of VGG left it at chance. Then several blocks at once,
chosen at random (Fig. 5a): a residual net's error grows smoothly with their number, as an ensemble's
does when members leave it, since the many paths through it (2^n for n blocks) are mostly short.

The nets are evaluated as trained, in eval mode (their running batch-norm statistics), on the held-out
images: the test split, or the validation split where there is none.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path
from ..data.transforms import normalize
from ..errors import ConfigError
from ..figures import COLOURS, new_figure, save_png
from ..models import ResNet
from ..models.blocks import ResidualBlock
from ..progress import progress_bar
from ..runs import pick_device
from .common import check_trained_on, dataset_images, display_names, load_trained


MAX_COUNTS = 12  # numbers of blocks deleted at random, spread from one to all: 12 points draw the curve


class ShortcutOnly(nn.Module):
    """A deleted block: what passes through it without its residual branch."""

    def __init__(self, block: ResidualBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.shortcut_only(x)


def blocks(model: ResNet) -> list[tuple[str, nn.Module, int]]:
    """(name, parent module, index in it) of every block, in order."""
    return [(f"{stage}.{index}", getattr(model, stage), index)
            for stage in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, stage)
            for index in range(len(getattr(model, stage)))]


@torch.no_grad()
def block_shapes(model: ResNet, sample: torch.Tensor) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Each block's (input shape, output shape) on `sample`."""
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns nothing: the output stays as it is
            shapes[name] = (inputs[0].shape, output.shape)
        return hook

    hooks = [parent[index].register_forward_hook(record(name)) for name, parent, index in blocks(model)]
    try:
        model.eval()(sample)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


@contextlib.contextmanager
def deleted(model: ResNet, names: set[str]):
    """The model with the blocks `names` deleted, put back as they were afterwards."""
    removed = [(parent, index) for name, parent, index in blocks(model) if name in names]
    originals = [parent[index] for parent, index in removed]
    try:
        for (parent, index), block in zip(removed, originals):
            parent[index] = ShortcutOnly(block)
        yield model
    finally:
        for (parent, index), block in zip(removed, originals):
            parent[index] = block


@torch.no_grad()
def error_rate(model: ResNet, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 error of the model (in eval mode) on normalised inputs."""
    wrong = sum(int((model(inputs[start:start + batch_size]).argmax(1) != labels[start:start + batch_size]).sum())
                for start in range(0, len(labels), batch_size))
    return wrong / len(labels)


@dataclass
class Lesion:
    model: str  # the model file
    name: str  # what the figure calls it: its architecture
    error: float  # with every block
    blocks: list[str]  # every block, in order
    single: dict[str, float | None]  # block -> error with it deleted (None: a plain block that cannot be)
    downsampling: list[str]  # the blocks whose output shape is not their input's (stride or width)
    deleted_counts: list[int]  # how many blocks were deleted at random...
    mean_error: list[float]  # ... the mean error over the draws of that many
    std_error: list[float]

    @property
    def same_shape_increase(self) -> float:
        """The mean rise of the error when one block whose shapes match is deleted: what compares across
        plain and residual twins."""
        rises = [error - self.error for name, error in self.single.items()
                 if error is not None and name not in self.downsampling]
        return float(np.mean(rises)) if rises else float("nan")


def random_deletions(names: list[str], count: int, draws: int, generator: torch.Generator) -> list[set[str]]:
    """`draws` different random sets of `count` of `names` (all of them where there are fewer)."""
    if math.comb(len(names), count) <= draws:
        return [set(chosen) for chosen in itertools.combinations(names, count)]
    chosen: list[set[str]] = []
    while len(chosen) < draws:
        pick = {names[i] for i in torch.randperm(len(names), generator=generator)[:count].tolist()}
        if pick not in chosen:
            chosen.append(pick)
    return chosen


def lesion(model: ResNet, name: str, path: str, inputs: torch.Tensor, labels: torch.Tensor, draws: int,
           seed: int, progress: bool = False) -> Lesion:
    """Delete each block alone, then `draws` random sets of blocks for up to MAX_COUNTS numbers of them,
    from one to every deletable block."""
    shapes = block_shapes(model, inputs[:1])
    order = [block for block, _, _ in blocks(model)]
    downsampling = [block for block in order if shapes[block][0] != shapes[block][1]]
    # A residual block leaves its shortcut; a plain block can only give way to the identity.
    can_delete = [block for block, parent, index in blocks(model)
                  if parent[index].residual or block not in downsampling]
    counts = sorted({int(count) for count in np.linspace(1, len(can_delete), MAX_COUNTS).round()})
    generator = torch.Generator().manual_seed(seed)
    plans = [random_deletions(can_delete, count, draws, generator) for count in counts]
    single: dict[str, float | None] = {block: None for block in order}
    means, stds = [], []
    with progress_bar(f"deleting blocks of {name}", progress) as bar:
        task = bar.add_task("lesion", total=1 + len(can_delete) + sum(len(plan) for plan in plans))
        full = error_rate(model, inputs, labels)
        bar.advance(task)
        for block in can_delete:
            with deleted(model, {block}):
                single[block] = error_rate(model, inputs, labels)
            bar.advance(task)
        for plan in plans:
            errors = []
            for chosen in plan:
                with deleted(model, chosen):
                    errors.append(error_rate(model, inputs, labels))
                bar.advance(task)
            means.append(float(np.mean(errors)))
            stds.append(float(np.std(errors)))
    return Lesion(path, name, full, order, single, downsampling, counts, means, stds)


def run_lesion(models: list[str], data: str = "shapes", out: str | Path = "runs/experiments/lesion",
               images: int | None = None, draws: int = 10, seed: int = 0, device: str = "auto", console=None,
               progress: bool = True) -> list[Lesion]:
    """Delete blocks from each trained model, on the same held-out images; write lesion.png, lesion.csv and
    summary.json to `out`."""
    if draws < 1:
        raise ConfigError(f"--draws must be at least 1 (random sets of blocks for each number deleted), got {draws}")
    if images is not None and images < 1:
        raise ConfigError(f"--images must be at least 1, got {images}")
    device = pick_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_trained(models, device)
    pixels, labels, classes = dataset_images(data, out, seed, held_out=True)
    check_trained_on(loaded, pixels, classes, data)
    sample = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:images]
    results = []
    for (path, model), name in zip(loaded.items(), display_names(loaded).values()):
        inputs = normalize(pixels[sample].to(device).float() / 255, model.preprocessing)
        result = lesion(model, name, str(path), inputs, labels[sample].to(device), draws, seed, progress)
        results.append(result)
        if console:
            console.print(verdict_line(result, len(classes)))
    _write_csv(results, out / "lesion.csv")
    _plot(results, out / "lesion.png", len(classes), f"{data}, {len(sample)} held-out images")
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps([{**asdict(result), "same_shape_increase": result.same_shape_increase,
                                    "verdict": verdict_line(result, len(classes))} for result in results], indent=2))
    return results


def verdict_line(result: Lesion, classes: int) -> str:
    """What deleting one block did to the net, in words."""
    deletable_errors = {name: error for name, error in result.single.items() if error is not None}
    worst = max(deletable_errors, key=deletable_errors.get)
    chance = 1 - 1 / classes
    same_shape = [name for name in deletable_errors if name not in result.downsampling]
    at_chance = sum(deletable_errors[name] >= chance - 0.05 for name in same_shape)
    return (f"{result.name}: test error {result.error:.2%}; deleting one block whose shapes match changed it by "
            f"{100 * result.same_shape_increase:+.2f} points on average ({at_chance} of {len(same_shape)} such "
            f"deletions left it within 5 points of chance, {chance:.0%}); the worst deletion, {worst}, "
            f"{deletable_errors[worst]:.2%}"
            + (f"; {len(result.blocks) - len(deletable_errors)} block(s) change the shape and have no shortcut to "
               f"keep" if len(deletable_errors) < len(result.blocks) else ""))


def _write_csv(results: list[Lesion], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "deleted", "count", "error", "std"])
        for result in results:
            writer.writerow([result.name, "", 0, f"{result.error:.6f}", ""])
            for block, error in result.single.items():
                writer.writerow([result.name, block, 1, "" if error is None else f"{error:.6f}", ""])
            for count, mean, std in zip(result.deleted_counts, result.mean_error, result.std_error):
                writer.writerow([result.name, "random", count, f"{mean:.6f}", f"{std:.6f}"])


def _plot(results: list[Lesion], path: Path, classes: int, subtitle: str) -> None:
    """Left, the error with each single block deleted (the paper's Fig. 3; hollow markers: blocks whose
    shortcut changes the shape); right, the mean error with random sets of blocks deleted (Fig. 5a)."""
    figure = new_figure(figsize=(13, 4.6), layout="constrained")
    single, several = figure.subplots(1, 2)
    chance = 100 * (1 - 1 / classes)
    for colour, result in zip(COLOURS, results):
        positions = [i + 1 for i, name in enumerate(result.blocks) if result.single[name] is not None]
        errors = [100 * result.single[name] for name in result.blocks if result.single[name] is not None]
        single.plot(positions, errors, "-", color=colour, lw=1.2, label=f"{result.name} ({100 * result.error:.1f}%)")
        for position, name in zip(positions, (n for n in result.blocks if result.single[n] is not None)):
            hollow = name in result.downsampling
            single.plot(position, 100 * result.single[name], "o", color=colour, ms=4.5,
                        markerfacecolor="white" if hollow else colour)
        single.axhline(100 * result.error, color=colour, lw=0.8, ls="--")
        mean = 100 * np.asarray(result.mean_error)
        spread = 100 * np.asarray(result.std_error)
        several.plot(result.deleted_counts, mean, "-o", color=colour, ms=3, label=result.name)
        several.fill_between(result.deleted_counts, mean - spread, mean + spread, color=colour, alpha=0.15)
    for ax in (single, several):
        ax.axhline(chance, color="red", lw=1, ls=":", label=f"chance ({chance:.0f}%)")
        ax.set(ylabel="test error (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    single.set(title="one block deleted (dashed: none; hollow: block that changes the shape)",
               xlabel="block deleted (1 = first)")
    several.set(title="blocks deleted at random (mean ± std over draws)", xlabel="number of blocks deleted")
    single.legend(fontsize=8)
    several.legend(fontsize=8)
    figure.suptitle(f"Deleting blocks at test time (Veit et al. 2016). {subtitle}")
    save_png(figure, path)
