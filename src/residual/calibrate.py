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
from .metrics import calibration_bins, expected_calibration_error
from .models import ResNet
from .report import plot_reliability
from .runs import pick_device
from .weights import load_model, read_metadata, save_model

# Trained networks fit T between about 0.3 and 3 (Guo et al. 2017 report up to 2.5); above this, softening
# the logits tenfold is the best the fit found: the probabilities say little about being right.
UNINFORMATIVE_TEMPERATURE = 10.0
FIT_SPLITS = ("val", "test")  # held-out images only: fitted on training images, T would make the model surer


class CalibrationError(ResidualError):
    """A model or split that temperature scaling cannot use."""


@dataclass
class CalibrationResult:
    path: Path  # the calibrated model file
    temperature: float  # this fit's T (the file records the product with any earlier one)
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


def classifier(model: ResNet) -> nn.Linear:
    """The layer whose outputs are the logits: where T is folded in."""
    head = getattr(model, "fc", None)
    if not isinstance(head, nn.Linear):
        raise CalibrationError("the model has no linear classifier (fc) to scale: it gives features, not classes")
    return head


def scale_classifier(model: ResNet, temperature: float) -> None:
    """Divide the classifier's weight and bias by `temperature`: its logits become z / T."""
    head = classifier(model)
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)


def calibration_scores(log_probs: np.ndarray, labels: np.ndarray, temperature: float, bins: int = 15) -> dict:
    """ECE and mean negative log-likelihood of softmax(log_probs / T), and top-1 (which T does not change)."""
    scaled = torch.from_numpy(log_probs).double() / temperature
    probs = torch.softmax(scaled, 1).numpy()
    rows = calibration_bins(probs.max(1), probs.argmax(1) == labels, bins)
    return {"ece": expected_calibration_error(rows), "nll": float(F.cross_entropy(scaled, torch.from_numpy(labels))),
            "top1": float((probs.argmax(1) == labels).mean()), "calibration": rows}


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
    if metadata["multi_label"]:  # temperature scaling here is the softmax's
        raise CalibrationError(f"{model_path}: a multi-label model (one sigmoid per class); residual thresholds "
                               f"chooses its per-class thresholds on held-out images")
    model = load_model(model_path).to(pick_device(device))
    classifier(model)  # a model without one stops before any evaluation
    as_trained = split_as_trained(model_path, data)
    dataset = as_trained or open_dataset(data)
    checked = [split] + (["test"] if split == "val" and dataset.test is not None else [])
    evaluated = {name: evaluate(model, dataset, name, batch_size=batch_size, gallery_size=0, workers=workers,
                                progress=progress) for name in checked}
    log_probs = {name: np.log(np.maximum(result.probs, np.finfo(np.float32).tiny)).astype(np.float64)
                 for name, result in evaluated.items()}
    temperature = fit_temperature(log_probs[split], evaluated[split].labels)
    report = {"model": str(model_path), "data": str(dataset.root), "fitted_on": split,
              "split_as_trained": as_trained is not None, "temperature": temperature, "splits": {}}
    if temperature > UNINFORMATIVE_TEMPERATURE:
        report["warning"] = (f"T = {temperature:.3g}: the model's probabilities say little about whether it is "
                             f"right on these images (top-1 {evaluated[split].metrics['top1']:.2%}), so the "
                             f"calibrated model's are close to uniform; train it further first")
    for name, result in evaluated.items():
        before, after = (calibration_scores(log_probs[name], result.labels, t) for t in (1.0, temperature))
        report["splits"][name] = {"images": len(result.labels), "unreadable": result.failed, "top1": before["top1"],
                                  "before": {k: before[k] for k in ("ece", "nll")},
                                  "after": {k: after[k] for k in ("ece", "nll")},
                                  "calibration": {"before": before["calibration"], "after": after["calibration"]}}
    scale_classifier(model, temperature)  # evaluated already: it becomes the calibrated model
    extra = metadata["extra"]
    save_model(model, out, extra={**extra, "temperature": extra.get("temperature", 1.0) * temperature,
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
            title += f" (T = {report['temperature']:.3g})"
        plot_reliability(scores["calibration"][stage], scores[stage]["ece"], files[stage], title)
    write_json(files["report"], report)
    return files
