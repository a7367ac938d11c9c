"""What the experiments share: the data they run on."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..data.datasets import open_dataset
from ..data.loaders import BadFileLog, load_into_memory
from ..data.shapes import write_shapes
from ..errors import ConfigError
from ..models import ResNet
from ..weights import load_model

SHAPES_SIZE = 16  # small images keep the default experiments within minutes on two CPU cores
SHAPES_PER_CLASS = 400


def shapes_folder(out: Path, seed: int = 0) -> Path:
    """The built-in data for experiments, written once under `out`."""
    return write_shapes(out / f"shapes-{SHAPES_SIZE}", size=SHAPES_SIZE, per_class=SHAPES_PER_CLASS, seed=seed,
                        progress=False)


def resolve_data(data: str, out: Path, seed: int = 0) -> Path:
    """'shapes' -> the built-in data (written under `out`), anything else -> that folder."""
    return shapes_folder(out, seed) if data == "shapes" else Path(data)


def dataset_images(data: str, out: Path, seed: int = 0,
                   held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training split, or with `held_out` the test split (the validation split where there is no test
    split), as (uint8 images, labels, classes), decoded at the images' own (square) size."""
    dataset = open_dataset(resolve_data(data, out, seed), seed=seed)
    split = (dataset.test or dataset.val) if held_out else dataset.train
    if split.images is not None:
        return split.images, torch.as_tensor(split.labels), dataset.classes
    size = min(Image.open(split.files[0]).size)
    images, labels = load_into_memory(split, size, size, "bilinear", BadFileLog(), progress=False)
    return images, labels, dataset.classes


def check_trained_on(models: dict[str, ResNet], images: torch.Tensor, classes: list[str], data: str,
                     named_by: str = "") -> None:
    """Refuse, naming it, a trained model that does not take `data`'s images: another size or class count.
    `named_by`: the flag that gave the models, to start the message with."""
    for name, model in models.items():
        if model.preprocessing.input_size != images.shape[-1] or model.num_classes != len(classes):
            raise ConfigError(f"{named_by}{name} was trained on {model.num_classes} classes at "
                              f"{model.preprocessing.input_size} px, --data {data} has {len(classes)} at "
                              f"{images.shape[-1]} px; give the data it was trained on")


def load_trained(paths: list[str], device: torch.device) -> dict[str, ResNet]:
    """The trained model files an experiment looks at, by path, on `device`."""
    loaded = {}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such model file; give trained models, e.g. the runs of `residual "
                              f"experiment degradation` (runs/experiments/degradation/runs/*/model.safetensors)")
        loaded[path] = load_model(path).to(device)
    return loaded


def display_names(models: dict[str, ResNet]) -> dict[str, str]:
    """What a figure calls each model: its architecture; with its folder too where two models share one
    (two runs of resnet56, say)."""
    archs = [model.arch for model in models.values()]
    return {path: model.arch if archs.count(model.arch) == 1 else f"{model.arch} ({Path(path).parent.name})"
            for path, model in models.items()}
