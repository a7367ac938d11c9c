"""INT8 post-training static quantization with ONNX Runtime's quantizer, checked on validation data.

The float model is exported to ONNX (or taken as exported), prepared with ONNX
Runtime's quant_pre_process (shape inference, graph optimisation), and quantized
with per-channel int8 weights and uint8 activations (the fast pair on x86 with
VNNI), activation ranges calibrated on the user's images by the method chosen.
The file is written for the runtime that will run it:

- ONNX Runtime (the default): its integer operators (QLinearConv, QLinearAdd: the
  "QOperator" format) rather than QuantizeLinear/DequantizeLinear pairs around
  float ones ("QDQ"): on our CPU it ran ResNet-50 at 3.4x the float graph's
  images/s against 2.8x for QDQ (docs/deploy.md).
- OpenVINO: the QDQ format, the one it reads (it has no QLinear operators); it
  folds each pair into its own integer kernels, and the report says how many
  convolutions it runs on 8-bit integers.
- ExecuTorch: a .pte program quantized by XNNPACK's own quantizer (PT2E: int8
  weights per output channel, int8 activations whose ranges a histogram of the
  calibration images sets), beside the float .pte it is compared with.

Both models are then evaluated on the validation split through `evaluate` in that
runtime, timed, and compared. A model that loses more than `max_drop` top-1
points (a multi-label model's: mAP points) is refused: nothing is written unless `force` is given.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..atomic import atomic_path, write_json
from ..data.datasets import DatasetError, open_dataset, sample_items
from ..data.loaders import inference_batches
from ..data.transforms import normalize
from ..errors import ResidualError
from ..evaluate import evaluate, split_as_trained
from ..metrics import paired_comparison
from ..weights import load_model
from . import CALIBRATION_METHODS, QUANTIZE_RUNTIMES
from .exported import ExportedModel, ExportError, export_metadata
from .onnx import OnnxModel, export_onnx, read_onnx_metadata, set_metadata
from .speed import measure_speed

ORT_CALIBRATION = dict(zip(CALIBRATION_METHODS, (
    CalibrationMethod.MinMax,  # the observed range: fast, sensitive to outliers
    CalibrationMethod.Entropy,  # the range that keeps the histogram's KL divergence lowest
    CalibrationMethod.Percentile,  # the range holding 99.999% of the values
    CalibrationMethod.Distribution,
), strict=True))
# The INT8 graph each runtime reads and runs fastest.
QUANT_FORMATS = {"onnxruntime": QuantFormat.QOperator, "openvino": QuantFormat.QDQ}
EXECUTORCH_CALIBRATION = "histogram (XNNPACK quantizer)"


class QuantizeError(ResidualError):
    """A model or calibration set that cannot be quantized."""


@dataclass
class QuantizeResult:
    path: Path | None  # None when refused
    report_path: Path | None
    refused: bool
    report: dict  # float and int8: size, top-1, speed; the drop, agreement, calibration


class ImageCalibration(CalibrationDataReader):
    """Batches of calibration images, prepared as the float model's input expects."""

    def __init__(self, model: ExportedModel, items: list, batch_size: int = 32):
        self.model, self.items, self.batch_size = model, items, batch_size
        self.batches = self._batches()
        self.used = 0
        self.failed: list[str] = []

    def _batches(self) -> Iterator[dict]:
        pre = self.model.preprocessing
        for batch in inference_batches(self.items, pre.resize_size, pre.input_size, pre.interpolation,
                                       self.batch_size, workers=0):
            self.failed += [message for _, message in batch.failed]
            if batch.images is not None:
                self.used += len(batch.images)
                x = normalize(batch.images.float() / 255, pre)
                yield {"input": self.model.graph_input(x)}

    def get_next(self) -> dict | None:
        return next(self.batches, None)


DEFAULT_SUFFIXES = {"onnxruntime": "int8.onnx", "openvino": "int8.openvino.onnx", "executorch": "int8.pte"}


def float_onnx(model_path: Path, folder: Path, parity_items: list, source: str) -> Path:
    """The float32 ONNX file to quantize: `model_path` itself, or its export (parity-checked) in `folder`."""
    if model_path.suffix == ".onnx":
        precision = read_onnx_metadata(model_path)["precision"]
        if precision != "fp32":
            raise QuantizeError(f"{model_path}: a {precision} model; quantize the fp32 export or the model file")
        return model_path
    exported = export_onnx(load_model(model_path), folder / "float.onnx", parity_items, source,
                           extra=export_metadata(model_path))
    if exported.path is None:
        raise ExportError(f"{model_path}: its float ONNX export does not match it (max logit difference "
                          f"{exported.parity.max_abs_diff:.3g}); nothing was quantized")
    return exported.path


def quantize(model_path: str | Path, calib: str | Path, out: str | Path | None = None, *,
             val: str | Path | None = None, split: str = "val", method: str | None = None, calib_size: int = 256,
             max_drop: float = 1.0, force: bool = False, batch_size: int = 64, seed: int = 0,
             runtime: str = "onnxruntime", max_batch: int = 1, progress: bool = False) -> QuantizeResult:
    """Quantize `model_path` (a model file, or an fp32 .onnx for ONNX Runtime and OpenVINO) for `runtime`
    calibrating on `calib`'s training images, and compare it with the float model in that runtime on the
    `split` of `val` (default: `calib`). `method`: how ONNX Runtime's quantizer calibrates (default minmax);
    ExecuTorch's calibrates its own way. `max_batch`: the most images an ExecuTorch program takes per call."""
    model_path = Path(model_path)
    if runtime not in QUANTIZE_RUNTIMES:
        raise QuantizeError(f"--runtime must be one of {QUANTIZE_RUNTIMES}, got {runtime!r}")
    executorch = runtime == "executorch"
    if executorch and method is not None:
        raise QuantizeError("--method: ExecuTorch's XNNPACK quantizer sets each activation's range from its "
                            "histogram itself; leave --method out")
    if not executorch and max_batch != 1:
        raise QuantizeError("--max-batch is for --runtime executorch: an ONNX model takes any batch")
    method = method or "minmax"
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"--method must be one of {CALIBRATION_METHODS}, got {method!r}")
    # Each runtime's file has its own default name, so quantizing for both keeps both.
    out = Path(out) if out else model_path.with_name(f"{model_path.stem}.{DEFAULT_SUFFIXES[runtime]}")
    if out.suffix != (".pte" if executorch else ".onnx"):
        raise QuantizeError(f"{out}: ExecuTorch programs end in .pte" if executorch else
                            f"{out}: ONNX files end in .onnx")
    # The flat folder the model was trained on is split as its run split it: calibration takes training
    # images, and top-1 is measured on the images training held out, not on the ones the model learned.
    try:
        as_trained = split_as_trained(model_path, val or calib)
        val_data = as_trained or open_dataset(val or calib)
    except DatasetError:
        if val is None and Path(calib).is_dir():  # a folder of images calibrates, but top-1 needs classes
            raise QuantizeError(f"--calib {calib}: images without class folders; give --val DATASET to compare "
                                f"top-1 on") from None
        raise
    calib_data = as_trained if val is None else split_as_trained(model_path, calib)
    calib_items = sample_items(calib_data or calib, "train", calib_size, seed)
    with tempfile.TemporaryDirectory(prefix="residual-quantize-") as folder:
        folder = Path(folder)
        parity_items = sample_items(val_data.root, "val", 128, seed)
        if executorch:
            from .executorch import ExecuTorchModel

            float_model, int8_tmp, calibration_info = _executorch_pair(model_path, folder, parity_items,
                                                                       str(val_data.root), calib_items, str(calib),
                                                                       max_batch)
            source, int8_model = float_model.path, ExecuTorchModel(int8_tmp)
        else:
            source = float_onnx(model_path, folder, parity_items, str(val_data.root))
            float_model = OnnxModel(source, runtime=runtime)
            int8_tmp = folder / "int8.onnx"
            calibration_info = _quantize_onnx(float_model, source, int8_tmp, calib_items, str(calib), method, runtime)
            int8_model = OnnxModel(int8_tmp, runtime=runtime)
        report = _compare(float_model, int8_model, source, int8_tmp, val_data, split, batch_size, progress)
        report.update(calibration=calibration_info, max_drop=max_drop, forced=force,
                      split_as_trained=as_trained is not None, runtime=runtime,
                      format="XNNPACK PT2E" if executorch else QUANT_FORMATS[runtime].name)
        if runtime == "openvino":
            report["int8_convolutions"] = dict(zip(("int8", "of"), int8_model.int8_convolutions()))
        refused = report["drop_points"] > max_drop and not force
        if refused:
            return QuantizeResult(None, None, True, report)
        with atomic_path(out) as tmp:
            shutil.copyfile(int8_tmp, tmp)
    report_path = out.with_suffix(".quantize.json")
    write_json(report_path, {"model": str(out), **report})
    return QuantizeResult(out, report_path, False, report)


def _quantize_onnx(float_model: OnnxModel, source: Path, int8_path: Path, calib_items: list, calib: str,
                   method: str, runtime: str) -> dict:
    """ONNX Runtime's static quantization of the float graph `source` into `int8_path`, in the format `runtime`
    reads; returns what it was calibrated on."""
    prepared = source.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared))
    calibration = ImageCalibration(float_model, calib_items)
    # A pre-activation net's batch norms stay in the graph and QDQ quantizes their scales too; those are
    # one-dimensional, so per channel means axis 0 (the quantizer's default, 1, falls back to one scale).
    quantize_static(str(prepared), str(int8_path), calibration, quant_format=QUANT_FORMATS[runtime],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=ORT_CALIBRATION[method],
                    extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}})
    calibration_info = _calibration_info(calibration, calib, method)
    _carry_metadata(source, int8_path, calibration_info, runtime)
    return calibration_info


def _executorch_pair(model_path: Path, folder: Path, parity_items: list, source: str, calib_items: list,
                     calib: str, max_batch: int) -> tuple[ExportedModel, Path, dict]:
    """The model file as a float .pte (parity-checked; returned loaded) and as an INT8 one calibrated on
    `calib_items`, in `folder`, each taking up to `max_batch` images a call; and what it was calibrated on."""
    from .executorch import ExecuTorchModel, export_executorch, write_executorch

    model, extra = load_model(model_path), export_metadata(model_path)
    exported = export_executorch(model, folder / "float.pte", parity_items, source, max_batch=max_batch, extra=extra)
    if exported.path is None:
        raise ExportError(f"{model_path}: its float ExecuTorch export does not match it (max logit difference "
                          f"{exported.parity.max_abs_diff:.3g}); nothing was quantized")
    float_model = ExecuTorchModel(exported.path)
    calibration = ImageCalibration(float_model, calib_items)
    batches = [torch.from_numpy(inputs["input"]) for inputs in iter(calibration.get_next, None)]
    calibration_info = _calibration_info(calibration, calib, EXECUTORCH_CALIBRATION)
    int8_path = folder / "int8.pte"
    write_executorch(model, int8_path, max_batch, extra={**extra, "calibration": calibration_info},
                     calibration=batches)
    return float_model, int8_path, calibration_info


def _calibration_info(calibration: ImageCalibration, calib: str, method: str) -> dict:
    """What a quantization was calibrated on, for its report and metadata; none read is an error."""
    if calibration.used == 0:
        raise QuantizeError(f"{calib}: none of the calibration images could be read")
    return {"images": calibration.used, "source": calib, "method": method, "unreadable": len(calibration.failed)}


def _carry_metadata(float_path: Path, int8_path: Path, calibration: dict, runtime: str) -> None:
    """The float model's metadata (class names, preprocessing), marked int8 for `runtime`, onto the quantized file."""
    metadata = read_onnx_metadata(float_path)
    proto = onnx.load(int8_path)
    set_metadata(proto, {**metadata, "precision": "int8", "calibration": json.dumps(calibration),
                         "quantized_for": runtime})
    onnx.save(proto, int8_path)


def _compare(float_model: ExportedModel, int8_model: ExportedModel, float_path: Path, int8_path: Path, data, split: str,
             batch_size: int, progress: bool) -> dict:
    """Size, validation score (top-1, or a multi-label model's mAP) and CPU speed of both models, the score's drop
    and their agreement (the same top class; for multi-label, the same set of classes)."""
    results, evaluated = {}, {}
    for name, model, path in (("float", float_model, float_path), ("int8", int8_model, int8_path)):
        evaluated[name] = evaluate(model, data, split, batch_size=batch_size, gallery_size=0, workers=0,
                                   progress=progress)
        speed = measure_speed(model, model.preprocessing.input_size)
        results[name] = {"runtime": model.runtime_text, "size_mb": round(path.stat().st_size / 2**20, 3),
                         evaluated[name].score_name: evaluated[name].score(), **speed.to_dict()}
    first, second = evaluated["float"], evaluated["int8"]  # the same images: the same split, read the same way
    same = first.answers() == second.answers()
    agreement = "top1_agreement" if first.thresholds is None else "agreement"
    return {**results, "split": split, "images": int(first.metrics["images"]), "metric": first.score_name,
            "drop_points": round(100 * (first.score() - second.score()), 3),
            agreement: float(np.mean(same if same.ndim == 1 else same.all(1))),
            "versus_float": paired_comparison(first.right(), second.right())}
