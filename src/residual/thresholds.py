"""Per-class thresholds for a multi-label model: each class predicted where its probability reaches a
threshold of its own, chosen on held-out images to give that class its best F1.

One threshold of 0.5 for every class suits classes that are equally easy and probabilities that are
calibrated. A class the model is unsure of (a pentagon that looks like a hexagon) gets probabilities
below 0.5 even where it is there, and is rarely predicted; a lower threshold of its own finds it
again, at the cost of some false alarms, and F1 weighs the two. This is what the winning entries of
Kaggle's multi-label Planet competition did to their networks' outputs.

The thresholds are fitted on the validation split (training never learned from it) and checked on the
test split when there is one: thresholds fitted on few images fit their noise, which the test split
shows. They are written into the model file's metadata, so predict, eval, explain, serve and export use
them as they use the one threshold, with nothing to apply. The ranking of the images by each class, so
mAP, does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_json
from .data.datasets import open_dataset
from .errors import ConfigError
from .evaluate import evaluate, split_as_trained
from .metrics import multi_label_metrics, threshold_counts
from .predict import class_names_of, class_thresholds
from .runs import pick_device
from .weights import load_model, read_metadata, save_model

FIT_SPLITS = ("val", "test")  # held-out images only: fitted on training images, the thresholds would trust the model


@dataclass
class ThresholdResult:
    path: Path  # the model file with the per-class thresholds
    thresholds: list[float]  # one per class, in the model's class order
    report: dict  # per split: images, and mAP, F1 and exact match before and after
    report_path: Path | None = None  # thresholds.json


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The threshold that gives the best F1 when the images scoring at or above it are called positive: midway
    between the lowest score it calls and the next lower one, so that a new image scoring between them falls on
    the side nearer to it. None without both positive and negative images (nothing to choose between)."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any() or positive.all():
        return None
    true_positives, called = threshold_counts(scores, positive)
    f1 = 2 * true_positives / (called + positive.sum())
    best = int(np.argmax(f1))  # the highest threshold among equals: fewer false alarms for the same F1
    distinct = np.unique(scores)[::-1]  # the scores threshold_counts steps through, highest first
    below = distinct[best + 1] if best + 1 < len(distinct) else 0.0
    return float((distinct[best] + below) / 2)


def fit_thresholds(probs: np.ndarray, targets: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each class's best-F1 threshold on (probs, targets); `keep`'s where a class has no positive or no negative
    image to choose by."""
    chosen = [best_f1_threshold(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
    return np.array([keep[c] if value is None else value for c, value in enumerate(chosen)])


def tune_thresholds(model_path: str | Path, data: str | Path, out: str | Path | None = None, *, split: str = "val",
                    report_dir: str | Path | None = None, batch_size: int = 64, workers: int | None = None,
                    device: str = "auto", progress: bool = False) -> ThresholdResult:
    """Fit per-class thresholds for the multi-label model file `model_path` on the `split` of `data`, check them
    on the test split too when there is one, and write the model with them to `out` (default:
    MODEL.thresholds.safetensors) and, with `report_dir`, thresholds.json."""
    model_path = Path(model_path)
    if split not in FIT_SPLITS:
        raise ConfigError(f"--split must be one of {FIT_SPLITS}: the thresholds are fitted on images training did "
                          f"not learn from")
    metadata = read_metadata(model_path)  # first: an .onnx file or a non-model file is a one-line error
    if not metadata["multi_label"]:
        raise ConfigError(f"{model_path}: predicts one class per image (its most likely), so it has no thresholds; "
                          f"residual calibrate calibrates its probabilities")
    out = Path(out) if out else model_path.with_name(f"{model_path.stem}.thresholds.safetensors")
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: model files end in .safetensors")
    if out.resolve() == model_path.resolve():
        raise ConfigError(f"{out}: the model with thresholds would replace the original; give another -o")
    model = load_model(model_path).to(pick_device(device))
    dataset = split_as_trained(model_path, data) or open_dataset(data)
    checked = [split] + (["test"] if split == "val" and dataset.test is not None else [])
    evaluated = {name: evaluate(model, dataset, name, batch_size=batch_size, gallery_size=0, workers=workers,
                                progress=progress) for name in checked}
    names = class_names_of(model)
    before = class_thresholds(model).copy()
    fitted = fit_thresholds(evaluated[split].probs, evaluated[split].labels, before)
    report = {"model": str(model_path), "data": str(dataset.root), "fitted_on": split,
              "thresholds": dict(zip(names, fitted.tolist())), "splits": {}}
    for name, result in evaluated.items():
        scores = [multi_label_metrics(result.probs, result.labels, names, chosen) for chosen in (before, fitted)]
        report["splits"][name] = {"images": len(result.labels), "unreadable": result.failed, "map": scores[0]["map"],
                                  **{stage: {"f1_micro": s["micro"]["f1"], "f1_macro": s["macro"]["f1"],
                                             "exact_match": s["exact_match"]}
                                     for stage, s in zip(("before", "after"), scores)}}
    model.threshold = fitted.tolist()
    save_model(model, out, extra={**metadata["extra"], "thresholds_fitted_on": f"{dataset.root} ({split})"})
    result = ThresholdResult(out, fitted.tolist(), report)
    if report_dir is not None:
        result.report_path = Path(report_dir) / "thresholds.json"
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        write_json(result.report_path, report)
    return result
