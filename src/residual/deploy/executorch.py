"""ExecuTorch export (.pte, for apps on phones and other edge devices), and ExecuTorch's runtime behind the
interface evaluate and predict use.

`export_executorch` takes the graph the ONNX export computes (logits and pooled features; optionally
uint8 pixels in) through torch.export to an ExecuTorch program whose operators are delegated to XNNPACK,
ExecuTorch's optimised CPU backend for Arm and x86. ExecuTorch plans all memory ahead, for a bound on the
batch: `max_batch` images (1 by default: an app classifies a photo at a time). The metadata an ONNX
export carries (class names, preprocessing, outputs) is a second method of the program,
`residual_metadata`, returning it as JSON, so the one file is all an app needs. The program is run by
ExecuTorch's runtime in this process on real images against the PyTorch model and written only if it
matches (unless forced), with PATH.parity.json beside it.

`ExecuTorchModel` runs such a file on the CPU, batches split to the bound, so that eval, predict and serve
measure what the app will run.

ExecuTorch is optional: pip install executorch (or residual[executorch]).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models import ResNet
from ..weights import ModelFileError
from .exported import (INPUT_FLOAT, INPUT_UINT8, ExportedModel, ExportError, ExportResult, checked_export, described,
                       export_fields, exportable)

PTE_FORMAT = "residual.pte"
METADATA_METHOD = "residual_metadata"  # the program's method that returns the metadata as JSON
BACKEND = "XNNPACK"


@contextlib.contextmanager
def _native_output_held():
    """ExecuTorch prints what it reads of the CPU (cpuinfo lines) when XNNPACK starts, through Python's stderr
    or the process's, and torchao logs the CUDA kernels a CPU build lacks: held back, and shown only if the call
    fails."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held, contextlib.redirect_stderr(io.StringIO()) as python_held:
        os.dup2(held.fileno(), 2)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.__stderr__.write(held.read().decode(errors="replace") + python_held.getvalue())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _runtime():
    try:
        with _native_output_held():
            from executorch.runtime import Runtime
    except ImportError as error:
        raise _not_installed(error) from None
    return Runtime.get()


def _not_installed(error: ImportError) -> ConfigError:
    """What to install, naming the module that was missing (ExecuTorch itself, or a part it needs)."""
    return ConfigError(f"ExecuTorch cannot be imported (no module {error.name!r}): pip install executorch (or "
                       f"residual[executorch])")


def write_executorch(model: ResNet, path: Path, max_batch: int = 1, with_preprocessing: bool = False,
                     extra: dict | None = None, calibration: Iterable[torch.Tensor] | None = None) -> None:
    """Lower `model` to an ExecuTorch program for XNNPACK at `path` (not checked; export_executorch is the
    checked way), with residual's metadata as its `residual_metadata` method. With `calibration` (batches
    as the graph takes them) it is INT8, quantized by XNNPACK's quantizer."""
    with _native_output_held():
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
        except ImportError as error:
            raise _not_installed(error) from None
    size = model.preprocessing.input_size
    # The example is a batch at the bound: ExecuTorch 1.5.1 planned memory for 15 images from an example of 5
    # with a bound of 32, and refused a batch of 32 at run time.
    example = (torch.zeros(max_batch, size, size, 3, dtype=torch.uint8) if with_preprocessing
               else torch.zeros(max_batch, model.config.in_chans, size, size))
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if max_batch > 1 else None
    net = exportable(model, with_preprocessing=with_preprocessing)
    with _native_output_held():
        if calibration is not None:
            net = _quantized(net, calibration)
        metadata = export_fields(model, PTE_FORMAT, "fp32" if calibration is None else "int8", with_preprocessing,
                                 {**(extra or {}), "max_batch": max_batch, "backend": BACKEND})
        program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                              constant_methods={METADATA_METHOD: json.dumps(metadata)})
        path.write_bytes(lowered.to_executorch().buffer)


def _quantized(net: torch.nn.Module, calibration: Iterable[torch.Tensor]) -> torch.nn.Module:
    """`net` quantized for XNNPACK, as ExecuTorch's own examples do (PT2E): int8 weights per output channel and
    int8 activations, their ranges set by a histogram of what each sees on the `calibration` batches."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ExportError("no calibration images could be read")
    # Traced with a batch of two or more: a batch of one would be taken for a constant size.
    example = first if len(first) > 1 else torch.cat([first, first])
    graph = torch.export.export(net, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    observed = prepare_pt2e(graph.module(), quantizer)
    with torch.no_grad():
        for batch in itertools.chain([first], batches):
            observed(batch)
    return convert_pt2e(observed)


class ExecuTorchModel(ExportedModel):
    """A .pte file residual exported, run by ExecuTorch's runtime (XNNPACK on the CPU), with the interface
    evaluate and predict use."""

    runtime, bf16 = "executorch", False
    # XNNPACK prints its start-up once per process: only the first method loaded needs its output held, which
    # redirects the process's stderr, so that later loads (a server's threads) leave other threads' lines alone.
    xnnpack_started = False

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file")
        runtime = _runtime()
        # The program's methods read the file's bytes and the program where they are: both are kept.
        self.data = path.read_bytes()
        try:
            with _native_output_held():
                self.program = runtime.load_program(self.data)
                meta = None
                if METADATA_METHOD in self.program.method_names:
                    meta = json.loads(self.program.load_method(METADATA_METHOD).execute([])[0])
        except (RuntimeError, ValueError) as error:
            raise ModelFileError(f"{path}: not a readable ExecuTorch program ({error})") from None
        if not isinstance(meta, dict) or meta.get("residual.format") != PTE_FORMAT:
            raise ModelFileError(f"{path}: an ExecuTorch program, but not one exported by residual (it has no class "
                                 f"names or preprocessing); export the model with `residual export --format "
                                 f"executorch`")
        super().__init__(path, meta)
        self.max_batch = json.loads(meta["max_batch"])
        self.runtime_text = f"ExecuTorch {'INT8' if self.precision == 'int8' else self.precision} ({BACKEND})"
        self.num_classes = len(self.class_names)
        self.has_features = True
        self._forward()  # in the constructing thread, which is where XNNPACK starts

    def _forward(self):
        """This thread's forward method: one runs one inference at a time, in memory planned for it."""
        method = getattr(self.per_thread, "forward", None)
        if method is None:
            started = ExecuTorchModel.xnnpack_started
            with contextlib.nullcontext() if started else _native_output_held():
                method = self.per_thread.forward = self.program.load_method("forward")
            ExecuTorchModel.xnnpack_started = True
        return method

    def run(self, array: np.ndarray, features: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Logits for an array already in the graph's input format, `max_batch` images per call; with
        `features`, and the pooled features."""
        forward, logits, pooled = self._forward(), [], []
        for start in range(0, len(array), self.max_batch):
            outputs = forward.execute([torch.from_numpy(np.ascontiguousarray(array[start:start + self.max_batch]))])
            # The outputs live in the method's planned memory, which the next call writes over.
            logits.append(outputs[0].numpy().copy())
            pooled.append(outputs[1].numpy().copy())
        answers = np.concatenate(logits), np.concatenate(pooled)
        return answers if features else answers[0]


def describe_pte(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(field, value) rows of what `residual info` shows of an ExecuTorch export."""
    model = ExecuTorchModel(path)
    meta, size = model.metadata, model.preprocessing.input_size
    shape = f"N x {size} x {size} x 3" if model.input_format == INPUT_UINT8 else f"N x 3 x {size} x {size}"
    dtype = "uint8" if model.input_format == INPUT_UINT8 else "float32"
    return described(meta, {
        "input": f"{dtype} {shape}, N up to {model.max_batch} ({model.input_format})",
        "features": "the second output, the pooled features (for --feature-bank)",
        "runtime": f"ExecuTorch, operators delegated to {json.loads(meta['backend'])}: methods "
                   f"{', '.join(sorted(model.program.method_names))}",
        "file": f"{model.path.stat().st_size / 1e6:.2f} MB"}, known=("max_batch", "backend"))


def export_executorch(model: ResNet, path: str | os.PathLike, items: list, source: str, *, max_batch: int = 1,
                      with_preprocessing: bool = False, force: bool = False,
                      extra: dict | None = None) -> ExportResult:
    """Export to ExecuTorch, run it on `items` (images from `source`) against `model`; write `path` and
    PATH.parity.json only if the parity check passes, or with `force`."""
    path = Path(path)
    if path.suffix != ".pte":
        raise ExportError(f"{path}: ExecuTorch programs end in .pte")
    if max_batch < 1:
        raise ExportError(f"--max-batch must be 1 or more, got {max_batch}")
    return checked_export(model, path, items, source, "fp32", force,
                          lambda tmp: write_executorch(model, tmp, max_batch, with_preprocessing, extra),
                          ExecuTorchModel, {"backend": BACKEND, "input": INPUT_UINT8 if with_preprocessing else
                                            INPUT_FLOAT, "max_batch": max_batch})
