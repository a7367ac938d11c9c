"""Temperature scaling (Guo et al. 2017): confidences that mean what they say.

A trained network's probabilities are often too sure of themselves, or, trained with label
smoothing, not sure enough; `residual eval` measures the gap (ECE, reliability.png). One
scalar T, fitted on held-out images to minimise their negative log-likelihood, divides
every logit: softmax(z / T) keeps each image's ranking of the classes, so top-1 and top-5
do not change, and only how sure the model says it is does. T is folded into the
classifier (its weight and bias divided by T), so the calibrated model file is an ordinary
one: predict, eval, explain, export and quantize use it as it is, with nothing to apply.

T is fitted on the validation split (training never learned from it) and checked on the
test split when the data has one; the flat folder a model was trained on is split as its
training run split it (evaluate.split_as_trained).

A multi-label model (one sigmoid per class) gets one temperature per class, each fitted to
its class's binary cross-entropy: sigmoid(z_c / T_c) keeps the order of the images within a
class, so mAP does not change. Its thresholds are moved with the probabilities (t_c becomes
sigmoid(logit(t_c) / T_c)), so every image keeps its labels. A class whose held-out images
are all positive or all negative has nothing to fit T to, and keeps T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_json
from .data.datasets import open_dataset
from .errors import ResidualError
from .evaluate import evaluate, split_as_trained
from .metrics import SCORE_NAMES, calibration_bins, expected_calibration_error, label_losses, mean_average_precision
from .models import ResNet
from .predict import class_thresholds
from .report import plot_reliability, temperature_text
from .runs import pick_device
from .weights import load_model, read_metadata, save_model

# Trained networks fit T between about 0.3 and 3 (Guo et al. 2017 report up to 2.5); above this, softening
# the logits tenfold is the best the fit found: the probabilities say little about being right.
UNINFORMATIVE_TEMPERATURE = 10.0
# A class whose probabilities rank its held-out images no better than chance (or worse) is best fitted by
# T -> infinity: every probability 0.5, ties that would change its AP. Its T stops at this bound instead.
CLASS_TEMPERATURE_BOUND = 100.0
FIT_SPLITS = ("val", "test")  # held-out images only: fitted on training images, T would make the model surer


class CalibrationError(ResidualError):
    """A model or split that temperature scaling cannot use."""


@dataclass
class CalibrationResult:
    path: Path  # the calibrated model file
    temperature: float | list[float]  # this fit's T, per class for a multi-label model (the file records the
    # product with any earlier one)
    report: dict  # per split: images, top-1, ECE and negative log-likelihood before and after
    files: dict[str, Path] = field(default_factory=dict)  # calibration.json and the reliability diagrams


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the mean negative log-likelihood of softmax(log_probs / T).

    Log-probabilities stand in for logits: they differ by one constant per image, which softmax cancels.
    """
    scores = torch.from_numpy(log_probs).double()
    targets = torch.from_numpy(labels).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scores / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def fit_class_temperatures(logits: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per class, the T_c that minimises the binary cross-entropy of sigmoid(logits[:, c] / T_c) against
    targets[:, c] (0/1), within 1/CLASS_TEMPERATURE_BOUND and CLASS_TEMPERATURE_BOUND; 1.0 for a class whose
    targets are all 0 or all 1 (nothing to tell T apart: the fit would sharpen without end)."""
    scores = torch.from_numpy(logits).double()
    labels = torch.from_numpy(np.asarray(targets)).double()
    fitted = (labels.min(0).values == 0) & (labels.max(0).values == 1)
    unbounded = torch.zeros(scores.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([unbounded], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def temperatures() -> torch.Tensor:  # log T = log(bound) tanh(u): any T inside the bounds, smoothly
        return (np.log(CLASS_TEMPERATURE_BOUND) * unbounded.tanh()).exp()

    def closure() -> torch.Tensor:  # the classes are independent: one sum fits them all at once
        optimizer.zero_grad()
        losses = F.binary_cross_entropy_with_logits(scores / temperatures(), labels, reduction="none")
        loss = losses[:, fitted].sum() / len(scores)
        loss.backward()
        return loss

    if fitted.any():
        optimizer.step(closure)
    with torch.no_grad():
        return torch.where(fitted, temperatures(), torch.ones_like(unbounded)).tolist()


def classifier(model: ResNet) -> nn.Linear:
    """The layer whose outputs are the logits: where T is folded in."""
    head = getattr(model, "fc", None)
    if not isinstance(head, nn.Linear):
        raise CalibrationError("the model has no linear classifier (fc) to scale: it gives features, not classes")
    return head


def scale_classifier(model: ResNet, temperature: float | list[float]) -> None:
    """Divide the classifier's weight and bias by `temperature` (one, or one per class): its logits become z / T."""
    head = classifier(model)
    divisor = torch.as_tensor(temperature, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        head.weight.div_(divisor.reshape(-1, 1) if divisor.dim() else divisor)
        if head.bias is not None:
            head.bias.div_(divisor)


def moved_thresholds(model: ResNet, temperatures: list[float]) -> float | list[float]:
    """A multi-label model's thresholds at which sigmoid(z / T_c) decides as its thresholds t_c did on
    sigmoid(z): sigmoid(logit(t_c) / T_c). One threshold of 0.5 (logit 0) stays where it is, for every T."""
    if model.threshold == 0.5:
        return model.threshold
    thresholds = torch.from_numpy(class_thresholds(model).copy())
    return (torch.logit(thresholds) / torch.tensor(temperatures, dtype=torch.float64)).sigmoid().tolist()


def calibration_scores(log_probs: np.ndarray, labels: np.ndarray, temperature: float, bins: int = 15) -> dict:
    """ECE and mean negative log-likelihood of softmax(log_probs / T), and top-1 (which T does not change)."""
    scaled = torch.from_numpy(log_probs).double() / temperature
    probs = torch.softmax(scaled, 1).numpy()
    rows = calibration_bins(probs.max(1), probs.argmax(1) == labels, bins)
    return {"ece": expected_calibration_error(rows), "nll": float(F.cross_entropy(scaled, torch.from_numpy(labels))),
            "top1": float((probs.argmax(1) == labels).mean()), "calibration": rows}


def label_calibration_scores(logits: np.ndarray, targets: np.ndarray, temperatures: list[float] | float,
                             bins: int = 15) -> dict:
    """ECE over every (image, class) probability of sigmoid(logits / T_c), the mean negative log-likelihood of
    an image's labels (binary cross-entropy summed over the classes, as eval's loss), and mAP (which T does
    not change)."""
    probs = torch.sigmoid(torch.from_numpy(logits) / torch.as_tensor(temperatures, dtype=torch.float64)).numpy()
    rows = calibration_bins(probs.ravel(), np.asarray(targets, dtype=bool).ravel(), bins)
    return {"ece": expected_calibration_error(rows), "nll": float(label_losses(probs, targets).mean()),
            "map": mean_average_precision(probs, targets), "calibration": rows}


def sigmoid_logits(probs: np.ndarray) -> np.ndarray:
    """Sigmoid probabilities back to logits, in float64; float32 probabilities of exactly 0 or 1 are held at
    the nearest float32 values inside (a logit of about +-17), since what lay beyond was rounded away."""
    tiny = np.finfo(np.float32)
    clipped = np.clip(np.asarray(probs, dtype=np.float64), tiny.tiny, 1 - tiny.epsneg)
    return np.log(clipped) - np.log1p(-clipped)


def calibrate(model_path: str | Path, data: str | Path, out: str | Path | None = None, *, split: str = "val",
              report_dir: str | Path | None = None, batch_size: int = 64, workers: int | None = None,
              device: str = "auto", progress: bool = False) -> CalibrationResult:
    """Fit a temperature for the model file `model_path` on the `split` of `data`, check it on the test
    split too when there is one, and write the calibrated model to `out` (default: MODEL.calibrated.safetensors)
    and, with `report_dir`, calibration.json and reliability diagrams before and after."""
    model_path = Path(model_path)
    if split not in FIT_SPLITS:
        raise CalibrationError(f"--split must be one of {FIT_SPLITS}: the temperature is fitted on images training "
                               f"did not learn from")
    metadata = read_metadata(model_path)  # first: an .onnx file or a non-model file is a one-line error
    out = Path(out) if out else model_path.with_name(f"{model_path.stem}.calibrated.safetensors")
    if out.suffix != ".safetensors":
        raise CalibrationError(f"{out}: model files end in .safetensors")
    if out.resolve() == model_path.resolve():
        raise CalibrationError(f"{out}: the calibrated model would replace the original; give another -o")
    model = load_model(model_path).to(pick_device(device))
    classifier(model)  # a model without one stops before any evaluation
    as_trained = split_as_trained(model_path, data)
    dataset = as_trained or open_dataset(data)
    checked = [split] + (["test"] if split == "val" and dataset.test is not None else [])
    evaluated = {name: evaluate(model, dataset, name, batch_size=batch_size, gallery_size=0, workers=workers,
                                progress=progress) for name in checked}
    multi_label = metadata["multi_label"]
    if multi_label:  # sigmoids: logits back from each class's own probability; one T per class
        scores = {name: sigmoid_logits(result.probs) for name, result in evaluated.items()}
        temperature = fit_class_temperatures(scores[split], evaluated[split].labels)
        score_of, metric, uninformative = label_calibration_scores, "map", max(temperature)
    else:  # log-probabilities stand in for the logits (fit_temperature)
        scores = {name: np.log(np.maximum(result.probs, np.finfo(np.float32).tiny)).astype(np.float64)
                  for name, result in evaluated.items()}
        temperature = fit_temperature(scores[split], evaluated[split].labels)
        score_of, metric, uninformative = calibration_scores, "top1", temperature
    report = {"model": str(model_path), "data": str(dataset.root), "fitted_on": split, "metric": metric,
              "split_as_trained": as_trained is not None, "temperature": temperature, "splits": {}, "warnings": []}
    if multi_label:
        report["classes"] = list(model.class_names)
    if uninformative > UNINFORMATIVE_TEMPERATURE:
        which = (f"T = {temperature:.3g}" if not multi_label else "T above " + ", ".join(
            f"{name} {t:.3g}" for name, t in zip(model.class_names, temperature) if t > UNINFORMATIVE_TEMPERATURE))
        report["warnings"].append(
            f"{which}: the model's probabilities say little about whether it is right on these images "
            f"({SCORE_NAMES[metric]} {evaluated[split].metrics[metric]:.2%}), so the calibrated model's are close to "
            f"{'0.5 there' if multi_label else 'uniform'}; train it further first")
    unchanged = 1.0 if not multi_label else [1.0] * len(temperature)
    for name, result in evaluated.items():
        before, after = (score_of(scores[name], result.labels, t) for t in (unchanged, temperature))
        report["splits"][name] = {"images": len(result.labels), "unreadable": result.failed, metric: before[metric],
                                  "before": {k: before[k] for k in ("ece", "nll")},
                                  "after": {k: after[k] for k in ("ece", "nll")},
                                  "calibration": {"before": before["calibration"], "after": after["calibration"]}}
    if split != "test" and "test" in report["splits"]:
        report["warnings"] += carried_over_warnings(report["splits"]["test"], multi_label)
    scale_classifier(model, temperature)  # evaluated already: it becomes the calibrated model
    if multi_label:
        model.threshold = moved_thresholds(model, temperature)  # every image keeps its labels
    extra = metadata["extra"]
    earlier = np.asarray(extra.get("temperature", 1.0), dtype=np.float64)
    save_model(model, out, extra={**extra, "temperature": (earlier * np.asarray(temperature)).tolist(),
                                  "calibrated_on": f"{dataset.root} ({split})"})
    result = CalibrationResult(out, temperature, report)
    if report_dir is not None:
        result.files = write_calibration_report(Path(report_dir), report)
    return result


def write_calibration_report(folder: Path, report: dict) -> dict[str, Path]:
    """calibration.json, and the reliability diagram of the last split checked before and after."""
    folder.mkdir(parents=True, exist_ok=True)
    shown = list(report["splits"])[-1]  # the test split when there is one: T was not fitted on it
    files = {"report": folder / "calibration.json"}
    for stage in ("before", "after"):
        files[stage] = folder / f"reliability-{shown}-{stage}.png"
        scores = report["splits"][shown]
        title = f"{shown}, {stage} temperature scaling"
        if stage == "after":
            title += f" (T = {temperature_text(report['temperature'])})"
        plot_reliability(scores["calibration"][stage], scores[stage]["ece"], files[stage], title)
    write_json(files["report"], report)
    return files


def carried_over_warnings(test: dict, multi_label: bool) -> list[str]:
    """A warning when the temperature (or the per-class ones) made the test split's negative log-likelihood
    worse: fitted to the noise of the images it was fitted on, it does not carry over."""
    if test["after"]["nll"] <= test["before"]["nll"]:
        return []
    return [f"on the test split, which the fit did not see, the negative log-likelihood rose "
            f"({test['before']['nll']:.4f} -> {test['after']['nll']:.4f}): the temperature{'s' if multi_label else ''} "
            f"did not carry over; keep the original model, or fit on more images"]
