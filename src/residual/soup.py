"""Model soups (Wortsman et al. 2022): several fine-tuned models' weights averaged into one model.

Models fine-tuned from the same pretrained weights (other seeds, learning rates, augmentation) often
end in one basin of the loss, where the average of their weights scores as well as the best of them or
better, at the cost of one model at inference (an ensemble costs all of them). Two recipes:
- uniform: every model, averaged;
- greedy (the paper's): the models best-first by held-out top-1 (multi-label models: mAP), each kept only
  if the soup with it scores at least as well on the held-out split as the soup without it.

Models trained from different random starts lie in different basins and their average is broken; the
greedy recipe then keeps the best model alone. Every float tensor of the state is averaged, batch norm's
running statistics included, as the paper does.

The held-out split chooses the greedy soup, so its score there is optimistic; when the data has a test
split, every model and both soups are also scored there, with McNemar's test of each soup against the
best single model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.datasets import open_dataset
from .errors import ConfigError
from .evaluate import evaluate, split_as_trained, training_split
from .metrics import paired_comparison
from .models import ResNet
from .runs import pick_device
from .weights import load_model, read_metadata, save_model

RECIPES = ("greedy", "uniform")


def check_compatible(models: dict[str, ResNet]) -> None:
    """Refuse models whose weights cannot be averaged, or whose averages would mean nothing: another
    architecture or tensor shape, other classes or another preprocessing than the first's."""
    (first_path, first), *others = models.items()
    shapes = {name: tensor.shape for name, tensor in first.state_dict().items()}
    for path, model in others:
        differs = ("architecture" if model.arch != first.arch or
                   {name: tensor.shape for name, tensor in model.state_dict().items()} != shapes else
                   "classes" if list(model.class_names) != list(first.class_names) else
                   "output (single- or multi-label)" if model.multi_label != first.multi_label else
                   "preprocessing" if model.preprocessing != first.preprocessing else None)
        if differs:
            raise ConfigError(f"{path}: its {differs} differs from {first_path}'s; a soup averages models "
                              f"fine-tuned from the same weights to the same classes")


def average_weights(models: list[ResNet]) -> ResNet:
    """A copy of the first model holding the mean of every float tensor of the models' states (integer
    counters, batch norm's batches seen, are the first's)."""
    soup = copy.deepcopy(models[0])
    states = [model.state_dict() for model in models]
    averaged = {name: torch.stack([state[name].float() for state in states]).mean(0).to(tensor.dtype)
                if tensor.is_floating_point() else tensor
                for name, tensor in states[0].items()}
    soup.load_state_dict(averaged)
    return soup


@dataclass
class Score:
    value: float  # top-1, or a multi-label model's mAP
    correct: np.ndarray = field(repr=False)  # per image, whether the answer was right (top-1; every label)


def greedy_choice(ranked: list[str], first: Score, score_of: Callable[[list[str]], Score]) -> tuple[list[str], Score]:
    """The greedy recipe: start from the best model (`first`, its score), try each next one (`ranked` is
    best-first), keep it if the soup's held-out score (`score_of` a list of models) does not drop."""
    kept, best = [ranked[0]], first
    for name in ranked[1:]:
        candidate = score_of(kept + [name])
        if candidate.value >= best.value:
            kept, best = kept + [name], candidate
    return kept, best


@dataclass
class SoupResult:
    path: Path  # the soup written
    recipe: str
    split: str  # the held-out split that chose it
    ingredients: list[str]  # the model files, best held-out score first
    kept: list[str]  # the ones in the soup
    held_out: dict[str, float]  # the score on `split`: each model's, and "uniform soup" / "greedy soup"
    test: dict[str, dict] = field(default_factory=dict)  # the score and McNemar against the best model, if a test split
    metric: str = "top1"  # the score: top-1, or for multi-label models mAP ("map")

    def to_dict(self) -> dict:
        return {"path": str(self.path), "recipe": self.recipe, "split": self.split, "metric": self.metric,
                "ingredients": self.ingredients, "kept": self.kept, "held_out": self.held_out, "test": self.test}


def soup(model_paths: list[str | Path], data: str | Path, out: str | Path, recipe: str = "greedy",
         split: str = "val", batch_size: int = 64, workers: int | None = None, device: str = "auto",
         progress: bool = False) -> SoupResult:
    """Average the models in `model_paths` as `recipe` says, choosing on `split` of `data`; write the soup to
    `out` (a .safetensors model file keeping the best model's provenance, plus the soup's)."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {RECIPES}, got {recipe!r}")
    if len(model_paths) < 2:
        raise ConfigError("a soup needs two or more model files")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: model files end in .safetensors")
    paths = [str(path) for path in model_paths]
    if out.resolve() in {Path(path).resolve() for path in paths}:
        raise ConfigError(f"{out}: the soup would replace one of its models; give another --out")
    for path in paths:
        read_metadata(path)  # an .onnx file or a non-model file is a one-line error naming it
    device = pick_device(device)
    dataset = held_out_dataset(paths, data)
    models = {path: load_model(path).to(device).eval() for path in paths}
    check_compatible(models)
    metric = "map" if models[paths[0]].multi_label else "top1"

    def score(model: ResNet, on: str) -> Score:
        result = evaluate(model, dataset, on, batch_size=batch_size, gallery_size=0, workers=workers,
                          progress=progress)
        return Score(result.score(), result.right())

    held_out = {path: score(model, split) for path, model in models.items()}
    ranked = sorted(paths, key=lambda path: -held_out[path].value)
    uniform = average_weights([models[path] for path in ranked])
    soups = {"uniform soup": (uniform, ranked, score(uniform, split))}  # name: (model, its models, its score)
    if recipe == "greedy":
        kept, best = greedy_choice(ranked, held_out[ranked[0]],
                                   lambda names: score(average_weights([models[name] for name in names]), split))
        soups["greedy soup"] = (average_weights([models[name] for name in kept]), kept, best)
    scores = {name: held_out[name].value for name in ranked}
    scores |= {name: soup_score.value for name, (_, _, soup_score) in soups.items()}
    chosen, kept, _ = soups[f"{recipe} soup"]
    test = {}
    if split != "test" and dataset.test is not None:
        best_model = score(models[ranked[0]], "test")
        test[ranked[0]] = {metric: best_model.value}
        for name, (model, _, _) in soups.items():
            on_test = score(model, "test")
            versus = paired_comparison(best_model.correct, on_test.correct)
            test[name] = {metric: on_test.value, "versus_best_model": versus}
    extra = read_metadata(ranked[0])["extra"]
    save_model(chosen.cpu(), out, extra={**extra, "soup": {"recipe": recipe, "chosen_on": f"{dataset.root} ({split})",
                                                           "models": kept}})
    return SoupResult(out, recipe, split, ranked, kept, scores, test, metric)


def held_out_dataset(paths: list[str], data: str | Path):
    """`data` with its held-out split: its own val folder, or, for the flat folder the models trained on, split
    as their training runs split it (the same way for all of them: otherwise one model's held-out images were
    another's training images)."""
    dataset = open_dataset(data)
    if not dataset.flat:
        return dataset
    if len({training_split(path, data) for path in paths}) > 1:
        raise ConfigError(f"{data}: the models were not all trained on it with the same --val-split and seed, so "
                          f"their held-out images differ; give data with a val split none of them trained on")
    return split_as_trained(paths[0], data) or dataset
