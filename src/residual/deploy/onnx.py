"""ONNX export, and ONNX Runtime inference behind the interface evaluate and predict use.

`export_onnx` writes a ResNet with a dynamic batch axis (opset 18), its class
names and preprocessing in the ONNX metadata, optionally float16 inside (float32
in and out) and optionally the input preprocessing baked in, so the graph takes
uint8 N x H x W x 3 pixels (already resized and cropped to the model's input
size). The file is checked with onnx.checker (full check) and run in ONNX
Runtime on real images against the original; a file whose logits disagree is
not written (unless forced), and the parity numbers are saved next to it.

The graph has a second output, `features`: the pooled features the classifier takes,
which a FeatureBank compares (predict and serve `--feature-bank`); the metadata names the
classifier by its float32 weights' fingerprint, so that a bank knows the model it was made with.

`OnnxModel` runs such a file with ONNX Runtime, or with OpenVINO on the CPU
(`runtime="openvino"`: in float32, or in bfloat16 on CPUs that compute it, where it is
several times faster), and looks like a ResNet to the tasks: `preprocessing`,
`class_names`, `num_classes`, and a call that takes a normalised float32 N x 3 x H x W
batch and returns logits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from . import RUNTIMES
from ..atomic import atomic_path, write_json
from ..data.loaders import inference_batches
from ..data.transforms import normalize
from ..errors import ConfigError, ResidualError
from ..feature_bank import classifier_fingerprint
from ..models import Preprocessing, ResNet
from ..models.resnet import MULTI_LABEL_THRESHOLD
from ..predict import class_thresholds, is_multi_label
from ..tables import classes_line, outputs_line
from ..weights import ModelFileError, read_metadata, training_config

OPSET = 18  # the torch.export-based exporter's own opset; lower ones need a lossy version conversion
INPUT, OUTPUT, FEATURES = "input", "logits", "features"
ONNX_FORMAT = "residual.onnx"
INPUT_FLOAT = "float32 NCHW normalised"
INPUT_UINT8 = "uint8 NHWC 0-255"
MIN_AGREEMENT = 0.99  # top-1 agreement an export must reach on the parity sample
# Largest logit difference allowed, relative to the largest logit: float32 graphs differ from eager
# PyTorch only by operation order; float16 keeps about three significant digits through every layer.
RELATIVE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


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


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs warnings about optional torchvision ops and deprecations that are not ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_onnx(model: ResNet, path: Path, fp16: bool = False, with_preprocessing: bool = False,
               extra: dict | None = None) -> None:
    """Export `model` to `path` (not checked; export_onnx is the checked way) with residual's metadata."""
    from .. import __version__

    size = model.preprocessing.input_size
    example = (torch.zeros(2, size, size, 3, dtype=torch.uint8) if with_preprocessing
               else torch.zeros(2, model.config.in_chans, size, size))
    with _quiet_exporter():
        program = torch.onnx.export(
            exportable(model, fp16, with_preprocessing), (example,), input_names=[INPUT],
            output_names=[OUTPUT, FEATURES],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET, dynamo=True,
            external_data=False, verbose=False)
    proto = program.model_proto
    metadata = {
        "residual.format": ONNX_FORMAT,
        "arch": model.arch,
        "class_names": json.dumps(model.class_names),
        "preprocessing": json.dumps(asdict(model.preprocessing)),
        "multi_label": json.dumps(bool(model.multi_label)),
        "threshold": json.dumps(model.threshold),
        "input": INPUT_UINT8 if with_preprocessing else INPUT_FLOAT,
        "precision": "fp16" if fp16 else "fp32",
        "classifier_sha256": classifier_fingerprint(model.fc.weight),
        "residual_version": __version__,
        "torch_version": torch.__version__,
        **{key: json.dumps(value) for key, value in (extra or {}).items()},
    }
    set_metadata(proto, metadata)
    proto.doc_string = f"{model.arch} exported by residual {__version__}"
    onnx.save(proto, path)


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace the model's metadata_props with `metadata`."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file written by residual (weights in external files are not loaded)."""
    return _load_residual_onnx(path)[1]


def _load_residual_onnx(path: str | os.PathLike) -> tuple[onnx.ModelProto, dict[str, str]]:
    """An ONNX file written by residual and its metadata, or a one-line ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf raises several types for a file that is not ONNX
        raise ModelFileError(f"{path}: not a readable ONNX file ({error})") from None
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    if metadata.get("residual.format") != ONNX_FORMAT:
        raise ModelFileError(f"{path}: an ONNX file, but not one exported by residual (its metadata has no class "
                             f"names or preprocessing); export the model with `residual export`")
    return proto, metadata


def describe_onnx(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(field, value) rows of what `residual info` shows of an exported model: its metadata, the
    graph's input, opset and stored weights, and the file's size."""
    path = Path(path)
    model, meta = _load_residual_onnx(path)
    graph = model.graph
    names, pre = json.loads(meta["class_names"]), json.loads(meta["preprocessing"])
    opsets = ", ".join(f"{entry.domain or 'ai.onnx'} {entry.version}" for entry in model.opset_import
                       if entry.domain in ("", "com.microsoft"))
    [graph_input] = graph.input
    tensor = graph_input.type.tensor_type
    shape = " x ".join(d.dim_param or str(d.dim_value) for d in tensor.shape.dim)
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    rows = [("architecture", meta["arch"]),
            ("precision", meta["precision"] + (f", quantized for {meta['quantized_for']}" if "quantized_for" in meta
                                               else "")),
            ("classes", classes_line(len(names), names)),
            ("outputs", outputs_line(json.loads(meta.get("multi_label", "false")),
                                     json.loads(meta.get("threshold", json.dumps(MULTI_LABEL_THRESHOLD))))),
            ("input", f"'{graph_input.name}', {onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)} "
                      f"{shape} ({meta['input']})"),
            ("features", f"'{FEATURES}', the pooled features (for --feature-bank)" if FEATURES in
             [output.name for output in graph.output] else "none (exported before the graph gave them)"),
            ("preprocessing", f"resize {pre['resize_size']} -> crop {pre['input_size']}, {pre['interpolation']}, "
                              f"mean / std {Preprocessing(**pre).normalisation()}"),
            ("weights", f"{stored:,} stored values, file {path.stat().st_size / 1e6:.2f} MB"),
            ("opset", opsets),
            ("written by", f"residual {meta['residual_version']}, torch {meta['torch_version']}")]
    extra = {key: value for key, value in meta.items() if key not in ONNX_KNOWN_METADATA}
    if extra:
        rows.append(("extra", ", ".join(f"{key}={value}" for key, value in extra.items())))
    return rows


ONNX_KNOWN_METADATA = ("residual.format", "arch", "class_names", "preprocessing", "input", "precision",
                       "residual_version", "torch_version", "multi_label", "threshold", "quantized_for",
                       "classifier_sha256")


class OnnxModel:
    """An exported model run by ONNX Runtime or OpenVINO, with the interface evaluate and predict use.
    `bf16`: OpenVINO computes in bfloat16 (its inputs and outputs stay float32)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None,
                 runtime: str = "onnxruntime", bf16: bool = False):
        if runtime not in RUNTIMES:
            raise ConfigError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
        if bf16 and runtime != "openvino":
            raise ConfigError(f"{path}: ONNX Runtime runs it in the precision it was exported with; bfloat16 "
                              f"is OpenVINO's (--runtime openvino)")
        self.path, self.runtime, self.bf16 = Path(path), runtime, bf16
        meta = read_onnx_metadata(self.path)
        if bf16 and meta["precision"] != "fp32":
            raise ConfigError(f"--precision bf16: {path} is an {meta['precision']} model; OpenVINO computes bf16 "
                              f"from an fp32 export")
        self.metadata = meta
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
        # while collecting_features, and OpenVINO's inference request (one runs one inference at a time).
        self.per_thread = threading.local()
        if runtime == "openvino":
            self.compiled = _openvino_model(self.path, threads, bf16)
            self.num_classes = self.compiled.output(0).get_partial_shape()[1].get_length()
            self.has_features = any(FEATURES in port.get_names() for port in self.compiled.outputs)
            return
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types
            raise ModelFileError(f"{self.path}: ONNX Runtime cannot load it ({error})") from None
        self.num_classes = int(self.session.get_outputs()[0].shape[1])
        self.has_features = FEATURES in [output.name for output in self.session.get_outputs()]

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

    def run(self, array: np.ndarray, features: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Logits for an array already in the graph's input format; with `features`, and the pooled features."""
        names = [OUTPUT, FEATURES] if features else [OUTPUT]
        if self.runtime == "openvino":
            if getattr(self.per_thread, "request", None) is None:
                self.per_thread.request = self.compiled.create_infer_request()
            outputs = self.per_thread.request.infer(array)
            answers = [outputs[self.compiled.output(name)] for name in names]
        else:
            answers = self.session.run(names, {INPUT: array})
        return tuple(answers) if features else answers[0]

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

    @property
    def runtime_text(self) -> str:
        """What runs it in which precision, for eval's heading and reports: "ONNX Runtime fp32", "OpenVINO bf16",
        "OpenVINO INT8" ..."""
        precision = "bf16" if self.bf16 else "INT8" if self.precision == "int8" else self.precision
        return f"{'ONNX Runtime' if self.runtime == 'onnxruntime' else 'OpenVINO'} {precision}"

    def int8_convolutions(self) -> tuple[int, int]:
        """How many of the compiled graph's convolutions OpenVINO runs on 8-bit integers, and of how many: an
        INT8 file whose quantization OpenVINO could not fold into its integer kernels runs in float."""
        layers = [op.get_rt_info() for op in self.compiled.get_runtime_model().get_ops()]
        convolutions = [str(info["runtimePrecision"].astype(str)) for info in layers
                        if str(info["layerType"].astype(str)) == "Convolution"]
        return sum(p in ("u8", "i8") for p in convolutions), len(convolutions)


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ConfigError("--runtime openvino: OpenVINO is not installed: pip install openvino "
                          "(or residual[openvino])") from None
    return openvino


def _openvino_core():
    """The one OpenVINO Core of the process."""
    return _shared_core(_openvino())


@functools.cache
def _shared_core(openvino):
    # Kept for the process's life: with a Core per model, the process segfaulted at its next fork (a decoding
    # worker) after quantizing for OpenVINO, most likely because a freed Core unloads the CPU plugin while
    # something of it stays registered for fork (docs/ARCHITECTURE.md).
    return openvino.Core()


def openvino_computes_bf16() -> bool:
    """Whether this CPU has the bfloat16 arithmetic (AVX512-BF16 or AMX) OpenVINO's bf16 runs on."""
    return "BF16" in _openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _openvino_model(path: Path, threads: int | None, bf16: bool):
    """The ONNX file compiled by OpenVINO for the CPU, computing in float32 unless `bf16` (OpenVINO's own default
    on CPUs with bfloat16 arithmetic is bf16: asked for outright here, so what runs is what was asked)."""
    core = _openvino_core()
    if bf16 and not openvino_computes_bf16():
        raise ConfigError("--precision bf16: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX) for "
                          "OpenVINO to use; run it in fp32")
    try:
        graph = core.read_model(str(path))
    except RuntimeError as error:
        if "QLinear" in str(error):
            raise ModelFileError(f"{path}: OpenVINO cannot read it (its INT8 operators are ONNX Runtime's own); run "
                                 f"it with --runtime onnxruntime, or quantize with --runtime openvino") from None
        why = str(error).strip().splitlines()[-1]
        raise ModelFileError(f"{path}: OpenVINO cannot read it ({why}); run it with --runtime onnxruntime") from None
    config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(graph, "CPU", config)


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


@dataclass
class ExportResult:
    path: Path | None  # None when the export failed its parity check and was not written
    parity: Parity
    report_path: Path | None
    seconds: float


def export_onnx(model: ResNet, path: str | os.PathLike, items: list, source: str, *, fp16: bool = False,
                with_preprocessing: bool = False, force: bool = False, extra: dict | None = None) -> ExportResult:
    """Export, check and compare on `items` (images from `source`); write `path` and PATH.parity.json only
    if the parity check passes, or with `force`."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: ONNX files end in .onnx")
    start = time.perf_counter()
    precision = "fp16" if fp16 else "fp32"
    tolerance = logit_tolerance(model, items, precision)
    report_path = path.with_suffix(".parity.json")
    try:
        with atomic_path(path) as tmp:
            write_onnx(model, tmp, fp16, with_preprocessing, extra)
            onnx.checker.check_model(str(tmp), full_check=True)
            result = parity(model, OnnxModel(tmp), items, source, tolerance)
            if not result.passed and not force:
                raise _Refused(result)
    except _Refused as refused:
        return ExportResult(None, refused.parity, None, time.perf_counter() - start)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{path}: the exported graph fails onnx.checker ({error})") from None
    report = {"model": str(path), "arch": model.arch, "precision": precision,
              "input": INPUT_UINT8 if with_preprocessing else INPUT_FLOAT, "opset": OPSET, **result.to_dict()}
    write_json(report_path, report)
    return ExportResult(path, result, report_path, time.perf_counter() - start)


class _Refused(Exception):
    """Unwinds atomic_path (removing the temporary file) when a parity check fails."""

    def __init__(self, parity_result: Parity):
        super().__init__("parity check failed")
        self.parity = parity_result


# What a model file's metadata says about its outputs, which an export of it keeps: a calibrated model's
# temperature is already in its classifier, and the ONNX file should say so as the model file does.
CARRIED_METADATA = ("temperature", "calibrated_on")


def export_metadata(model_path: str | os.PathLike) -> dict:
    """The `extra` metadata of an export of the model file at `model_path`: its name, and CARRIED_METADATA."""
    extra = read_metadata(model_path)["extra"]
    return {"source": Path(model_path).name, **{key: extra[key] for key in CARRIED_METADATA if key in extra}}


def training_data(model_path: str | os.PathLike) -> str | None:
    """The dataset a model file was trained on, if its training run is recorded and the data still exists."""
    data = (training_config(model_path) or {}).get("data")
    return data if data and Path(data).exists() else None
