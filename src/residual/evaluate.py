"""`evaluate`: how good a model is on a labelled dataset, and where it fails.

It streams the split through the model (optionally with test-time augmentation),
keeps only the class probabilities, computes the metrics of metrics.py, finds
the highest-loss images and explains them with Grad-CAM, and writes the report
of report.py. Unreadable images are skipped and listed, never silently dropped.
Frames `residual unpack` took from video clips are also scored per clip, as a
video is classified: each clip by its frames' probabilities averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .data.clips import clip_of
from .data.datasets import Dataset, DatasetError, Split, concat_splits, open_dataset
from .data.decode import image_files
from .data.loaders import check_stream, inference_batches
from .data.transforms import normalize
from .explain import grad_cam
from .feature_bank import FeatureBank
from .metrics import (KNOWN_KEPT, classification_metrics, hardest_pr_curves, hardest_roc_curves, image_losses,
                      label_losses, multi_label_metrics, topk_accuracy, unknown_detection, wilson_interval)
from .models import ResNet
from .predict import (class_names_of, class_thresholds, inference_compile, inference_forward, is_multi_label,
                      model_device, probabilities_in_flight, tta_image_size)
from .progress import progress_bar
from .report import (GalleryItem, write_multi_label_predictions, write_multi_label_report, write_predictions,
                     write_report)
from .weights import training_config

SPLIT_CHOICES = ("train", "val", "test", "all")
# The nearest-neighbour score of unknown images: the k-th most similar of at most this many training images'
# features (Sun et al. 2022 keep a random share of a large training set).
BANK_IMAGES = 10_000
CLIPS_LISTED = 30  # the clips answered wrong that the report and metrics.json list (clips.csv has every clip)
NEAREST_K = 1


@dataclass
class ClipScores:
    """The frames of each video clip evaluated, taken together: a clip's probabilities are its frames' mean."""
    names: list[str]  # the clip each row stands for (its folder and name, as data.clips.clip_of gives it)
    probs: np.ndarray  # clips x classes
    labels: np.ndarray  # each clip's class (its frames')
    frames: np.ndarray  # how many of its frames were evaluated

    @classmethod
    def of(cls, sources: list[str], probs: np.ndarray, labels: np.ndarray) -> ClipScores | None:
        """The clips of frames named as `residual unpack` names them (<clip>.t=SECONDS.jpg); None unless every
        image is such a frame and each clip's frames have one label."""
        clips = [clip_of(source) for source in sources]
        if not clips or None in clips:
            return None
        names = list(dict.fromkeys(clips))
        row = {name: index for index, name in enumerate(names)}
        group = np.array([row[clip] for clip in clips])
        frames = np.bincount(group, minlength=len(names))
        sums = np.zeros((len(names), probs.shape[1]), dtype=np.float64)
        np.add.at(sums, group, probs)
        clip_labels = np.zeros(len(names), dtype=labels.dtype)
        clip_labels[group] = labels
        if (clip_labels[group] != labels).any():  # not a clip's frames, however they are named
            return None
        return cls(names, (sums / frames[:, None]).astype(np.float32), clip_labels, frames)

    def metrics(self, class_names: list[str]) -> dict:
        """Top-1 and top-5 over the clips, top-1's 95% interval (clips, not frames, are the trials), and the
        clips answered wrong, the surest first (at most CLIPS_LISTED)."""
        predicted = self.probs.argmax(1)
        wrong = np.flatnonzero(predicted != self.labels)
        right = len(self.names) - len(wrong)
        wrong = wrong[np.argsort(-self.probs[wrong, predicted[wrong]], kind="stable")][:CLIPS_LISTED]
        return {"clips": len(self.names), "frames": int(self.frames.sum()), "top1": right / len(self.names),
                "top1_ci95": list(wilson_interval(right, len(self.names))),
                "top5": topk_accuracy(self.probs, self.labels, 5),
                "answered_wrong": [{"clip": self.names[i], "true": class_names[self.labels[i]],
                                    "predicted": class_names[predicted[i]],
                                    "probability": float(self.probs[i, predicted[i]]), "frames": int(self.frames[i])}
                                   for i in wrong]}


@dataclass
class EvalResult:
    metrics: dict
    probs: np.ndarray  # N x classes, one row per readable image (a multi-label model's: each class's own)
    labels: np.ndarray  # N true class indices (the model's numbering), or N x classes 0/1 for multi-label
    sources: list[str]  # the image of each row
    failed: list[str] = field(default_factory=list)
    gallery: list[GalleryItem] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # what was written (metrics, pictures, report)
    compiled: str = "off"  # whether torch.compile ran, and why
    split: str = ""  # the split evaluated (train, val, test or all)
    thresholds: np.ndarray | None = None  # a multi-label model's per class (None: single-label)
    unknown_probs: np.ndarray | None = None  # with `unknown`: its readable images' probabilities, one row each
    unknown_sources: list[str] = field(default_factory=list)
    # With unknown images and the PyTorch model: each known and unknown image's similarity to the training images
    known_similarity: np.ndarray | None = None
    unknown_similarity: np.ndarray | None = None
    bank: FeatureBank | None = None  # the training images' features those were measured with, and the floor
    clips: ClipScores | None = None  # where every image is a frame of an unpacked clip (single-label models)

    @property
    def score_name(self) -> str:
        """What a model is judged by on these images: its top-1, or a multi-label model's mAP."""
        return "top1" if self.thresholds is None else "map"

    def score(self) -> float:
        """Top-1, or mAP (0 where undefined: no class has both positive and negative images)."""
        return self.metrics[self.score_name] or 0.0

    def answers(self) -> np.ndarray:
        """Each image's answer: its top class, or a multi-label model's 0/1 row of the classes it predicts."""
        return self.probs.argmax(1) if self.thresholds is None else self.probs >= self.thresholds

    def right(self) -> np.ndarray:
        """Per image, whether the answer was right: its top-1, or every one of its labels (exact match)."""
        answers = self.answers()
        return answers == self.labels if self.thresholds is None else (answers == self.labels.astype(bool)).all(1)

    def score_groups(self) -> dict[str, tuple[dict[str, np.ndarray], float]] | None:
        """With unknown images: per score (the top class's probability; the similarity to the nearest training
        image where measured), its values for the known images answered right, those answered wrong and the
        unknown images, and its floor. None without unknown images."""
        if self.unknown_probs is None:
            return None
        right = self.right()
        split = lambda known, unknown: {"known, answered right": known[right],  # noqa: E731
                                        "known, answered wrong": known[~right], "unknown": unknown}
        unknown = self.metrics["unknown"]
        groups = {"probability of the top class": (split(self.probs.max(1), self.unknown_probs.max(1)),
                                                   unknown["floor"])}
        if self.known_similarity is not None:
            groups["similarity to the nearest training image"] = (
                split(self.known_similarity, self.unknown_similarity), unknown["nearest"]["floor"])
        return groups


def pick_split(dataset: Dataset, split: str | None) -> tuple[str, Split]:
    """The split to evaluate: as asked, or test if there is one, else val; a flat class folder is used whole."""
    if split is None:
        split = "test" if dataset.test is not None else "all" if dataset.flat else "val"
    if split not in SPLIT_CHOICES:
        raise DatasetError(f"--split must be one of {SPLIT_CHOICES}, got {split!r}")
    if split == "all":
        return split, concat_splits([s for s in (dataset.train, dataset.val, dataset.test) if s is not None])
    chosen = getattr(dataset, split)
    if chosen is None or len(chosen) == 0:
        present = [name for name in ("train", "val", "test") if getattr(dataset, name)]
        raise DatasetError(f"{dataset.root}: no {split} split; choose --split from {', '.join(present)} or all")
    return split, chosen


def model_labels(dataset: Dataset, split: Split, model) -> np.ndarray:
    """The split's labels renumbered into the model's classes, matched by name: class indices, or for a
    multi-label model rows of 0/1 per class of the model (single-label data then has one class per row)."""
    names = class_names_of(model)
    unknown = [name for name in dataset.classes if name not in names]
    if unknown:
        raise DatasetError(f"{dataset.root}: classes {unknown[:5]} are not classes of the model "
                           f"(it knows {len(names)}: {', '.join(names[:5])}, ...); the class folders must be "
                           f"named as the model's classes")
    if dataset.multi_label and not is_multi_label(model):
        raise DatasetError(f"{dataset.root} is multi-label (any number of classes per image), and the model "
                           f"predicts one class per image; evaluate a model trained on multi-label data")
    mapping = np.array([names.index(name) for name in dataset.classes], dtype=np.int64)
    labels = np.asarray(split.labels, dtype=np.int64)
    if not is_multi_label(model):
        return mapping[labels]
    targets = np.zeros((len(labels), len(names)), dtype=np.int64)
    if dataset.multi_label:
        targets[:, mapping] = labels.reshape(len(labels), len(dataset.classes))
    else:
        targets[np.arange(len(labels)), mapping[labels]] = 1
    return targets


def training_split(model_file: str | Path, data: str | Path) -> tuple[float | None, int] | None:
    """(--val-split, seed) of the model's training run, when `data` is the folder that run trained on (its
    model file records the run, and the run's config.yaml is still there); None otherwise."""
    config = training_config(model_file)
    if not config or not config.get("data") or Path(config["data"]).resolve() != Path(data).resolve():
        return None
    return config.get("val_split"), config.get("seed", 0)


def split_as_trained(model_file: str | Path, data: str | Path) -> Dataset | None:
    """`data` split into train and val as the model's training run split it, when `data` is the flat class
    folder the run trained on; None otherwise. Its val split is then the images training held out: evaluated
    whole, the folder would mostly score images the model learned."""
    split = training_split(model_file, data)
    if split is None:
        return None
    dataset = open_dataset(data, *split)
    return dataset if dataset.flat else None


def evaluate(model, data: str | Path | Dataset, split: str | None = None, tta: str = "none",
             batch_size: int = 64, out_dir: str | Path | None = None, gallery_size: int = 16, bins: int = 15,
             workers: int | None = None, title: str | None = None, progress: bool = False,
             decoder: str = "pillow", compile: bool | None = None, unknown: str | Path | None = None) -> EvalResult:
    """Metrics of `model` on a split of `data`; with `out_dir`, the full report is written there.
    `decoder`: 'torchvision' decodes JPEG files on the model's device. `compile`: torch.compile on, off,
    or None to choose by the split's size (predict.inference_compile). `unknown`: a folder of images of none
    of the model's classes; how well its confidence tells them from the split's is measured too."""
    dataset = data if isinstance(data, Dataset) else open_dataset(data)
    split_name, chosen = pick_split(dataset, split)
    all_labels = model_labels(dataset, chosen, model)
    items = chosen.files if chosen.images is None else list(chosen.images)
    unknown_items = unknown_images(unknown) if unknown is not None else []
    names = class_names_of(model)
    tta_image_size(model.preprocessing, tta)  # checked before any work
    check_stream(batch_size, workers, decoder, model_device(model))
    if isinstance(model, torch.nn.Module):
        model.eval()
    compiled, why = inference_compile(model, compile, len(items) + len(unknown_items))
    forward = inference_forward(model, compiled, batch_size)
    pre = model.preprocessing
    multi_label = is_multi_label(model)
    thresholds = class_thresholds(model).copy() if multi_label else None
    # The nearest-neighbour score needs the pooled features, which only the PyTorch model run eagerly gives.
    nearest = isinstance(model, ResNet) and not compiled and unknown is not None
    stream = lambda items, label: probabilities_of(model, forward, items, tta, batch_size, workers,  # noqa: E731
                                                   decoder, label, progress, nearest)
    probs_all, kept, failed, features = stream(items, f"evaluating {split_name}")
    if not kept:
        raise DatasetError(f"{dataset.root}: none of the {len(items)} images of the {split_name} split could be read")
    labels = all_labels[kept]
    metrics = (multi_label_metrics(probs_all, labels, names, thresholds, bins) if multi_label
               else classification_metrics(probs_all, labels, names, bins))
    sources = [str(items[i]) if isinstance(items[i], Path) else f"{split_name}#{i}" for i in kept]
    gallery = highest_loss(model, probs_all, labels, [items[i] for i in kept], sources, gallery_size)
    result = EvalResult(metrics, probs_all, labels, sources, failed, gallery, compiled=why, split=split_name,
                        thresholds=thresholds, clips=None if multi_label else ClipScores.of(sources, probs_all, labels))
    if result.clips is not None:
        metrics["clips"] = result.clips.metrics(names)
    if unknown_items:
        result.unknown_probs, unknown_kept, unknown_failed, unknown_features = stream(unknown_items,
                                                                                      "evaluating unknown images")
        result.failed += unknown_failed
        if not unknown_kept:
            raise DatasetError(f"--unknown {unknown}: none of its {len(unknown_items)} images could be read")
        result.unknown_sources = [str(unknown_items[i]) for i in unknown_kept]
        metrics["unknown"] = {"folder": str(unknown), **unknown_detection(
            probs_all.max(1), result.right(), result.unknown_probs.max(1))}
        if multi_label:  # what it answers without a floor: any class at its threshold is an answer
            metrics["unknown"]["labelled"] = float((result.unknown_probs >= thresholds).any(1).mean())
        bank_items, why_not = bank_images(dataset, split_name, nearest, compiled)
        if bank_items:
            _, _, bank_failed, bank_features = stream(bank_items, "features of training images")
            result.failed += bank_failed
            result.bank = FeatureBank.of(bank_features, NEAREST_K, 0.0, model, KNOWN_KEPT)
            result.known_similarity, result.unknown_similarity = (
                result.bank.similarity(torch.from_numpy(rows)).numpy() for rows in (features, unknown_features))
            detection = unknown_detection(result.known_similarity, result.right(), result.unknown_similarity,
                                          thresholds=())
            result.bank.floor = detection["floor"]
            metrics["unknown"]["nearest"] = {"k": NEAREST_K, "bank_images": len(bank_features), **detection}
        else:
            metrics["unknown"]["nearest"] = {"skipped": why_not}
    if out_dir is not None:
        info = {"model": getattr(model, "arch", type(model).__name__), "data": str(dataset.root), "split": split_name,
                "tta": tta, "resize_size": pre.resize_size, "input_size": pre.input_size, "compile": why,
                "runtime": getattr(model, "runtime_text", "PyTorch"),  # an exported model's: ONNX Runtime, OpenVINO
                "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        title = title or f"{info['model']} on {dataset.root.name} ({split_name})"
        predictions = Path(out_dir) / "predictions.csv"
        if multi_label:
            pr = hardest_pr_curves(probs_all, labels, metrics["per_class"])
            result.files = write_multi_label_report(out_dir, title, metrics, info, gallery, result.failed, pr,
                                                    result.score_groups())
            result.files["predictions"] = write_multi_label_predictions(predictions, sources, labels, probs_all,
                                                                        names, thresholds)
        else:
            roc = hardest_roc_curves(probs_all, labels, metrics["per_class"])
            result.files = write_report(out_dir, title, metrics, info, gallery, result.failed, roc,
                                        result.score_groups())
            result.files["predictions"] = write_predictions(predictions, sources, labels, probs_all, names)
            if result.clips is not None:
                clips = result.clips
                result.files["clips"] = write_predictions(Path(out_dir) / "clips.csv", clips.names, clips.labels,
                                                          clips.probs, names, item="clip", frames=clips.frames)
        if result.bank is not None:  # predict and serve take it with --feature-bank
            result.files["feature_bank"] = result.bank.save(Path(out_dir) / "feature_bank.safetensors")
    return result


def bank_images(dataset: Dataset, split: str, nearest: bool, compiled: bool) -> tuple[list, str]:
    """The training images whose features the nearest-neighbour score compares with (a seeded sample of at
    most BANK_IMAGES), or none and why."""
    if not nearest:
        return [], ("torch.compile runs the model whole, without its pooled features" if compiled else
                    "the bank is made from the .safetensors model (predict and serve apply it to its exports "
                    "too); evaluate that")
    if split in ("train", "all"):
        return [], f"the {split} split holds the training images themselves"
    if dataset.train is None or not len(dataset.train):
        return [], f"{dataset.root} has no training split to compare with"
    items = dataset.train.files if dataset.train.images is None else list(dataset.train.images)
    if len(items) > BANK_IMAGES:
        chosen = np.sort(np.random.default_rng(0).choice(len(items), BANK_IMAGES, replace=False))
        items = [items[i] for i in chosen]
    return items, ""


def unknown_images(folder: str | Path) -> list[Path]:
    """The images under `folder` (recursively), to be told apart from the model's classes; refused when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--unknown {folder}: not a folder; give a folder of images of none of the model's "
                           f"classes")
    items = image_files([folder])
    if not items:
        raise DatasetError(f"--unknown {folder}: no image files in it (or its subfolders)")
    return items


def probabilities_of(model, forward, items: list, tta: str, batch_size: int, workers: int | None, decoder: str,
                     label: str, progress: bool,
                     features: bool = False) -> tuple[np.ndarray, list[int], list[str], np.ndarray | None]:
    """The class probabilities of the readable `items` through `forward` (`model`, or it compiled), the
    indices of those items, one line per item that could not be read, and with `features` their pooled
    features (predict.probabilities_and_features), else None."""
    pre = model.preprocessing
    probs, kept, failed, pooled = [], [], [], []
    with progress_bar(label, progress) as bar:
        task = bar.add_task("eval", total=len(items))
        batches = inference_batches(items, pre.resize_size, tta_image_size(pre, tta), pre.interpolation, batch_size,
                                    workers, decoder, model_device(model))
        for batch, probabilities, batch_features in probabilities_in_flight(forward, batches, tta,
                                                                            is_multi_label(model), features):
            failed += [message for _, message in batch.failed]
            if probabilities is not None:
                probs.append(probabilities.numpy())
                pooled.append(batch_features)
                kept += batch.indices
            bar.advance(task, len(batch.indices) + len(batch.failed))
    if not probs:
        return np.zeros((0, 0)), kept, failed, None
    return np.concatenate(probs), kept, failed, torch.cat(pooled).numpy() if features else None


def highest_loss(model, probs: np.ndarray, labels: np.ndarray, items: list, sources: list[str],
                 count: int) -> list[GalleryItem]:
    """The `count` images with the highest loss, with Grad-CAM for the predicted and the true class; for a
    multi-label model for the absent class it is surest of and the present class it is least sure of."""
    if count <= 0:
        return []
    multi_label = is_multi_label(model)
    losses = label_losses(probs, labels) if multi_label else image_losses(probs, labels)
    order = np.argsort(-losses, kind="stable")[:count]
    names = class_names_of(model)
    pre = model.preprocessing
    (batch,) = inference_batches([items[i] for i in order], pre.resize_size, pre.input_size, pre.interpolation,
                                 batch_size=len(order), workers=0)
    order = order[batch.indices]  # in case a file became unreadable since it was evaluated
    if multi_label:
        # Each image's worst mistakes: the absent class with the highest probability, the present one with the
        # lowest (an image with none of the classes, or all of them, has only one kind: the top class stands in).
        present = labels[order].astype(bool)
        predicted = np.where(present, -1.0, probs[order]).argmax(1)
        predicted = np.where(present.all(1), probs[order].argmax(1), predicted)
        true = np.where(present, probs[order], 2.0).argmin(1)
        true = np.where(present.any(1), true, probs[order].argmax(1))
    else:
        predicted, true = probs[order].argmax(1), labels[order]
    cam_predicted = cam_true = [None] * len(order)
    if isinstance(model, ResNet):
        x = normalize(batch.images.to(model_device(model)).float() / 255, pre)
        cam_predicted = grad_cam(model, x, predicted.tolist())[0].numpy()
        cam_true = grad_cam(model, x, true.tolist())[0].numpy()
    joined = lambda row: " ".join(name for name, on in zip(names, row) if on)  # noqa: E731
    thresholds = class_thresholds(model) if multi_label else None
    return [GalleryItem(sources[i], names[t], names[p], float(probs[i, t]), float(probs[i, p]), float(losses[i]),
                        batch.images[row].permute(1, 2, 0).numpy(), cam_predicted[row], cam_true[row],
                        *((joined(labels[i]), joined(probs[i] >= thresholds)) if multi_label else ()))
            for row, (i, t, p) in enumerate(zip(order, true, predicted))]
