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
import functools
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import RUNTIMES
from ..errors import ConfigError
from ..models import ResNet
from ..weights import ModelFileError
from .exported import (INPUT_FLOAT, INPUT_UINT8, ExportedModel, ExportError, ExportResult, checked_export, described,
                       export_fields, exportable)

OPSET = 18  # the torch.export-based exporter's own opset; lower ones need a lossy version conversion
INPUT, OUTPUT, FEATURES = "input", "logits", "features"
ONNX_FORMAT = "residual.onnx"


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
    set_metadata(proto, export_fields(model, ONNX_FORMAT, "fp16" if fp16 else "fp32", with_preprocessing, extra))
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
    opsets = ", ".join(f"{entry.domain or 'ai.onnx'} {entry.version}" for entry in model.opset_import
                       if entry.domain in ("", "com.microsoft"))
    [graph_input] = graph.input
    tensor = graph_input.type.tensor_type
    shape = " x ".join(d.dim_param or str(d.dim_value) for d in tensor.shape.dim)
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    quantized = f", quantized for {meta['quantized_for']}" if "quantized_for" in meta else ""
    features = (f"'{FEATURES}', the pooled features (for --feature-bank)" if FEATURES in
                [output.name for output in graph.output] else "none (exported before the graph gave them)")
    return described(meta, {
        "precision": meta["precision"] + quantized,
        "input": f"'{graph_input.name}', {onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)} {shape} "
                 f"({meta['input']})",
        "features": features,
        "weights": f"{stored:,} stored values, file {path.stat().st_size / 1e6:.2f} MB",
        "opset": opsets}, known=("quantized_for",))


class OnnxModel(ExportedModel):
    """An exported model run by ONNX Runtime or OpenVINO, with the interface evaluate and predict use.
    `bf16`: OpenVINO computes in bfloat16 (its inputs and outputs stay float32)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None,
                 runtime: str = "onnxruntime", bf16: bool = False):
        if runtime not in RUNTIMES:
            raise ConfigError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
        if bf16 and runtime != "openvino":
            raise ConfigError(f"{path}: ONNX Runtime runs it in the precision it was exported with; bfloat16 "
                              f"is OpenVINO's (--runtime openvino)")
        self.runtime, self.bf16 = runtime, bf16
        meta = read_onnx_metadata(path)
        if bf16 and meta["precision"] != "fp32":
            raise ConfigError(f"--precision bf16: {path} is an {meta['precision']} model; OpenVINO computes bf16 "
                              f"from an fp32 export")
        super().__init__(Path(path), meta)
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

    def run(self, array: np.ndarray, features: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Logits for an array already in the graph's input format; with `features`, and the pooled features."""
        names = [OUTPUT, FEATURES] if features else [OUTPUT]
        if self.runtime == "openvino":
            if getattr(self.per_thread, "request", None) is None:
                self.per_thread.request = self.compiled.create_infer_request()
            outputs = self.per_thread.request.infer(array)
            # OpenVINO's inference request runs one inference at a time: one per thread.
            answers = [outputs[self.compiled.output(name)] for name in names]
        else:
            answers = self.session.run(names, {INPUT: array})
        return tuple(answers) if features else answers[0]

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


def export_onnx(model: ResNet, path: str | os.PathLike, items: list, source: str, *, fp16: bool = False,
                with_preprocessing: bool = False, force: bool = False, extra: dict | None = None) -> ExportResult:
    """Export, check and compare on `items` (images from `source`); write `path` and PATH.parity.json only
    if the parity check passes, or with `force`."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: ONNX files end in .onnx")

    def write(tmp: Path) -> None:
        write_onnx(model, tmp, fp16, with_preprocessing, extra)
        onnx.checker.check_model(str(tmp), full_check=True)

    try:
        return checked_export(model, path, items, source, "fp16" if fp16 else "fp32", force, write, OnnxModel,
                              {"input": INPUT_UINT8 if with_preprocessing else INPUT_FLOAT, "opset": OPSET})
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{path}: the exported graph fails onnx.checker ({error})") from None
