"""Why the model decided: class activation maps (Grad-CAM and four variants), and overlays to look at.

Grad-CAM (Selvaraju et al. 2017) weighs each channel of a layer's activations by
the mean gradient of the class score, sums, keeps the positive part and
upsamples to the image. Grad-CAM++ (Chattopadhay et al. 2018) weighs the
positive gradients per position instead, which spreads the map over several
instances of a class. XGradCAM, LayerCAM and HiResCAM weigh otherwise (see
`weighted_activations`); all five equal pytorch-grad-cam's maps (tested). The default
layer is the last stage, the coarsest map the classifier sees; any module name
(`layer3`, `layer4.1.conv2`) works, and LayerCAM is the one made for the earlier,
finer ones.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.datasets import input_images
from .data.loaders import inference_batches
from .data.transforms import normalize
from .errors import ConfigError
from .figures import colour_map, new_figure, save_png
from .models import ResNet
from .predict import (class_names_of, class_thresholds, is_multi_label, model_device, output_probabilities,
                      source_name)
from .progress import progress_bar

METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
DISPLAY_SIZE = 224  # overlays of small inputs are enlarged to this for viewing


@dataclass
class Explanation:
    source: str
    class_id: int  # the class explained (predicted, or the one asked for)
    class_name: str
    probability: float  # the model's probability for that class
    predicted_id: int  # the most likely class
    heatmap: np.ndarray  # H x W in [0, 1], at the model's input size
    image: np.ndarray  # H x W x 3 uint8, the model's input before normalisation
    path: Path | None = None  # where the overlay was written
    predicted: bool = True  # whether the model predicts the class explained (a multi-label model may predict several)


@dataclass
class ExplainResult:
    explanations: list[Explanation]
    failed: list[str] = field(default_factory=list)


def default_layer(model: ResNet) -> str:
    return model.stage_names[-1]


def resolve_target(model, target: int | str | None) -> int | None:
    """A class index from an index or a class name (None: the predicted class)."""
    if target is None:
        return None
    names = class_names_of(model)
    if isinstance(target, str) and target in names:
        return names.index(target)
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        if 0 <= int(target) < len(names):
            return int(target)
    raise ConfigError(f"--target {target!r}: not a class of this model; give a class index (0-{len(names) - 1}) "
                      f"or a name such as {names[0]!r}")


def grad_cam(model: ResNet, x: torch.Tensor, targets: list[int] | None = None, layer: str | None = None,
             method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps (N x H x W in [0, 1], at x's size) and probabilities (N x classes) for a normalised batch.

    `targets`: the class to explain per image; None explains each image's predicted class.
    """
    module = explained_module(model, method, layer)
    name = layer or default_layer(model)
    captured = {}
    caller = threading.get_ident()

    def keep_activation(_module, _inputs, output):
        if threading.get_ident() != caller:  # another thread's pass through a shared model: its own hook keeps it
            return None
        if not isinstance(output, torch.Tensor) or output.dim() != 4:  # e.g. fc: no positions to weigh
            raise ConfigError(f"--layer {name!r}: its output is not a feature map (channels x height x width); "
                              f"give a convolutional module such as {default_layer(model)!r}")
        captured["activation"] = output
        return output.clone()  # later in-place ops (ReLU) must not overwrite what we differentiate

    model.eval()
    handle = module.register_forward_hook(keep_activation)
    try:
        with torch.enable_grad():
            logits = model(x)
            classes = logits.argmax(1) if targets is None else torch.as_tensor(targets, device=logits.device)
            score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval mode
            activation = captured["activation"]
            (gradient,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    cam = weighted_activations(activation.detach().float(), gradient.float(), method).clamp_min(0)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    # From its lowest to its highest value per image, as pytorch-grad-cam scales: a Grad-CAM++ map is positive
    # everywhere, and scaled by its peak alone its floor would tint the whole image.
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    return ((cam - low) / (high - low + 1e-7)).cpu(), output_probabilities(logits.detach(), is_multi_label(model)).cpu()


def explained_module(model: ResNet, method: str, layer: str | None) -> torch.nn.Module:
    """The module `layer` names (default: the last stage), once `method` is known; else a one-line error."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")
    name = layer or default_layer(model)
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"--layer {name!r}: no such module; try one of {model.stage_names} "
                          f"or a name from `model.named_modules()`") from None


def weighted_activations(activation: torch.Tensor, gradient: torch.Tensor, method: str) -> torch.Tensor:
    """The layer's activations A (N x C x H x W) weighed by the class score's gradient g, per `method`, and
    summed over the channels: N x 1 x H x W, before the positive part is kept."""
    positions = (2, 3)
    if method == "gradcam":  # each channel by its mean gradient
        weights = gradient.mean(dim=positions, keepdim=True)
    elif method == "gradcam++":  # closed form for an exponential of the score (Chattopadhay et al., eq. 19)
        g2, g3 = gradient.pow(2), gradient.pow(3)
        denominator = 2 * g2 + activation.sum(dim=positions, keepdim=True) * g3
        alpha = torch.where(gradient != 0, g2 / torch.where(denominator != 0, denominator, torch.ones_like(g2)), 0)
        weights = (alpha * gradient.clamp_min(0)).sum(dim=positions, keepdim=True)
    elif method == "xgradcam":  # Fu et al. 2020: each channel by its gradient averaged over its activation
        total = activation.sum(dim=positions, keepdim=True)
        weights = (gradient * activation).sum(dim=positions, keepdim=True) / torch.where(total != 0, total, 1)
    elif method == "layercam":  # Jiang et al. 2021: each position by its own positive gradient
        weights = gradient.clamp_min(0)
    else:  # hirescam (Draelos & Carin 2020): each position by its own gradient, not the channel's mean of them
        weights = gradient
    return (weights * activation).sum(1, keepdim=True)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, size: int | None = None) -> np.ndarray:
    """The image with the heatmap blended in (jet colours), enlarged to `size` (default: at least 224 px)."""
    size = size or max(DISPLAY_SIZE, image.shape[0])
    scale = lambda a: F.interpolate(  # noqa: E731
        torch.as_tensor(a, dtype=torch.float32).permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
        align_corners=False)[0].permute(1, 2, 0).numpy()
    return blended(scale(image.astype(np.float32)), scale(heatmap[..., None])[..., 0], alpha)


def blended(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """H x W x 3 pixels (0-255) with an H x W heatmap (0-1) blended in, in jet colours, as uint8."""
    # The colour matplotlib's 256-colour map gives each value, looked up in its table directly: the map's own
    # call works in float64 RGBA and took half of each frame's overlay on 720p video.
    colours = jet_table()[np.minimum((np.clip(heatmap, 0, 1) * JET_COLOURS).astype(np.int64), JET_COLOURS - 1)]
    return np.clip((1 - alpha) * pixels + alpha * colours, 0, 255).astype(np.uint8)


JET_COLOURS = 256


@functools.cache
def jet_table() -> np.ndarray:
    """matplotlib's jet colour map as a table: JET_COLOURS x 3, float32, 0-255."""
    return (colour_map("jet").resampled(JET_COLOURS)(np.arange(JET_COLOURS))[:, :3] * 255).astype(np.float32)


def save_explanation(explanation: Explanation, path: Path, method: str) -> None:
    """Two panels, the input and its overlay, titled with the class explained."""
    figure = new_figure(figsize=(6.4, 3.4))
    axes = figure.subplots(1, 2)
    axes[0].imshow(explanation.image)
    axes[0].set_title(Path(explanation.source).name, fontsize=9)
    axes[1].imshow(overlay(explanation.image, explanation.heatmap))
    predicted = "" if explanation.predicted else " (not predicted)"
    axes[1].set_title(f"{method}: {explanation.class_name} p={explanation.probability:.3f}{predicted}", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    save_png(figure, path, dpi=100)


def output_names(items: list, method: str) -> list[str]:
    """NAME.METHOD.png per item; where names repeat (class folders), the path below their common folder."""
    stems = [Path(item).stem if isinstance(item, Path) else f"image{index}" for index, item in enumerate(items)]
    if len(set(stems)) < len(stems):
        paths = [item for item in items if isinstance(item, Path)]
        root = Path(os.path.commonpath([p.resolve().parent for p in paths])) if paths else Path()
        stems = ["-".join(item.resolve().with_suffix("").relative_to(root).parts) if isinstance(item, Path)
                 else f"image{index}" for index, item in enumerate(items)]
    return [f"{stem}.{method}.png" for stem in stems]


def iter_explain(model: ResNet, items: list, method: str = "gradcam", target: int | str | None = None,
                 layer: str | None = None, out_dir: str | Path | None = None, batch_size: int = 16,
                 failed: list[str] | None = None, progress: bool = False) -> Iterator[Explanation]:
    """Explanations of `items` in order; with `out_dir`, each overlay is written as NAME.METHOD.png.

    Without `target` the predicted class is explained; for a multi-label model every class it predicts (at
    its threshold; the most likely one where it predicts none), each written as NAME.CLASS.METHOD.png."""
    pre = model.preprocessing
    names = class_names_of(model)
    target_id = resolve_target(model, target)
    thresholds = class_thresholds(model) if is_multi_label(model) else None
    each_present = thresholds is not None and target_id is None
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        file_names = output_names(items, method)
    device = model_device(model)
    with progress_bar("explaining", progress) as bar:
        task = bar.add_task("explain", total=len(items))
        for batch in inference_batches(items, pre.resize_size, pre.input_size, pre.interpolation, batch_size):
            if failed is not None:
                failed += [message for _, message in batch.failed]
            if batch.images is not None:
                x = normalize(batch.images.to(device).float() / 255, pre)
                targets = None if target_id is None else [target_id] * len(x)
                heatmaps, probs = grad_cam(model, x, targets, layer, method)
                rows = [(row, int(probs[row].argmax()) if target_id is None else target_id) for row in range(len(x))]
                if each_present:  # one heatmap per class present, in one more pass over those images
                    rows = [(row, class_id) for row in range(len(x))
                            for class_id in present_ids(probs[row], thresholds)]
                    heatmaps, _ = grad_cam(model, x[[row for row, _ in rows]], [c for _, c in rows], layer, method)
                for heatmap, (row, class_id) in zip(heatmaps, rows):
                    index = batch.indices[row]
                    probability = float(probs[row, class_id])
                    explanation = Explanation(source_name(items[index], index), class_id, names[class_id], probability,
                                              int(probs[row].argmax()), heatmap.numpy(),
                                              batch.images[row].permute(1, 2, 0).numpy(),
                                              predicted=(probability >= thresholds[class_id] if thresholds is not None
                                                         else class_id == int(probs[row].argmax())))
                    if out is not None:
                        name = file_names[index]
                        explanation.path = out / (name.replace(f".{method}.png", f".{names[class_id]}.{method}.png")
                                                  if each_present else name)
                        save_explanation(explanation, explanation.path, method)
                    yield explanation
            bar.advance(task, len(batch.indices) + len(batch.failed))


def present_ids(probs: torch.Tensor, thresholds: np.ndarray) -> list[int]:
    """A multi-label image's classes at or above their thresholds, most likely first; the most likely alone if none."""
    ranked = torch.argsort(probs, descending=True).tolist()
    return [c for c in ranked if probs[c] >= thresholds[c]] or ranked[:1]


def explain(model: ResNet, images, method: str = "gradcam", target: int | str | None = None,
            layer: str | None = None, out_dir: str | Path | None = None, batch_size: int = 16,
            progress: bool = False) -> ExplainResult:
    """Heatmaps for images (paths, folders, PIL images, arrays); overlays written to `out_dir` if given."""
    items = input_images(images if isinstance(images, (list, tuple)) else [images])
    failed: list[str] = []
    explanations = list(iter_explain(model, items, method, target, layer, out_dir, batch_size, failed, progress))
    return ExplainResult(explanations, failed)
