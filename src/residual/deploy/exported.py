"""What every exported model shares, whichever file format and runtime it has (ONNX for ONNX Runtime and
OpenVINO, .pte for ExecuTorch).

- The graph an export computes: `exportable` wraps a ResNet so it returns its logits and the pooled
  features its classifier takes (which a FeatureBank compares), optionally float16 inside and optionally
  taking uint8 pixels with the normalisation baked in.
- The metadata it carries (`export_fields`): class names, preprocessing, outputs, input format, precision,
  the classifier's fingerprint and the versions that wrote it.
- The parity check every export passes before it is written: the exported model run by its runtime
  against the PyTorch model on real images (`parity`), within a tolerance relative to the largest logit.
- `ExportedModel`: an exported file behind the interface evaluate, predict and serve use, as a ResNet
  has it (`preprocessing`, `class_names`, `num_classes`, a call on a normalised float32 batch that
  returns logits); each runtime's subclass says how to `run` its graph.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path, write_json
from ..data.loaders import inference_batches
from ..data.transforms import normalize
from ..errors import ResidualError
from ..feature_bank import classifier_fingerprint
from ..models import Preprocessing, ResNet
from ..models.resnet import MULTI_LABEL_THRESHOLD
from ..predict import class_thresholds, is_multi_label
from ..tables import classes_line, outputs_line
from ..weights import read_metadata, training_config

INPUT_FLOAT = "float32 NCHW normalised"
INPUT_UINT8 = "uint8 NHWC 0-255"
MIN_AGREEMENT = 0.99  # top-1 agreement an export must reach on the parity sample
# Largest logit difference allowed, relative to the largest logit: float32 graphs differ from eager
# PyTorch only by operation order; float16 keeps about three significant digits through every layer.
RELATIVE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
# What a model file's metadata says about its outputs, which an export of it keeps: a calibrated model's
# temperature is already in its classifier, and the exported file should say so as the model file does.
CARRIED_METADATA = ("temperature", "calibrated_on")


class ExportError(ResidualError):
    """An export that could not be made, or that does not match the original."""


@dataclass
class Parity:
    """How closely an exported model reproduces the original on a sample of images."""

    images: int
    source: str  # where the sample came from
    max_abs_diff: float  # largest |logit difference| over the sample
    tolerance: float
    agreement: float  # fraction of images given the same answer: the top class, or a multi-label model's labels
    answers: str = "top-1"  # what agreement compares: "top-1", or "labels" (every class over its threshold)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.agreement >= MIN_AGREEMENT

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "min_agreement": MIN_AGREEMENT}


@dataclass
class ExportResult:
    path: Path | None  # None when the export failed its parity check and was not written
    parity: Parity
    report_path: Path | None
    seconds: float


class _ParityFailed(Exception):
    """Unwinds atomic_path (removing the temporary file) when a parity check fails."""

    def __init__(self, parity_result: Parity):
        super().__init__("parity check failed")
        self.parity = parity_result


class LogitsAndFeatures(nn.Module):
    """`model`'s logits, and the pooled features its classifier layer took: the graph's two outputs."""

    def __init__(self, model: ResNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.fc(pooled), pooled


class InputPreprocessing(nn.Module):
    """uint8 N x H x W x 3 pixels -> the normalised float N x 3 x H x W batch, then `model`.

    (x / 255 - mean) / std is folded into one multiply-add per channel.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model = model
        mean, std = torch.tensor(preprocessing.mean), torch.tensor(preprocessing.std)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (mean / std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(x.permute(0, 3, 1, 2).float() * self.scale - self.shift)


class HalfPrecision(nn.Module):
    """`model` in float16 between float32 input and output, so callers never see half floats."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(output.float() for output in self.model(x.half()))


def exportable(model: ResNet, fp16: bool = False, with_preprocessing: bool = False) -> nn.Module:
    """A CPU float32 copy of `model` (the original is untouched), wrapped as the graph should compute it."""
    net: nn.Module = LogitsAndFeatures(
        copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format))
    if fp16:
        net = HalfPrecision(net)
    if with_preprocessing:
        net = InputPreprocessing(net, model.preprocessing)
    return net.eval()


def export_fields(model: ResNet, file_format: str, precision: str, with_preprocessing: bool,
                  extra: dict | None) -> dict[str, str]:
    """The metadata an export carries, as strings (JSON where a value is not one): what a runtime needs to
    prepare images and read the answers, without the model file."""
    from .. import __version__

    return {
        "residual.format": file_format,
        "arch": model.arch,
        "class_names": json.dumps(model.class_names),
        "preprocessing": json.dumps(asdict(model.preprocessing)),
        "multi_label": json.dumps(bool(model.multi_label)),
        "threshold": json.dumps(model.threshold),
        "input": INPUT_UINT8 if with_preprocessing else INPUT_FLOAT,
        "precision": precision,
        "classifier_sha256": classifier_fingerprint(model.fc.weight),
        "residual_version": __version__,
        "torch_version": torch.__version__,
        **{key: json.dumps(value) for key, value in (extra or {}).items()},
    }


def described(meta: dict[str, str], specific: dict[str, str], known: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """`residual info`'s rows of an export: what its metadata says, with the format's `specific` rows (precision,
    input, features, weights ...) in between; metadata no row shows (beyond `known`) is listed as extra."""
    names, pre = json.loads(meta["class_names"]), json.loads(meta["preprocessing"])
    rows = {"architecture": meta["arch"],
            "precision": meta["precision"],
            "classes": classes_line(len(names), names),
            "outputs": outputs_line(json.loads(meta.get("multi_label", "false")),
                                    json.loads(meta.get("threshold", json.dumps(MULTI_LABEL_THRESHOLD)))),
            "preprocessing": f"resize {pre['resize_size']} -> crop {pre['input_size']}, {pre['interpolation']}, "
                             f"mean / std {Preprocessing(**pre).normalisation()}",
            **specific,
            "written by": f"residual {meta['residual_version']}, torch {meta['torch_version']}"}
    shown = ("residual.format", "arch", "class_names", "preprocessing", "input", "precision", "residual_version",
             "torch_version", "multi_label", "threshold", "classifier_sha256") + known
    extra = {key: value for key, value in meta.items() if key not in shown}
    if extra:
        rows["extra"] = ", ".join(f"{key}={value}" for key, value in extra.items())
    return list(rows.items())


def export_metadata(model_path: str | os.PathLike) -> dict:
    """The `extra` metadata of an export of the model file at `model_path`: its name, and CARRIED_METADATA."""
    extra = read_metadata(model_path)["extra"]
    return {"source": Path(model_path).name, **{key: extra[key] for key in CARRIED_METADATA if key in extra}}


def training_data(model_path: str | os.PathLike) -> str | None:
    """The dataset a model file was trained on, if its training run is recorded and the data still exists."""
    data = (training_config(model_path) or {}).get("data")
    return data if data and Path(data).exists() else None


def parity(reference: nn.Module, candidate, items: list, source: str, tolerance: float,
           batch_size: int = 32) -> Parity:
    """Logits of `candidate` against `reference` on `items` (paths or arrays), prepared as `reference` says, and
    how often both give the same answer: the top class, or for a multi-label model the same set of classes
    over its thresholds."""
    pre = reference.preprocessing
    reference = reference.eval()
    device = next(reference.parameters()).device
    multi_label = is_multi_label(reference)
    thresholds = torch.from_numpy(class_thresholds(reference).copy()).float() if multi_label else None
    max_diff, agree, count = 0.0, 0, 0
    for batch in inference_batches(items, pre.resize_size, pre.input_size, pre.interpolation, batch_size, workers=0):
        if batch.images is None:
            continue
        x = normalize(batch.images.float() / 255, pre)
        with torch.inference_mode():
            expected = reference(x.to(device)).float().cpu()
        got = candidate(x).float()
        max_diff = max(max_diff, float((got - expected).abs().max()))
        if multi_label:
            agree += int(((got.sigmoid() >= thresholds) == (expected.sigmoid() >= thresholds)).all(1).sum())
        else:
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
        count += len(x)
    if count == 0:
        raise ExportError(f"{source}: none of the parity images could be read")
    return Parity(count, source, max_diff, tolerance, agree / count, "labels" if multi_label else "top-1")


def logit_tolerance(reference: nn.Module, items: list, precision: str) -> float:
    """RELATIVE_TOLERANCE of the largest logit the reference gives on the first images."""
    pre = reference.preprocessing
    (batch,) = inference_batches(items[:16], pre.resize_size, pre.input_size, pre.interpolation, 16, workers=0)
    with torch.inference_mode():
        device = next(reference.parameters()).device
        scale = float(reference.eval()(normalize(batch.images.float() / 255, pre).to(device)).abs().max())
    return RELATIVE_TOLERANCE[precision] * max(1.0, scale)


def checked_export(model: ResNet, path: Path, items: list, source: str, precision: str, force: bool,
                   write: Callable[[Path], None], load: Callable[[Path], ExportedModel], report: dict) -> ExportResult:
    """`write` an export of `model` to a temporary file, `load` it in its runtime and compare it with `model` on
    `items` (images from `source`); put it at `path`, with PATH.parity.json (`report` and the parity numbers),
    only if it passes, or with `force`. A failed check leaves nothing behind."""
    start = time.perf_counter()
    tolerance = logit_tolerance(model, items, precision)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
            result = parity(model, load(tmp), items, source, tolerance)
            if not result.passed and not force:
                raise _ParityFailed(result)
    except _ParityFailed as refused:
        return ExportResult(None, refused.parity, None, time.perf_counter() - start)
    report_path = path.with_suffix(".parity.json")
    write_json(report_path, {"model": str(path), "arch": model.arch, "precision": precision, **report,
                             **result.to_dict()})
    return ExportResult(path, result, report_path, time.perf_counter() - start)


class ExportedModel:
    """An exported model with the interface evaluate and predict use, read from its metadata (`export_fields`);
    a subclass runs the graph (`run`)."""

    def __init__(self, path: Path, meta: dict[str, str]):
        self.path, self.metadata = path, meta
        self.arch = meta["arch"]
        self.class_names = json.loads(meta["class_names"])
        self.preprocessing = Preprocessing(**json.loads(meta["preprocessing"]))
        # Absent from files exported before multi-label models existed: those are single-label.
        self.multi_label = json.loads(meta.get("multi_label", "false"))
        self.threshold = json.loads(meta.get("threshold", json.dumps(MULTI_LABEL_THRESHOLD)))
        self.input_format = meta["input"]
        self.precision = meta["precision"]
        # The float32 classifier the file was exported with, which a FeatureBank checks (absent from files
        # exported before the graph had its features output).
        self.classifier_fingerprint = meta.get("classifier_sha256")
        # Per thread, since threads may share the model (a web app's pool): the features each call collects
        # while collecting_features, and a runtime's per-thread state.
        self.per_thread = threading.local()

    def run(self, array: np.ndarray, features: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Logits for an array already in the graph's input format; with `features`, and the pooled features."""
        raise NotImplementedError

    def graph_input(self, x: torch.Tensor) -> np.ndarray:
        """The graph's input for a normalised float batch.

        A graph with the preprocessing baked in takes the pixels themselves: un-normalising
        and rounding recovers them exactly, since every normalised value came from a uint8.
        """
        if self.input_format == INPUT_FLOAT:
            return x.detach().float().cpu().numpy()
        mean = torch.tensor(self.preprocessing.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing.std).view(1, 3, 1, 1)
        pixels = ((x.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        collected = getattr(self.per_thread, "pooled", None)
        if collected is None:
            return torch.from_numpy(self.run(self.graph_input(x)))
        logits, pooled = self.run(self.graph_input(x), features=True)
        collected.append(torch.from_numpy(pooled).float())
        return torch.from_numpy(logits)

    @contextlib.contextmanager
    def collecting_features(self):
        """A list that gets the pooled features of each call this thread makes meanwhile (a ResNet's fc hook does
        the same for the PyTorch model: predict.collected_features)."""
        self.per_thread.pooled = []
        try:
            yield self.per_thread.pooled
        finally:
            self.per_thread.pooled = None
