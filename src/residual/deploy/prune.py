"""Structured channel pruning: a physically smaller ResNet, fine-tuned, measured before and after.

Only the channels inside a block can go: the outputs of a block's inner
convolutions (conv1 of a basic block; conv1 and conv2 of a bottleneck), which
nothing but the block's next convolution reads. The residual stream between
blocks keeps its width, so shortcuts stay as they are. In each such layer the
filters with the smallest L1 norm are removed (Li et al. 2017, "Pruning Filters
for Efficient ConvNets"), with the matching norm channels and the next
convolution's input channels. The result is an ordinary ResNet whose config
records the new widths (`block_widths`), so it loads from its model file alone;
it is then fine-tuned by the training engine to recover accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..atomic import write_json
from ..data.datasets import open_dataset
from ..errors import ConfigError, ResidualError
from ..evaluate import evaluate, training_split
from ..metrics import paired_comparison
from ..models import ResNet, count_macs, count_params
from ..train import TrainConfig, train
from ..train.optim import OptimConfig
from ..weights import load_model, save_model
from .speed import measure_speed

NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


class PruneError(ResidualError):
    """A model or dataset that cannot be pruned as asked."""


def filters_to_keep(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Indices (ascending) of the output filters with the largest L1 norms; `amount` of them are dropped."""
    count = weight.shape[0]
    keep = max(1, round(count * (1.0 - amount)))
    return weight.detach().abs().sum(dim=(1, 2, 3)).topk(keep).indices.sort().values


def prune_channels(model: ResNet, amount: float) -> ResNet:
    """A new ResNet without the `amount` fraction of each block's inner channels of least L1 norm."""
    if not 0.0 < amount < 1.0:
        raise ConfigError(f"--amount is the fraction of inner channels to remove: between 0 and 1, got {amount}")
    if model.config.groups != 1:
        raise PruneError(f"{model.arch}: grouped convolutions (ResNeXt) cannot be pruned channel by channel")
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    block_widths = []
    for stage in model.stage_names:
        for index, block in enumerate(getattr(model, stage)):
            widths = []
            for producer, norm, consumer in block.inner_layers:
                keep = filters_to_keep(getattr(block, producer).weight, amount)
                prefix = f"{stage}.{index}."
                state[f"{prefix}{producer}.weight"] = state[f"{prefix}{producer}.weight"][keep]
                for tensor in NORM_TENSORS:
                    if f"{prefix}{norm}.{tensor}" in state:
                        state[f"{prefix}{norm}.{tensor}"] = state[f"{prefix}{norm}.{tensor}"][keep]
                state[f"{prefix}{consumer}.weight"] = state[f"{prefix}{consumer}.weight"][:, keep]
                widths.append(len(keep))
            block_widths.append(tuple(widths))
    config = dataclasses.replace(model.config, block_widths=tuple(block_widths))
    pruned = ResNet(config, arch=model.arch, class_names=model.class_names, preprocessing=model.preprocessing)
    pruned.multi_label, pruned.threshold = model.multi_label, model.threshold
    pruned.load_state_dict(state)
    return pruned.to(next(model.parameters()).device).eval()


@dataclass
class PruneResult:
    path: Path
    report_path: Path
    run_dir: Path | None  # the fine-tuning run (None with epochs=0)
    report: dict  # before, pruned (not yet fine-tuned), after: params, MACs, speed, top-1


def model_stats(model: ResNet, dataset, split: str, batch_size: int, progress: bool) -> tuple[dict, np.ndarray]:
    """Parameters, MACs per image, CPU speed and top-1 (a multi-label model's mAP) on `split`; and per image,
    whether its answer was right (its top-1; every label)."""
    cpu_model = copy.deepcopy(model).float().cpu().eval()
    size = model.preprocessing.input_size
    evaluated = evaluate(model, dataset, split, batch_size=batch_size, gallery_size=0, workers=0, progress=progress)
    return ({"params": count_params(cpu_model), "macs": count_macs(cpu_model, size, model.config.in_chans),
             **measure_speed(cpu_model, size, model.config.in_chans).to_dict(),
             evaluated.score_name: evaluated.score()},
            evaluated.right())


def prune(model_path: str | Path, data: str | Path, out: str | Path | None = None, *, amount: float = 0.3,
          epochs: int = 5, lr: float | None = None, batch_size: int = 128, split: str = "val", device: str = "auto",
          workers: int | None = None, runs: str = "runs/prune", progress: bool = False,
          console: Console | None = None) -> PruneResult:
    """Prune `model_path` by `amount`, fine-tune it on `data` for `epochs`, and write the smaller model file."""
    model_path = Path(model_path)
    out = Path(out) if out else model_path.with_name(f"{model_path.stem}-pruned.safetensors")
    if out.suffix != ".safetensors":
        raise PruneError(f"{out}: model files end in .safetensors")
    if epochs < 0:
        raise ConfigError(f"--epochs must be 0 (no fine-tuning) or more, got {epochs}")
    model = load_model(model_path).eval()
    # A flat folder is split as the model's training split it, so fine-tuning never trains on what the
    # before/after top-1 is measured on.
    val_split, seed = training_split(model_path, data) or (None, 0)
    dataset = open_dataset(data, val_split, seed)
    if list(model.class_names or []) != list(dataset.classes):
        raise PruneError(f"{data}: its classes {dataset.classes[:5]} are not the model's "
                         f"{(model.class_names or [])[:5]} in the same order; prune on the data it was trained on")
    pruned = prune_channels(model, amount)  # first: a bad --amount stops before any evaluation
    report = {"source": str(model_path), "amount": amount, "epochs": epochs, "split": split,
              "metric": "map" if model.multi_label else "top1"}
    report["before"], correct_before = model_stats(model, dataset, split, batch_size, progress)
    report["pruned"], _ = model_stats(pruned, dataset, split, batch_size, progress)
    run_dir = None
    if epochs > 0:
        with tempfile.TemporaryDirectory(prefix="residual-prune-") as folder:
            start = save_model(pruned, Path(folder) / "pruned.safetensors")
            config = TrainConfig(data=str(data), pretrained=str(start), strategy="full", epochs=epochs,
                                 val_split=val_split, seed=seed, batch_size=batch_size, optim=OptimConfig(lr=lr),
                                 device=device, workers=workers,
                                 out=runs, name=f"{model_path.stem}-pruned", quiet=not progress, report=False)
            trained = train(config, console=console or Console(quiet=not progress))
        run_dir = trained.run_dir
        pruned = load_model(trained.model_path).eval()
    report["after"], correct_after = model_stats(pruned, dataset, split, batch_size, progress)
    report["versus_before"] = paired_comparison(correct_before, correct_after)  # is the change in answers chance?
    report["block_widths"] = [list(w) for w in pruned.config.block_widths]
    claims = {key: report["after"][key] for key in ("params", "macs")}
    save_model(pruned, out, extra={"pruned_from": model_path.name, "pruning": {"amount": amount, **claims},
                                   **({"run": str(run_dir)} if run_dir else {})})
    report_path = out.with_suffix(".prune.json")
    write_json(report_path, {"model": str(out), **report})
    return PruneResult(out, report_path, run_dir, report)
