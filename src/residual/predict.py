"""Class predictions for images: `predict`, and the Keras-style helpers around it.

`predict(model, images)` reads files, folders, PIL images or arrays, prepares
them with the preprocessing stored in the model, runs them in batches and
returns the top-k classes of each. `iter_predict` does the same as a stream, so
a folder of any size is predicted with bounded memory. An unreadable file gets
a one-line reason in `failed`; every other file is still predicted.

`compile=True` runs the model under torch.compile (one graph for the whole stream,
models.compile_for_inference); `compile=None` chooses by the job's size, as training
does by its length (`inference_compile`).

A multi-label model (one sigmoid per class) gives each class its own probability; its
prediction is every class whose probability reaches the model's threshold (`present`),
possibly none, beside the top-k.

`preprocess_input` and `decode_predictions` mirror keras.applications: the
first turns RGB images into model input, the second turns scores into
(class_id, class_name, score) rows, with the ImageNet names for 1000-class
models that carry no names of their own.
"""

from __future__ import annotations

import contextlib
import csv
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F

from .data.datasets import ListedImage, input_images
from .data.decode import as_image
from .data.loaders import InferenceBatch, check_stream, inference_batches
from .data.transforms import normalize, resize_center_crop
from .errors import ConfigError
from .feature_bank import FeatureBank
from .models import Preprocessing, ResNet, compile_for_inference
from .progress import progress_bar
from .runs import compile_repays
from .weights import imagenet_class_names

TTA_MODES = ("none", "flip", "flip-shift", "ten-crop")


@dataclass
class Prediction:
    source: str  # the file, or "#N" for the N-th in-memory image
    top: list[tuple[int, str, float]]  # (class_id, class_name, probability), most likely first
    # A multi-label model's answer: the classes whose probability reaches its threshold, most likely first
    # (None for a single-label model, whose answer is top[0]).
    present: list[tuple[int, str, float]] | None = None
    # With a confidence floor (min_confidence) or a feature bank: whether the top class's probability or the
    # similarity to the nearest training image fell below its floor, so the image gets no class (most likely
    # it shows none of them); None with neither.
    unsure: bool | None = None
    similarity: float | None = None  # with a feature bank: to the nearest training image (FeatureBank)

    def answer(self) -> list[str]:
        """The predicted class names: the top-1 (none when unsure), or a multi-label model's present classes
        (maybe none)."""
        if self.unsure:
            return []
        return [self.top[0][1]] if self.present is None else [name for _, name, _ in self.present]


@dataclass
class PredictResult:
    predictions: list[Prediction]
    failed: list[str] = field(default_factory=list)  # one line per input that could not be read


def class_names_of(model) -> list[str]:
    """The model's class names; ImageNet's for an unnamed 1000-class model; else the class indices."""
    if model.class_names:
        return list(model.class_names)
    if model.num_classes == 1000:
        return imagenet_class_names()
    return [str(index) for index in range(model.num_classes)]


def is_multi_label(model) -> bool:
    """Whether `model` scores each class on its own (one sigmoid per class) instead of one softmax over them."""
    return bool(getattr(model, "multi_label", False))


def output_probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Logits -> probabilities: one sigmoid per class for a multi-label model, else the softmax over classes."""
    return logits.float().sigmoid() if multi_label else logits.float().softmax(1)


def is_unsure(probability: float, similarity: float | None, min_confidence: float | None,
              feature_bank: FeatureBank | None) -> bool | None:
    """Whether an answer falls below a floor asked for (None with no floor): its top class's `probability`
    below `min_confidence`, or its `similarity` to the nearest training image below the bank's floor."""
    if min_confidence is None and feature_bank is None:
        return None
    return ((min_confidence is not None and probability < min_confidence)
            or (feature_bank is not None and similarity < feature_bank.floor))


def check_min_confidence(min_confidence: float | None, multi_label: bool) -> None:
    """A confidence floor is a probability, and only for a single-label model (a multi-label model already
    answers with no class where none reaches its threshold)."""
    if min_confidence is None:
        return
    if not 0 < min_confidence < 1:
        raise ConfigError(f"--min-confidence is a probability: between 0 and 1, got {min_confidence:g}")
    if multi_label:
        raise ConfigError("--min-confidence: a multi-label model answers with the classes whose probability reaches "
                          "their thresholds, and with none where none does; raise those instead (--threshold, or "
                          "`residual thresholds`)")


def model_device(model) -> torch.device:
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def check_tta(mode: str) -> None:
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta must be one of {TTA_MODES}, got {mode!r}")


def tta_image_size(preprocessing: Preprocessing, mode: str) -> int:
    """The side of the images the TTA views are taken from: the model's input size, or for ten-crop the
    whole resized square the crops are cut from (AlexNet's and ResNet's 10-crop testing: 224 px crops of
    the central 256 x 256)."""
    check_tta(mode)
    if mode != "ten-crop":
        return preprocessing.input_size
    if preprocessing.resize_size <= preprocessing.input_size:
        raise ConfigError(f"--tta ten-crop cuts {preprocessing.input_size} px crops from the image resized to "
                          f"{preprocessing.resize_size} px, which leaves no room between them; use --tta flip-shift")
    return preprocessing.resize_size


def tta_views(x: torch.Tensor, mode: str, size: int | None = None) -> list[torch.Tensor]:
    """The test-time views of a normalised batch: itself, its mirror, and with flip-shift four shifts of each;
    with ten-crop the four corner and the centre `size` x `size` crops of the (larger) batch, and their mirrors."""
    check_tta(mode)
    if mode == "ten-crop":
        height, width = x.shape[-2:]
        size = size or min(height, width)
        corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
                   ((height - size) // 2, (width - size) // 2)]
        crops = [x[..., top:top + size, left:left + size] for top, left in corners]
        return crops + [crop.flip(3) for crop in crops]
    views = [x] if mode == "none" else [x, x.flip(3)]
    if mode == "flip-shift":
        shift = max(1, x.shape[-1] // 16)
        padded = [F.pad(view, (shift,) * 4, mode="replicate") for view in views]
        size_h, size_w = x.shape[-2:]
        for view in padded:
            for dy, dx in ((0, 0), (0, 2), (2, 0), (2, 2)):  # one shift towards each corner
                views.append(view[..., dy * shift:dy * shift + size_h, dx * shift:dx * shift + size_w])
    return views


@torch.inference_mode()
def class_probabilities(model, images: torch.Tensor, tta: str = "none", multi_label: bool = False) -> torch.Tensor:
    """uint8 N x 3 x H x W images -> N x classes probabilities (`multi_label`: each class's own sigmoid),
    averaged over the TTA views, on the model's device (asking for them does not wait for a GPU to compute
    them)."""
    x = normalize(images.to(model_device(model)).float() / 255, model.preprocessing)
    views = tta_views(x, tta, model.preprocessing.input_size)
    return torch.stack([output_probabilities(model(view), multi_label) for view in views]).mean(0)


@contextlib.contextmanager
def collected_features(model) -> Iterator[list[torch.Tensor]]:
    """A list that gets, per call of `model` meanwhile, the pooled features its classifier layer takes: by a
    hook on a ResNet's fc (run eagerly), or from an exported model's features output."""
    if not isinstance(model, torch.nn.Module):
        with model.collecting_features() as pooled:
            yield pooled
        return
    pooled: list[torch.Tensor] = []
    # Only this thread's calls: threads sharing the model (a web app's pool) run the hooks of each other's calls.
    collector = threading.get_ident()

    def collect(_module, args):
        if threading.get_ident() == collector:
            pooled.append(args[0].float())

    hook = model.fc.register_forward_pre_hook(collect)
    try:
        yield pooled
    finally:
        hook.remove()


@torch.inference_mode()
def probabilities_and_features(model, images: torch.Tensor, tta: str = "none",
                               multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """class_probabilities, and the pooled features the classifier layer took, averaged over the TTA views as
    the probabilities are (what a FeatureBank compares)."""
    with collected_features(model) as pooled:
        probabilities = class_probabilities(model, images, tta, multi_label)
    return probabilities, torch.stack(pooled).mean(0)


def probabilities_in_flight(model, batches: Iterable[InferenceBatch], tta: str = "none", multi_label: bool = False,
                            features: bool = False, ahead: bool = True
                            ) -> Iterator[tuple[InferenceBatch, torch.Tensor | None, torch.Tensor | None]]:
    """Each batch with its class probabilities on the host (None where none of its images could be read), and
    with `features` its pooled features (probabilities_and_features; else None), one batch behind the
    device: the next batch is queued on the device before the host waits for this one's answers, so a GPU
    does not sit idle while the host copies them back and writes their rows. Not `ahead`: each batch's answers
    as soon as they are computed (a live stream's, which should not wait for the next frames)."""
    pending = None
    for batch in batches:
        if batch.images is None:
            scores = None, None
        elif features:
            scores = probabilities_and_features(model, batch.images, tta, multi_label)
        else:
            scores = class_probabilities(model, batch.images, tta, multi_label), None
        if pending is not None:
            yield on_host(*pending)
        pending = batch, *scores
        if not ahead:
            yield on_host(*pending)
            pending = None
    if pending is not None:
        yield on_host(*pending)


def on_host(batch: InferenceBatch, *tensors: torch.Tensor | None) -> tuple:
    return batch, *(None if tensor is None else tensor.cpu() for tensor in tensors)


def top_classes(probs: torch.Tensor, names: list[str], k: int) -> list[list[tuple[int, str, float]]]:
    scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(int(i), names[int(i)], float(s)) for s, i in zip(row_scores, row_indices)]
            for row_scores, row_indices in zip(scores, indices)]


def present_classes(probs: torch.Tensor, names: list[str],
                    threshold: float | list[float] | np.ndarray) -> list[list[tuple[int, str, float]]]:
    """Per image, every class whose (multi-label) probability reaches `threshold` (one for all, or each class's
    own), most likely first."""
    limits = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(names),))
    return [[row for row in ranked if row[2] >= limits[row[0]]] for ranked in top_classes(probs, names, len(names))]


def class_thresholds(model) -> np.ndarray:
    """A multi-label model's threshold for each class: its one threshold, or the per-class ones `residual
    thresholds` chose."""
    return np.broadcast_to(np.asarray(model.threshold, dtype=np.float64), (model.num_classes,))


# torch.compile repays its warm-up from about this many images (an estimate, not yet measured on a GPU):
# the speed issue's torchvision figures save 1/15,507 - 1/23,992 s per ResNet-50 image compiled in bf16,
# and compiling it for inference took 53 s on the CPU (docs/BENCHMARKS.md), so about 2.3 million images.
INFERENCE_COMPILE_FROM_IMAGES = 2_000_000


def inference_compile(model, requested: bool | None, images: int) -> tuple[bool, str]:
    """Whether a job of `images` images runs under torch.compile, and why: as asked, or with None chosen
    by the job's size on CUDA. An exported model has nothing to compile."""
    if not isinstance(model, torch.nn.Module):
        if requested:
            raise ConfigError("--compile: an exported model runs in its own runtime (ONNX Runtime), which "
                              "optimises it already; leave --compile out")
        return False, "off (an exported model runs in its own runtime)"
    if requested is not None:
        return requested, "on (as asked)" if requested else "off (as asked)"
    return compile_repays(model_device(model).type, images, INFERENCE_COMPILE_FROM_IMAGES, "images")


def inference_forward(model, compiled: bool, batch_size: int):
    """What computes the logits: the model, or the model compiled for batches of `batch_size`."""
    return compile_for_inference(model, batch_size) if compiled else model


def iter_predict(model, items: list, topk: int = 5, batch_size: int = 64, tta: str = "none",
                 workers: int | None = None, failed: list[str] | None = None, progress: bool = False,
                 decoder: str = "pillow", compile: bool | None = None, min_confidence: float | None = None,
                 feature_bank: FeatureBank | None = None) -> Iterator[Prediction]:
    """Predictions for `items` in order, as they are computed; unreadable items go to `failed`.

    The arguments are checked here, before the first prediction is asked for, so that a writer has
    written nothing when one is wrong. `decoder`: 'torchvision' decodes JPEG files on the model's device.
    `compile`: torch.compile on, off, or None to choose by the number of items (`inference_compile`).
    `min_confidence`: an image whose top class has a lower probability gets no class (`Prediction.unsure`);
    `feature_bank`: so does one less similar to the nearest training image than the bank's floor.
    """
    if topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {topk}")
    check_min_confidence(min_confidence, is_multi_label(model))
    if feature_bank is not None:
        feature_bank.check_model(model)
        if compile:
            raise ConfigError("--feature-bank reads the features of the model run eagerly; leave --compile out")
        compile = False
    tta_image_size(model.preprocessing, tta)
    check_stream(batch_size, workers, decoder, model_device(model))
    if isinstance(model, torch.nn.Module):
        model.eval()
    forward = inference_forward(model, inference_compile(model, compile, len(items))[0], batch_size)
    return _predictions(model, forward, items, topk, batch_size, tta, workers, failed, progress, decoder,
                        min_confidence, feature_bank)


def _predictions(model, forward, items: list, topk: int, batch_size: int, tta: str, workers: int | None,
                 failed: list[str] | None, progress: bool, decoder: str, min_confidence: float | None,
                 feature_bank: FeatureBank | None) -> Iterator[Prediction]:
    pre: Preprocessing = model.preprocessing
    with progress_bar("predicting", progress) as bar:
        task = bar.add_task("predict", total=len(items))
        batches = inference_batches(items, pre.resize_size, tta_image_size(pre, tta), pre.interpolation, batch_size,
                                    workers, decoder, model_device(model))
        for batch, probabilities, features in probabilities_in_flight(forward, batches, tta, is_multi_label(model),
                                                                      features=feature_bank is not None):
            if failed is not None:
                failed += [message for _, message in batch.failed]
            if probabilities is not None:
                yield from batch_predictions(model, [source_name(items[index], index) for index in batch.indices],
                                             probabilities, features, topk, min_confidence, feature_bank)
            bar.advance(task, len(batch.indices) + len(batch.failed))


def batch_predictions(model, sources: list[str], probabilities: torch.Tensor, features: torch.Tensor | None,
                      topk: int, min_confidence: float | None = None,
                      feature_bank: FeatureBank | None = None) -> list[Prediction]:
    """A batch's Predictions from its class probabilities (and, with `feature_bank`, its pooled features): the
    top-`topk` classes, a multi-label model's present ones, and whether each falls below a floor asked for."""
    names = class_names_of(model)
    present = (present_classes(probabilities, names, model.threshold) if is_multi_label(model)
               else [None] * len(sources))
    similarities = (feature_bank.similarity(features).tolist() if feature_bank is not None
                    else [None] * len(sources))
    return [Prediction(source, top, labels, is_unsure(top[0][2], similarity, min_confidence, feature_bank), similarity)
            for source, top, labels, similarity in zip(sources, top_classes(probabilities, names, topk), present,
                                                       similarities)]


def predict(model, images, topk: int = 5, batch_size: int = 64, tta: str = "none",
            progress: bool = False, decoder: str = "pillow", compile: bool | None = None,
            min_confidence: float | None = None, feature_bank: FeatureBank | None = None) -> PredictResult:
    """Top-`topk` classes of each image. `images`: a path, a folder, a PIL image, an array, or a list of them.
    `min_confidence`: below it, an image gets no class (its `unsure` is True); so below `feature_bank`'s floor
    of similarity to the nearest training image."""
    items = input_images(images if isinstance(images, (list, tuple)) else [images])
    failed: list[str] = []
    predictions = list(iter_predict(model, items, topk, batch_size, tta, failed=failed, progress=progress,
                                    decoder=decoder, compile=compile, min_confidence=min_confidence,
                                    feature_bank=feature_bank))
    return PredictResult(predictions, failed)


def source_name(item, index: int) -> str:
    """How results name an input: as the CSV listing it names it (its cell), by its path, or "#N" for the
    N-th in-memory image."""
    if isinstance(item, ListedImage) and item.listed_as is not None:
        return item.listed_as
    return str(item) if isinstance(item, Path) else f"#{index}"


def output_columns(items: list) -> tuple[str, str]:
    """The headers of the image and the class column of a CSV of predictions: the listing's own where every
    image came from listings with the same columns (so predicting a Kaggle test set's sample submission
    writes a submission), else image and label."""
    columns = {(item.image_column, item.label_column or "label") if isinstance(item, ListedImage)
               else ("image", "label") for item in items}
    return columns.pop() if len(columns) == 1 else ("image", "label")


def write_csv(predictions: Iterator[Prediction], stream: TextIO, image_column: str = "image",
              multi_label: bool = False, floor: bool = False, similarity: bool = False) -> int:
    """One row per image and rank (image, rank, class_id, class_name, probability), written as they come;
    `multi_label`: and whether the class is present (its probability reaches the model's threshold);
    `floor` (predicted with a confidence floor): and whether the image is unsure (it gets no class);
    `similarity` (predicted with a feature bank): and the image's similarity to the nearest training image."""
    writer = csv.writer(stream)
    writer.writerow([image_column, "rank", "class_id", "class_name", "probability"] + ["present"] * multi_label
                    + ["unsure"] * floor + ["similarity"] * similarity)
    count = 0
    for count, prediction in enumerate(predictions, 1):
        present = {class_id for class_id, _, _ in prediction.present or ()}
        per_image = ([int(bool(prediction.unsure))] * floor
                     + [f"{prediction.similarity:.6f}" if prediction.similarity is not None else ""] * similarity)
        writer.writerows([prediction.source, rank, *row[:2], f"{row[2]:.6f}"]
                         + [int(row[0] in present)] * multi_label + per_image
                         for rank, row in enumerate(prediction.top, 1))
    return count


def write_labels(predictions: Iterator[Prediction], stream: TextIO,
                 columns: tuple[str, str] = ("image", "label")) -> int:
    """One row per image: the image and the name of its most likely class (empty where it is unsure), or a
    multi-label model's present classes separated by spaces (as a multi-label CSV lists them), under the
    `columns` headers."""
    writer = csv.writer(stream)
    writer.writerow(columns)
    count = 0
    for count, prediction in enumerate(predictions, 1):
        writer.writerow([prediction.source, " ".join(prediction.answer())])
    return count


def write_probabilities(predictions: Iterator[Prediction], stream: TextIO, names: list[str],
                        image_column: str = "image") -> int:
    """One row per image (image, then each class's probability in a column named after it, in the model's
    class order), written as they come: the predictions must hold every class (topk = the class count)."""
    writer = csv.writer(stream)
    writer.writerow([image_column, *names])
    count = 0
    for count, prediction in enumerate(predictions, 1):
        by_class = {class_id: probability for class_id, _, probability in prediction.top}
        writer.writerow([prediction.source, *(f"{by_class[class_id]:.6f}" for class_id in range(len(names)))])
    return count


def json_row(prediction: Prediction, image_key: str = "image") -> dict:
    """{"image" (`image_key`), "top": [{"class_id", "class_name", "probability"}]}; a multi-label model's also
    has "labels": the present classes' names; with a floor, "unsure": whether the image got no class; with a
    feature bank, "similarity": to the nearest training image."""
    top = [{"class_id": i, "class_name": name, "probability": round(p, 6)} for i, name, p in prediction.top]
    row = {image_key: prediction.source, "top": top}
    if prediction.present is not None:
        row["labels"] = prediction.answer()
    if prediction.unsure is not None:
        row["unsure"] = prediction.unsure
    if prediction.similarity is not None:
        row["similarity"] = round(prediction.similarity, 6)
    return row


def write_json(predictions: Iterator[Prediction], stream: TextIO, image_key: str = "image") -> int:
    """A JSON array of `json_row`s, each written and flushed as it comes."""
    stream.write("[")
    count = 0
    for count, prediction in enumerate(predictions, 1):
        stream.write(("\n  " if count == 1 else ",\n  ") + json.dumps(json_row(prediction, image_key)))
        stream.flush()  # a live stream's rows are read as they come, not when the next row ends the line
    stream.write("\n]\n")
    return count


def write_json_lines(predictions: Iterator[Prediction], stream: TextIO, image_key: str = "image") -> int:
    """JSON Lines: a `json_row` per line, each written and flushed as it comes; what `jq -c`, `tail -f` and log
    shippers read a line at a time, and a live stream's output that is whole at every line (an array is closed
    only at the end)."""
    count = 0
    for count, prediction in enumerate(predictions, 1):
        stream.write(json.dumps(json_row(prediction, image_key)) + "\n")
        stream.flush()
    return count


def preprocess_input(images, preprocessing: Preprocessing | ResNet | None = None) -> torch.Tensor:
    """RGB images -> the normalised N x 3 x H x W float batch a model takes.

    `images`: PIL images or paths (resized and center-cropped as the preprocessing says), or an
    N x H x W x 3 / H x W x 3 array of 0-255 values (used at its own size), as Keras takes them.
    `preprocessing`: a Preprocessing, a model (its own), or None for ImageNet's.
    """
    pre = preprocessing.preprocessing if isinstance(preprocessing, ResNet) else preprocessing or Preprocessing()
    if isinstance(images, (np.ndarray, torch.Tensor)):
        array = torch.as_tensor(np.asarray(images, dtype=np.float32))
        batch = (array[None] if array.ndim == 3 else array).permute(0, 3, 1, 2)
        return normalize(batch / 255, pre)
    items = images if isinstance(images, (list, tuple)) else [images]
    batch = torch.stack([resize_center_crop(as_image(item, pre.resize_size), pre.resize_size, pre.input_size,
                                            pre.interpolation)
                         for item in items])
    return normalize(batch.float() / 255, pre)


def decode_predictions(preds, top: int = 5,
                       class_names: list[str] | ResNet | None = None) -> list[list[tuple[int, str, float]]]:
    """Per image, the `top` (class_id, class_name, score) rows, best first.

    `preds`: a model's output (a tensor, also one that requires grad) or an array. Rows that are not
    already probability distributions (logits) are soft-maxed first; with a multi-label model as
    `class_names`, they are its logits, each through its class's sigmoid. `class_names`: a list, or a
    model (its own); without them, 1000-column scores get the ImageNet names and others their index.
    """
    multi_label = is_multi_label(class_names)  # a multi-label model's scores are each class's own sigmoid
    if isinstance(class_names, ResNet):
        class_names = class_names_of(class_names)
    if isinstance(preds, torch.Tensor):  # model(x) outside torch.no_grad() carries its graph
        scores = preds.detach().float().cpu()
    else:
        scores = torch.as_tensor(np.asarray(preds, dtype=np.float32))
    scores = scores[None] if scores.ndim == 1 else scores
    is_distribution = bool((scores >= 0).all()) and torch.allclose(scores.sum(1), torch.ones(len(scores)), atol=1e-3)
    probs = output_probabilities(scores, multi_label) if multi_label or not is_distribution else scores
    if class_names is None:
        class_names = imagenet_class_names() if scores.shape[1] == 1000 else [str(i) for i in range(scores.shape[1])]
    if len(class_names) != scores.shape[1]:
        raise ConfigError(f"{len(class_names)} class names for {scores.shape[1]} scores per image")
    return top_classes(probs, class_names, top)
