"""Gradient flow through deep nets: do gradients vanish, and do skip connections stop it?

For every 3x3 layer of every block the probe records two numbers on one batch:
- the std of its response (after its normalisation, before the addition and ReLU:
  the quantity of He et al. 2015, Fig. 7);
- the norm of the gradient of the loss with respect to that response: the
  back-propagated signal, the thing that "vanishes" in deep plain nets.
It measures each model at initialisation and again after a short SGD run on the
data, and plots both, layer by layer, on log scales. With `trained`, the folder of
runs the degradation experiment trained (OUT/runs/MODEL/model.safetensors), it also
measures those fully trained nets in eval mode, with their running BN statistics:
Fig. 7's setting, where a short run in training mode shows little (batch norm
scales every response to about 1 there).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ..data.transforms import normalize
from ..errors import ConfigError
from ..figures import COLOURS, new_figure, save_png
from ..models import ResNet, build_model
from ..models.preprocessing import Preprocessing
from ..train.trainer import channel_stats
from ..weights import load_model
from .common import check_trained_on, dataset_images


@dataclass
class LayerStats:
    layer: int  # 1 = the first 3x3 layer after the stem
    name: str
    response_std: float
    grad_norm: float  # || dL / d(response) ||


def response_modules(model: ResNet) -> list[tuple[str, nn.Module]]:
    """The module whose output is each 3x3 layer's response: its norm (post-activation), or the conv."""
    modules = []
    for stage in model.stage_names:
        for index, block in enumerate(getattr(model, stage)):
            names = ["conv1", "conv2", "conv3"] if model.config.preact else ["bn1", "bn2", "bn3"]
            modules += [(f"{stage}.{index}.{n}", getattr(block, n)) for n in names if hasattr(block, n)]
    return modules


def probe(model: ResNet, images: torch.Tensor, labels: torch.Tensor, training: bool = True) -> list[LayerStats]:
    """Response std and back-propagated gradient norm of every 3x3 layer, for one batch; in training mode
    (batch statistics) or eval mode (running statistics), as `training` says."""
    stds: dict[int, float] = {}
    grads: dict[int, float] = {}

    def watch(index: int):
        def hook(module, inputs, output):
            stds[index] = output.detach().float().std().item()
            output.register_hook(lambda grad: grads.__setitem__(index, grad.detach().float().norm().item()))
            return output.clone()  # the block's in-place ReLU/add then work on the copy, not the watched tensor
        return hook

    modules = response_modules(model)
    handles = [module.register_forward_hook(watch(i)) for i, (_, module) in enumerate(modules)]
    try:
        model.train(training)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return [LayerStats(i + 1, name, stds[i], grads[i]) for i, (name, _) in enumerate(modules)]


def train_briefly(model: ResNet, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
                  lr: float, seed: int) -> None:
    """A few hundred steps of plain SGD: enough to see how gradient flow changes once a net learns."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # the point is to watch, not to diverge
        optimizer.step()


TRAINED_PHASE = "trained (eval mode)"


def trained_models(models: list[str], runs: str | Path) -> dict[str, ResNet]:
    """The fully trained nets of a degradation experiment: RUNS/MODEL/model.safetensors for each model."""
    files = {name: Path(runs) / name / "model.safetensors" for name in models}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ConfigError(f"--trained {runs}: no {', '.join(missing)}; give the runs/ folder of a degradation "
                          f"experiment that trained {', '.join(models)} (residual experiment degradation --depths ...)")
    return {name: load_model(path) for name, path in files.items()}


def run_gradients(models: list[str], data: str = "shapes", out: str | Path = "runs/experiments/gradients",
                  norm: str | None = "batch", init: str = "he", steps: int = 200, batch_size: int = 64,
                  lr: float = 0.05, seed: int = 0, trained: str | Path | None = None,
                  console=None) -> dict[str, dict[str, list[LayerStats]]]:
    """Probe each model at init and after `steps` SGD steps, and each `trained` one (a degradation experiment's
    runs folder); write gradients.csv and gradients.png."""
    finished = trained_models(models, trained) if trained else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, classes = dataset_images(data, out, seed)
    check_trained_on(finished, images, classes, data, named_by="--trained: ")
    preprocessing = Preprocessing(images.shape[-1], images.shape[-1], *channel_stats(images))
    inputs = normalize(images.float() / 255, preprocessing)
    torch.manual_seed(seed)
    probe_index = torch.randperm(len(labels))[:batch_size]
    results: dict[str, dict[str, list[LayerStats]]] = {}
    for name in models:
        torch.manual_seed(seed)
        model = build_model(name, num_classes=len(classes), norm=norm, init=init)
        results[name] = {"init": probe(model, inputs[probe_index], labels[probe_index])}
        train_briefly(model, inputs, labels, steps, batch_size, lr, seed)
        results[name][f"after {steps} steps"] = probe(model, inputs[probe_index], labels[probe_index])
        if name in finished:  # on the data as it was trained on it: its own normalisation
            own_inputs = normalize(images[probe_index].float() / 255, finished[name].preprocessing)
            results[name][TRAINED_PHASE] = probe(finished[name], own_inputs, labels[probe_index], training=False)
        if console:
            first, last = results[name]["init"][0], results[name]["init"][-1]
            console.print(f"{name}: at init, first/last layer gradient norm {first.grad_norm / last.grad_norm:.2e}")
            if name in finished:
                stds = [layer.response_std for layer in results[name][TRAINED_PHASE]]
                console.print(f"{name}: trained, mean response std {sum(stds) / len(stds):.3f}")
    _write_csv(results, out / "gradients.csv")
    _plot(results, out / "gradients.png", f"norm={norm or 'none'}, init={init}")
    return results


def _write_csv(results: dict, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "phase", "layer", "name", "response_std", "grad_norm"])
        writer.writeheader()
        for model, phases in results.items():
            for phase, layers in phases.items():
                for stats in layers:
                    writer.writerow({"model": model, "phase": phase, **asdict(stats)})


def _plot(results: dict, path: Path, subtitle: str) -> None:
    figure = new_figure(figsize=(13, 4.2))
    grad_ax, std_ax = figure.subplots(1, 2)
    for colour, (model, phases) in zip(COLOURS, results.items()):
        for (phase, layers), style in zip(phases.items(), ("-", "--", ":")):
            x = [s.layer for s in layers]
            grad_ax.plot(x, [s.grad_norm for s in layers], style, color=colour, label=f"{model}, {phase}")
            std_ax.plot(x, [s.response_std for s in layers], style, color=colour, label=f"{model}, {phase}")
    grad_ax.set(yscale="log", xlabel="3x3 layer (input side on the left)",
                title="gradient norm at each layer's response")
    std_ax.set(yscale="log", xlabel="3x3 layer", title="std of each layer's response (He et al. Fig. 7)")
    for ax in (grad_ax, std_ax):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    figure.suptitle(f"Gradient flow ({subtitle})")
    figure.tight_layout()
    save_png(figure, path)
