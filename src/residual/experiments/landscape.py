"""The loss landscape around trained nets (Li et al. 2018): do skip connections make it smoother?

Two random directions in weight space span a plane through a trained net's weights, and the loss is
computed on a grid of that plane: the paper's Fig. 5, where ResNet-56 sits in a wide, nearly convex
bowl and its plain twin in a chaotic landscape. Each direction is filter-normalised: every filter (an
output channel of a convolution, a row of the classifier) of a Gaussian direction is scaled to the norm
of the filter it moves, so a step of 1 moves every filter by its own size, whatever the scale batch norm
leaves it at, and nets compare. Biases and normalisation parameters are not moved, as in the paper's
code by default. The loss is the training loss on a fixed sample of the training images, the net in
eval mode (its running batch-norm statistics).

Written here rather than taken from the paper's code (loss-landscapes and its kin are unmaintained
research code, with its own model loading and MPI); the method is the few functions below.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path
from ..data.transforms import normalize
from ..errors import ConfigError
from ..figures import new_figure, save_png
from ..models import ResNet
from ..progress import progress_bar
from ..runs import pick_device
from .common import check_trained_on, dataset_images, display_names, load_trained


def filter_normalized_direction(model: ResNet, generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction for every parameter: each filter scaled to its weight filter's norm, and zero for
    the one-dimensional parameters (biases, normalisation scales and shifts)."""
    directions = []
    for parameter in model.parameters():
        if parameter.dim() <= 1:
            directions.append(torch.zeros_like(parameter))
            continue
        direction = torch.randn(parameter.shape, generator=generator).to(parameter)
        filters, weights = direction.flatten(1), parameter.detach().flatten(1)
        scale = weights.norm(dim=1) / filters.norm(dim=1).clamp_min(1e-10)
        directions.append((filters * scale[:, None]).view_as(parameter))
    return directions


@torch.no_grad()
def loss_and_accuracy(model: ResNet, inputs: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 500) -> tuple[float, float]:
    """Mean cross-entropy and top-1 of the model (as it is, in eval mode) on normalised inputs."""
    loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(inputs[start:start + batch_size]).float()
        target = labels[start:start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    return loss / len(labels), correct / len(labels)


@torch.no_grad()
def loss_surface(model: ResNet, inputs: torch.Tensor, labels: torch.Tensor, coordinates: list[float],
                 directions: tuple[list[torch.Tensor], list[torch.Tensor]], progress: bool = False,
                 label: str = "landscape") -> tuple[np.ndarray, np.ndarray]:
    """Loss and top-1 at weights + a * first + b * second for every (b, a) of `coordinates` squared: arrays
    indexed [b, a]. The model's weights are put back afterwards, also when this is interrupted."""
    model.eval()
    parameters = list(model.parameters())
    trained = [parameter.detach().clone() for parameter in parameters]
    losses = np.zeros((len(coordinates), len(coordinates)))
    accuracies = np.zeros_like(losses)
    try:
        with progress_bar(label, progress, unit="points/s") as bar:
            task = bar.add_task(label, total=losses.size)
            for row, b in enumerate(coordinates):
                for column, a in enumerate(coordinates):
                    for parameter, weight, first, second in zip(parameters, trained, *directions):
                        parameter.copy_(weight + a * first + b * second)
                    losses[row, column], accuracies[row, column] = loss_and_accuracy(model, inputs, labels)
                    bar.advance(task)
    finally:
        for parameter, weight in zip(parameters, trained):
            parameter.copy_(weight)
    return losses, accuracies


def local_minima(surface: np.ndarray) -> int:
    """Grid points, away from the edge, lower than all eight neighbours: one for a bowl, many for a chaotic
    surface."""
    centre = surface[1:-1, 1:-1]
    lower = np.ones_like(centre, dtype=bool)
    rows, columns = surface.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                lower &= centre < surface[1 + dy:rows - 1 + dy, 1 + dx:columns - 1 + dx]
    return int(lower.sum())


@dataclass
class Landscape:
    model: str  # the model file
    name: str  # what the figure calls it: its architecture
    coordinates: list[float]
    loss: list[list[float]]  # [b][a]
    accuracy: list[list[float]]
    centre_loss: float  # the trained weights'
    chance_loss: float  # log(classes): the loss of a uniform guess
    basin_share: float  # the share of the grid where the loss is below chance's: the width of the basin
    local_minima: int


def run_landscape(models: list[str], data: str = "shapes", out: str | Path = "runs/experiments/landscape",
                  resolution: int = 21, span: float = 1.0, images: int = 1000, seed: int = 0,
                  device: str = "auto", console=None, progress: bool = True) -> list[Landscape]:
    """The loss on a `resolution` x `resolution` grid over [-span, span]^2 of a random filter-normalised plane
    through each model; the same directions' seed and the same images for every model. Writes
    landscape.png, landscape.csv and summary.json to `out`."""
    if resolution < 3 or resolution % 2 == 0:
        raise ConfigError(f"--resolution must be odd and at least 3 (points per side; odd, so the trained weights "
                          f"are the grid's centre), got {resolution}")
    if span <= 0:
        raise ConfigError(f"--span must be positive, got {span}")
    if images < 1:
        raise ConfigError(f"--images must be at least 1, got {images}")
    device = pick_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_trained(models, device)
    pixels, labels, classes = dataset_images(data, out, seed)
    check_trained_on(loaded, pixels, classes, data)
    sample = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:images]
    coordinates = np.linspace(-span, span, resolution).round(6).tolist()
    results = []
    for (path, model), name in zip(loaded.items(), display_names(loaded).values()):
        inputs = normalize(pixels[sample].to(device).float() / 255, model.preprocessing)
        generator = torch.Generator().manual_seed(seed)  # on the host: the same directions on every device
        directions = (filter_normalized_direction(model, generator), filter_normalized_direction(model, generator))
        loss, accuracy = loss_surface(model, inputs, labels[sample].to(device), coordinates, directions, progress,
                                      name)
        centre, chance = resolution // 2, math.log(len(classes))
        landscape = Landscape(str(path), name, coordinates, loss.tolist(), accuracy.tolist(),
                              float(loss[centre, centre]), chance, float((loss < chance).mean()), local_minima(loss))
        results.append(landscape)
        if console:
            console.print(f"{name}: loss {landscape.centre_loss:.3f} at the trained weights; below chance's "
                          f"{chance:.3f} on {landscape.basin_share:.0%} of the plane; {landscape.local_minima} local "
                          f"minim{'um' if landscape.local_minima == 1 else 'a'} on the grid")
    _write_csv(results, out / "landscape.csv")
    _plot(results, out / "landscape.png", f"{data}, {len(sample)} training images, seed {seed}")
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps([{key: value for key, value in asdict(result).items()
                                    if key not in ("loss", "accuracy")} for result in results], indent=2))
    return results


def _write_csv(results: list[Landscape], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "alpha", "beta", "loss", "accuracy"])
        for result in results:
            for row, b in enumerate(result.coordinates):
                for column, a in enumerate(result.coordinates):
                    writer.writerow([result.name, a, b, f"{result.loss[row][column]:.6f}",
                                     f"{result.accuracy[row][column]:.6f}"])


def _plot(results: list[Landscape], path: Path, subtitle: str) -> None:
    """Contours of each model's surface side by side, on one logarithmic scale of levels (the paper's
    figure): the same colour is the same loss in every panel. The levels stop at four times chance's loss
    (the paper's plots stop at 10 for CIFAR-10's 2.3): far from the weights the loss grows by orders of
    magnitude, which would leave one colour for everything near them."""
    lowest = max(min(min(min(row) for row in result.loss) for result in results), 1e-3)
    levels = np.geomspace(lowest, max(4 * results[0].chance_loss, 2 * lowest), 30)
    from matplotlib.colors import LogNorm  # with matplotlib itself: see figures.py

    figure = new_figure(figsize=(3.6 * len(results) + 1.2, 4.2), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False)
    for ax, result in zip(axes[0], results):
        grid = np.asarray(result.coordinates)
        loss = np.clip(result.loss, levels[0], levels[-1])
        filled = ax.contourf(grid, grid, loss, levels=levels, cmap="viridis",
                             norm=LogNorm(levels[0], levels[-1]))
        ax.contour(grid, grid, loss, levels=levels[::3], colors="white", linewidths=0.5)
        ax.contour(grid, grid, loss, levels=[result.chance_loss], colors="red", linewidths=1.2)
        ax.plot(0, 0, "r+", markersize=10)
        ax.set(title=f"{result.name}\nloss {result.centre_loss:.2f}, below chance on {result.basin_share:.0%}",
               xlabel="direction 1", aspect="equal")
    axes[0][0].set_ylabel("direction 2")
    colorbar = figure.colorbar(filled, ax=axes[0].tolist(), label="training loss (log scale)")
    ticks = [tick for tick in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
             if levels[0] <= tick <= levels[-1]]
    colorbar.set_ticks(ticks, labels=[f"{tick:g}" for tick in ticks])
    figure.suptitle(f"Loss around the trained weights (+); red: chance's loss. {subtitle}")
    save_png(figure, path)
