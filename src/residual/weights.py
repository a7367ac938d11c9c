"""Model files, foreign checkpoints, and the pretrained-weight registry with its cache.

- A model file is one .safetensors file: the tensors plus metadata (architecture
  and its full config, class names, preprocessing, versions). Loading it never
  unpickles anything.
- Foreign checkpoints (torchvision, timm, a training script's .pth) are read with
  torch.load(weights_only=True) or safetensors; `module.` and `_orig_mod.` prefixes
  and the usual {"state_dict": ...} wrappers are handled. A checkpoint whose
  classifier does not fit loads its backbone and says so.
- Pretrained weights are downloaded once into RESIDUAL_HOME (default
  ~/.cache/residual), sha256-checked and written atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import http.client
import json
import logging
import os
import pickle
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .atomic import atomic_path, put_in_place
from .errors import ResidualError
from .models import Preprocessing, ResNet, ResNetConfig, build_model
from .models.preprocessing import IMAGENET_EVAL
from .models.resnet import MULTI_LABEL_THRESHOLD

log = logging.getLogger(__name__)

MODEL_FORMAT = "residual.model"
FORMAT_VERSION = "1"
HEAD_KEYS = ("fc.weight", "fc.bias")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
PREFIXES = ("module.", "_orig_mod.")


class ModelFileError(ResidualError):
    """A file that is missing, unreadable, or not what it claims to be."""


class UnsafeCheckpointError(ModelFileError):
    """A pickle that holds more than tensors and plain data."""


class CheckpointMismatchError(ModelFileError):
    """A checkpoint whose tensors do not fit the model."""


class DownloadError(ResidualError):
    """A file that could not be fetched, or arrived with the wrong hash."""


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (torchvision's short names)."""
    text = resources.files("residual").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


# --- model files -----------------------------------------------------------------------------

def save_model(model: ResNet, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write `model` (weights, config, class names, preprocessing) to one .safetensors file.

    `extra` is any JSON-able provenance (training run, metrics) kept in the metadata.
    The write is atomic: an existing file at `path` is replaced only when the new one is complete.
    """
    from . import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"{path}: model files end in .safetensors")
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "config": json.dumps(model.config.to_dict()),
        "class_names": json.dumps(model.class_names),
        "preprocessing": json.dumps(asdict(model.preprocessing)),
        "multi_label": json.dumps(bool(model.multi_label)),
        "threshold": json.dumps(model.threshold),
        "extra": json.dumps(extra or {}),
        "residual_version": __version__,
        "torch_version": torch.__version__,
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a model file, JSON fields decoded. Reads the header only."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.is_file():
        raise ModelFileError(_not_a_model_file(path))
    raw = _safetensors_metadata(path)
    if raw.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: a safetensors file, but not a residual model file (no '{MODEL_FORMAT}' "
                             f"metadata)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file format {raw.get('format_version')!r} is not supported by this "
                             f"version (expects {FORMAT_VERSION}); upgrade residual")
    # A file written before multi-label models existed holds a single-label model.
    decoded = {"multi_label": "false", "threshold": json.dumps(MULTI_LABEL_THRESHOLD), **raw}
    for key in ("config", "class_names", "preprocessing", "extra", "multi_label", "threshold"):
        decoded[key] = json.loads(decoded[key])
    return decoded


def training_config(model_path: str | os.PathLike) -> dict | None:
    """The config.yaml of the run that trained a model file (data, split, seed...), if the file records its
    run and the run's folder is still there."""
    path = Path(model_path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    run = read_metadata(path)["extra"].get("run")
    config = Path(run) / "config.yaml" if run else None
    if config is None or not config.is_file():
        return None
    return yaml.safe_load(config.read_text(encoding="utf-8")) or {}


def refuse_folder(path: Path) -> None:
    """A folder given where a model file belongs (arguments in the wrong order, or a run folder) named as one."""
    if path.is_dir():
        raise ModelFileError(f"{path}: a run folder; its model is {path / 'model.safetensors'}"
                             if (path / "model.safetensors").is_file() else
                             f"{path}: a folder, not a model file (a command takes the model first, then the "
                             f"images or data)")


def _safetensors_metadata(path: Path) -> dict:
    refuse_folder(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for every malformed header
        raise ModelFileError(f"{path}: not a readable safetensors file ({error})") from None


def load_model(source: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
               class_names: list[str] | str | None = None, device: str | torch.device = "cpu", **options) -> ResNet:
    """A model from a residual model file, a foreign checkpoint, or a pretrained name.

    - `model.safetensors` written by save_model: everything comes from the file.
    - A torchvision/timm checkpoint (.pth, .pt, .bin or .safetensors): give `arch`
      (e.g. "resnet50"); the number of classes is read from its classifier.
    - A pretrained name such as "resnet50.tv2_in1k": downloaded once, then cached.
    `num_classes` different from the file's keeps the backbone and gives a fresh head.
    `class_names` ("imagenet" or a list) names the outputs of a foreign checkpoint.
    `options`: ResNetConfig fields that override the file's, e.g. drop_rate=0.2 for fine-tuning.
    The model comes in eval mode, ready to predict as a loaded Keras model is (`model(x)` in PyTorch's
    default training mode would normalise with the batch's statistics); `.train()` before training it.
    """
    path = Path(source)
    if num_classes is not None:
        options["num_classes"] = num_classes
    if not path.exists() and str(source) in _PRETRAINED:
        return create_model(str(source), pretrained=True, **options).to(device).eval()
    if path.suffix == ".onnx":  # `residual export`'s output: a graph for ONNX Runtime, not weights for PyTorch
        raise ModelFileError(f"{path}: an exported ONNX model, which runs in ONNX Runtime (or OpenVINO) only; give "
                             f"the .safetensors model file it was exported from")
    if path.suffix == ".pte":
        raise ModelFileError(f"{path}: an exported ExecuTorch program, which runs in ExecuTorch only; give the "
                             f".safetensors model file it was exported from")
    if path.suffix == ".safetensors" and _safetensors_metadata(path).get("format") == MODEL_FORMAT:
        model = _load_model_file(path, options)
    else:
        refuse_folder(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file, and not a pretrained name (`residual pretrained` lists them)")
        if arch is None:
            raise ModelFileError(_not_a_model_file(path))
        state = read_state_dict(path)
        file_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 0
        model = build_model(arch, **{"num_classes": file_classes, **options})
        load_weights(model, state, str(path))
    if class_names is not None:
        model.class_names = _resolve_class_names(class_names, model.num_classes, str(path))
    return model.to(device).eval()


def _not_a_model_file(path: Path) -> str:
    """Why `path`, not a residual model file, names no architecture, and what to give instead."""
    run_model = path.parent / "model.safetensors"
    if path.suffix == ".pt" and (path.parent / "config.yaml").is_file() and run_model.is_file():
        return f"{path}: a training checkpoint, which --resume continues from; the run's model file is {run_model}"
    return (f"{path}: not a residual model file, so its architecture is unknown; for a torchvision/timm checkpoint "
            f"run `residual convert {path} --arch resnet50` (or load_model(..., arch='resnet50')), naming its "
            f"architecture")


def _load_model_file(path: Path, options: dict) -> ResNet:
    meta = read_metadata(path)
    config = ResNetConfig.from_dict({**meta["config"], **options})
    new_head = config.num_classes != meta["config"]["num_classes"]
    model = ResNet(config, arch=meta["arch"], class_names=None if new_head else meta["class_names"],
                   preprocessing=Preprocessing(**meta["preprocessing"]))
    # Per-class thresholds belong to the file's classes: a new head starts from the default.
    model.multi_label = meta["multi_label"]
    model.threshold = MULTI_LABEL_THRESHOLD if new_head and isinstance(meta["threshold"], list) else meta["threshold"]
    load_weights(model, safetensors.torch.load_file(path), str(path))
    return model


def _resolve_class_names(class_names: list[str] | str, num_classes: int, source: str) -> list[str]:
    names = list(imagenet_class_names()) if class_names == "imagenet" else list(class_names)
    if len(names) != num_classes:
        raise ModelFileError(f"{source}: {len(names)} class names given for a model with {num_classes} classes")
    return names


# --- foreign checkpoints ---------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors or a PyTorch checkpoint, prefixes stripped.

    PyTorch files are loaded with weights_only=True: a pickle that would build
    arbitrary Python objects (and so could run code) is refused, not executed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        _safetensors_metadata(path)  # a clear error for a malformed file
        state = safetensors.torch.load_file(path)
    else:
        state = _find_state_dict(load_torch_file(path), path)
    return {_strip_prefixes(name): tensor for name, tensor in state.items()}


def load_torch_file(path: Path) -> object:
    """What a PyTorch file (.pt, .pth, .bin) holds, loaded on the CPU with weights_only=True; a file that is damaged or
    would unpickle more than tensors and plain data is a one-line ModelFileError (UnsafeCheckpointError)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only names the first global it refused (in other words where its module is blocked outright, as
        # os.system's is); garbage fails differently.
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(error))
        if refused:
            raise UnsafeCheckpointError(
                f"{path}: refused: it asks to import {refused.group(1)}, and unpickling objects beyond tensors "
                f"and plain data could run code. If you trust it, re-save only its state_dict, ideally as "
                f".safetensors") from None
        raise ModelFileError(f"{path}: not a readable PyTorch checkpoint (unpickling failed)") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        # torch's zip reader adds a paragraph of advice after its first sentence
        reason = str(error).strip().splitlines()[0].split(". ")[0]
        raise ModelFileError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def _find_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    def is_state_dict(candidate: object) -> bool:
        return isinstance(candidate, dict) and bool(candidate) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in candidate.items())

    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if is_state_dict(obj.get(key)):
                return obj[key]
        keys = ", ".join(map(str, list(obj)[:8]))
        raise ModelFileError(f"{path}: no state dict found (top-level keys: {keys}); expected tensors by name "
                             f"or one of {WRAPPER_KEYS}")
    raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")


def _strip_prefixes(name: str) -> str:
    # DataParallel/DDP add "module.", torch.compile "_orig_mod.", in either order.
    while name.startswith(PREFIXES):
        name = name.removeprefix(PREFIXES[0]) if name.startswith(PREFIXES[0]) else name.removeprefix(PREFIXES[1])
    return name


def load_weights(model: ResNet, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `state` into `model`; return notes on what was not loaded.

    The classifier may differ (other class count, or none on either side): the
    backbone loads and the head keeps its fresh initialisation, with a note.
    Any other difference fails with one message listing missing, unexpected and
    wrongly shaped tensors.
    """
    state = {_strip_prefixes(name): tensor for name, tensor in state.items()}
    own = model.state_dict()
    notes = []
    head_fits = all(k in state and state[k].shape == own[k].shape for k in HEAD_KEYS if k in own) and not any(
        k in state and k not in own for k in HEAD_KEYS)
    optional = {k for k in own if k.endswith("num_batches_tracked")}  # absent from older torchvision files
    if not head_fits:
        file_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 0
        state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
        optional |= set(HEAD_KEYS)
        notes.append(f"{source}: classifier not loaded (file has {file_classes or 'no'} classes, model has "
                     f"{model.num_classes or 'no classifier'}); the head is freshly initialised")
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} file {list(state[k].shape)} vs model {list(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        kinds = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        parts = [f"{label} ({len(items)}): {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
                 for label, items in kinds if items]
        raise CheckpointMismatchError(f"{source} does not fit {model.arch}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    for note in notes:
        log.warning(note)
    return notes


# --- pretrained registry and cache -----------------------------------------------------------

@dataclass(frozen=True)
class PretrainedWeights:
    """A published checkpoint: where it lives and what it expects."""

    name: str  # "arch.tag", e.g. "resnet50.tv2_in1k"
    url: str
    sha256: str  # the full digest, or the prefix the publisher gives (torchvision: 8 hex digits in the file name)
    top1: float | None  # ImageNet-1k top-1 (%) as reported by the publisher
    preprocessing: Preprocessing
    source: str
    classes: str = "imagenet"

    @property
    def arch(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_PRETRAINED: dict[str, PretrainedWeights] = {}


def register_pretrained(weights: PretrainedWeights) -> None:
    """Add (or replace) a pretrained entry, e.g. for a team's own weights server."""
    if len(weights.sha256) < 8:
        raise ResidualError(f"{weights.name}: a sha256 (or at least its first 8 hex digits) is required")
    _PRETRAINED[weights.name] = weights


_TV = "https://download.pytorch.org/models/"
_TV_V1_EVAL = IMAGENET_EVAL  # resize 256, crop 224
_TV_V2_EVAL = Preprocessing(input_size=224, resize_size=232)
# (name, torchvision file, top-1 it reports, torchvision's weight name, evaluation preprocessing)
_TORCHVISION_WEIGHTS = [
    ("resnet18.tv_in1k", "resnet18-f37072fd.pth", 69.758, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("resnet34.tv_in1k", "resnet34-b627a593.pth", 73.314, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("resnet50.tv_in1k", "resnet50-0676ba61.pth", 76.130, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("resnet50.tv2_in1k", "resnet50-11ad3fa6.pth", 80.858, "IMAGENET1K_V2", _TV_V2_EVAL),
    ("resnet101.tv_in1k", "resnet101-63fe2227.pth", 77.374, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("resnet101.tv2_in1k", "resnet101-cd907fc2.pth", 81.886, "IMAGENET1K_V2", _TV_V2_EVAL),
    ("resnet152.tv_in1k", "resnet152-394f9c45.pth", 78.312, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("resnet152.tv2_in1k", "resnet152-f82ba261.pth", 82.284, "IMAGENET1K_V2", _TV_V2_EVAL),
    ("resnext50_32x4d.tv_in1k", "resnext50_32x4d-7cdf4587.pth", 77.618, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("resnext50_32x4d.tv2_in1k", "resnext50_32x4d-1a0047aa.pth", 81.198, "IMAGENET1K_V2", _TV_V2_EVAL),
    ("resnext101_32x8d.tv_in1k", "resnext101_32x8d-8ba56ff5.pth", 79.312, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("resnext101_32x8d.tv2_in1k", "resnext101_32x8d-110c445d.pth", 82.834, "IMAGENET1K_V2", _TV_V2_EVAL),
    ("resnext101_64x4d.tv_in1k", "resnext101_64x4d-173b62eb.pth", 83.246, "IMAGENET1K_V1", _TV_V2_EVAL),
    ("wide_resnet50_2.tv_in1k", "wide_resnet50_2-95faca4d.pth", 78.468, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("wide_resnet50_2.tv2_in1k", "wide_resnet50_2-9ba9bcbe.pth", 81.602, "IMAGENET1K_V2", _TV_V2_EVAL),
    ("wide_resnet101_2.tv_in1k", "wide_resnet101_2-32ee1156.pth", 78.848, "IMAGENET1K_V1", _TV_V1_EVAL),
    ("wide_resnet101_2.tv2_in1k", "wide_resnet101_2-d733dc28.pth", 82.510, "IMAGENET1K_V2", _TV_V2_EVAL),
]
for _name, _file, _top1, _tv_name, _eval in _TORCHVISION_WEIGHTS:
    # torchvision's file names end in the first 8 hex digits of the file's sha256.
    _hash = _file.rsplit("-", 1)[1].removesuffix(".pth")
    register_pretrained(PretrainedWeights(_name, _TV + _file, _hash, _top1, _eval, f"torchvision {_tv_name}"))


def list_pretrained(pattern: str = "*") -> list[PretrainedWeights]:
    """The entries whose name ("arch.tag") or architecture matches the shell-style `pattern`."""
    return [w for name, w in _PRETRAINED.items() if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(w.arch, pattern)]


def get_pretrained(name: str) -> PretrainedWeights:
    """The entry for "arch.tag", or for a bare arch the one with the best reported top-1."""
    if name in _PRETRAINED:
        return _PRETRAINED[name]
    candidates = [w for w in _PRETRAINED.values() if w.arch == name]
    if not candidates:
        raise ResidualError(f"no pretrained weights named {name!r}; `residual pretrained` lists them")
    return max(candidates, key=lambda w: w.top1 or 0.0)


def cache_dir() -> Path:
    """Where downloads live: $RESIDUAL_HOME/weights (default ~/.cache/residual/weights)."""
    return Path(os.environ.get("RESIDUAL_HOME") or "~/.cache/residual").expanduser() / "weights"


def fetch_pretrained(name: str, progress: bool | None = None) -> Path:
    """The local file of a pretrained entry, downloaded (and verified) on first use.

    RESIDUAL_WEIGHTS_MIRROR, if set, replaces the publisher's host: files are
    fetched from MIRROR/<file name> and still checked against the published hash.
    """
    weights = get_pretrained(name)
    mirror = os.environ.get("RESIDUAL_WEIGHTS_MIRROR")
    url = f"{mirror.rstrip('/')}/{weights.filename}" if mirror else weights.url
    return download(url, cache_dir() / weights.filename, weights.sha256, progress=progress)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


DOWNLOAD_TRIES = 5  # connections per download: one that breaks off is picked up where it stopped


def download(url: str, destination: Path, sha256: str, progress: bool | None = None) -> Path:
    """Fetch `url` to `destination` unless a file with the right hash is already there.

    The file's sha256 must start with `sha256` (a full digest or a published prefix).
    Nothing is left at `destination` unless the whole file arrived and matched. The bytes come into
    `.NAME.partial` beside it: a connection that breaks off is asked for the rest (an HTTP range request),
    up to DOWNLOAD_TRIES connections, and a download stopped (Ctrl-C, a lost network) goes on from there
    the next time. Two processes fetching one file (a distributed run's workers) take turns: the second
    finds it done.
    """
    destination = Path(destination)
    if _cached(destination, sha256):
        return destination
    partial = destination.with_name(f".{destination.name}.partial")
    show = sys.stderr.isatty() if progress is None else progress
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "ab") as out, _taking_turns(out):
            if _cached(destination, sha256, quiet=True):  # fetched by another process while this one waited
                if not os.fstat(out.fileno()).st_size:  # the partial file this one opened after the other's went
                    partial.unlink(missing_ok=True)
                return destination
            _fetch(url, out, destination.name, show)
            out.flush()  # still open: closing it would let the next process in before the file is in place
            _check_and_put_in_place(url, partial, destination, sha256)  # before the next process takes its turn
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        if isinstance(error, urllib.error.HTTPError):
            reason = f"HTTP {error.code} {error.reason}"
        else:
            reason = getattr(error, "reason", None) or error
        kept = partial.stat().st_size if partial.exists() else 0
        if not kept:
            partial.unlink(missing_ok=True)
        resume = (f"; the {kept / 2**20:.1f} MB that came are kept in {partial}, and the next try goes on from "
                  f"there" if kept else "")
        raise DownloadError(f"cannot download {url} ({reason}){resume}. Without network access, fetch that file "
                            f"elsewhere and put it at {destination}") from None
    return destination


def _check_and_put_in_place(url: str, partial: Path, destination: Path, sha256: str) -> None:
    digest = sha256_of(partial)
    if not digest.startswith(sha256):
        partial.unlink()
        raise DownloadError(f"{url}: sha256 {digest[:16]}... does not match the published {sha256}: the download "
                            f"is corrupt or the file changed; nothing was saved")
    put_in_place(partial, destination)


def _cached(destination: Path, sha256: str, quiet: bool = False) -> bool:
    if not destination.is_file():
        return False
    if sha256_of(destination).startswith(sha256):
        return True
    if not quiet:
        log.warning("%s: cached file does not match sha256 %s; downloading it again", destination, sha256)
    return False


def _fetch(url: str, out, name: str, show: bool) -> None:
    """Append `url`'s bytes to the file `out` (opened to append) from where it ends, connecting again where a
    connection breaks off; raises the last error once DOWNLOAD_TRIES connections have failed."""
    for attempt in range(1, DOWNLOAD_TRIES + 1):
        have = out.seek(0, os.SEEK_END)
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:  # the server sends the whole file, not the rest
                    out.truncate(0)
                    have = 0
                length = int(response.headers.get("Content-Length") or 0) or None
                with _download_bar(name, have + length if length else None, have, show) as advance:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        advance(len(chunk))
                out.flush()
                # A connection closed early ends the read without an error: the length says whether all came.
                if length is None or out.tell() - have >= length:
                    return
                raise ConnectionError(f"the connection ended after {out.tell() / 2**20:.1f} of "
                                      f"{(have + length) / 2**20:.1f} MB")
        except urllib.error.HTTPError as error:
            if error.code != 416:  # 416: the range asked for is past the end: the partial file is whole
                raise
            return
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, reset, cut short
            if attempt == DOWNLOAD_TRIES or out.tell() == have:  # no progress: the server is not there
                raise
            log.warning("%s: %s; asking for the rest (try %d of %d)", url, getattr(error, "reason", None) or error,
                        attempt + 1, DOWNLOAD_TRIES)


@contextlib.contextmanager
def _taking_turns(file) -> Iterator[None]:
    """Held while this process downloads into `file`: another waits for it (flock), rather than writing the same
    partial file at once. Where the file system has no locks, the download goes unguarded."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fcntl.flock(file, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
            raise
    yield  # released when the file is closed


@contextlib.contextmanager
def _download_bar(label: str, total: int | None, done: int, show: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar (size, rate, ETA) on stderr, from `done` bytes; yields the function that advances it."""
    if not show:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


# --- creating models -------------------------------------------------------------------------

def create_model(name: str, pretrained: bool | None = None, **options) -> ResNet:
    """A model by registry name, optionally with pretrained weights.

    "resnet50" is freshly initialised; "resnet50.tv2_in1k" (or "resnet50" with
    pretrained=True, which picks the best published weights) loads ImageNet
    weights, its class names and its preprocessing. Options override the
    architecture: num_classes gives a fresh head on the pretrained backbone,
    in_chans adapts the first convolution (summed for 1 channel, as timm does).
    """
    arch, _, tag = name.partition(".")
    if pretrained is None:
        pretrained = bool(tag)
    if not pretrained:
        return build_model(arch, **options)
    weights = get_pretrained(name if tag else arch)
    model = build_model(arch, **options)
    state = read_state_dict(fetch_pretrained(weights.name))
    _adapt_input_channels(state, model.config.in_chans)
    load_weights(model, state, weights.name)
    names = imagenet_class_names()
    model.class_names = list(names) if model.num_classes == len(names) else None
    model.preprocessing = weights.preprocessing
    return model


def pretrained_source(source: str) -> tuple[str | None, Preprocessing | None]:
    """The architecture and preprocessing a fine-tuning source carries.

    A pretrained name or a residual model file says both; a foreign checkpoint says
    neither (None, None), so the caller must name the architecture.
    """
    path = Path(source)
    if not path.exists():
        weights = get_pretrained(source)
        return weights.arch, weights.preprocessing
    refuse_folder(path)
    if path.suffix == ".safetensors" and _safetensors_metadata(path).get("format") == MODEL_FORMAT:
        meta = read_metadata(path)
        return meta["arch"], Preprocessing(**meta["preprocessing"])
    return None, None


def load_for_finetuning(source: str, arch: str | None, num_classes: int, **options) -> ResNet:
    """A pretrained backbone with a fresh head for `num_classes`; keeps the source's preprocessing.
    `options`: ResNetConfig fields for the fine-tuned net (drop_rate...)."""
    if not Path(source).exists():
        return create_model(source, pretrained=True, num_classes=num_classes, **options)
    return load_model(source, arch=arch, num_classes=num_classes, **options)


def _adapt_input_channels(state: dict[str, torch.Tensor], in_chans: int) -> None:
    key = "conv1.weight" if "conv1.weight" in state else "conv1.0.weight"
    weight = state[key]
    if weight.shape[1] == in_chans:
        return
    rgb = weight.float()
    if in_chans == 1:
        adapted = rgb.sum(dim=1, keepdim=True)
    else:  # repeat the RGB filters and rescale so activations keep their size
        repeats = -(-in_chans // rgb.shape[1])
        adapted = rgb.repeat(1, repeats, 1, 1)[:, :in_chans] * (rgb.shape[1] / in_chans)
    state[key] = adapted.to(weight.dtype)
