"""The training images' features, kept to tell whether a new image looks like any of them.

Sun et al. (2022, "Out-of-distribution detection with deep nearest neighbors") score an image
by the cosine similarity of its pooled features (the classifier layer's input) to its k-th most
similar training image's. An image of none of the classes has no close neighbour: where the
top class's probability can be fooled (a label-smoothed model was surer of noise than of its
own test images, docs/evaluation.md), the features were not.

`residual eval --unknown` measures it and writes a `feature_bank.safetensors`: the training
images' unit-length features, k, the floor (the similarity that keeps 95% of the evaluated
known images), and the classifier's weights, by which the bank knows its model: a bank is
refused for any other model, whose features mean something else. `predict` and `serve` take
it with `--feature-bank` and call an image below the floor unsure.

The features sit in one matrix and a query is one matrix product (queries x bank), chunked:
at the sizes a bank holds (10,000 training images at most) an index library (faiss) would add
a dependency for no measurable gain.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .errors import ResidualError

BANK_FORMAT = "residual.feature_bank"
# The classifier weights the bank was made with, to the precision a model may be run in (bf16 keeps ~3 digits).
SAME_CLASSIFIER_TOLERANCE = 1e-2


class FeatureBankError(ResidualError):
    """A feature bank that cannot be read, or that belongs to another model."""


def classifier_fingerprint(weight: torch.Tensor) -> str:
    """The sha256 of a classifier's float32 weights: how an exported model, whose weights may be float16 or
    INT8, names the classifier it was exported with."""
    return hashlib.sha256(weight.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class FeatureBank:
    features: torch.Tensor  # N x D, unit length, float32: the training images'
    k: int  # the k-th most similar training image scores a query
    floor: float  # below this similarity an image is called unsure
    classifier: torch.Tensor  # classes x D: the model's classifier weights, which identify it
    keep_known: float = 0.95  # the share of the known images the floor kept
    source: str = "the feature bank"  # its file, to name in messages

    @staticmethod
    def of(features, k: int, floor: float, model, keep_known: float = 0.95) -> FeatureBank:
        """A bank of raw pooled features (any scale) made with `model`."""
        rows = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
        return FeatureBank(rows, k, floor, model.fc.weight.detach().float().cpu(), keep_known)

    def similarity(self, features: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Per row of raw pooled features, the cosine similarity of its k-th most similar training image, on
        the features' device."""
        # Moved once, and kept where the queries are: a ResNet-50 bank is 82 MB, too much to copy per batch.
        self.features = self.features.to(features.device)
        bank = self.features
        k = min(self.k, len(bank))
        queries = F.normalize(features.float(), dim=1)
        return torch.cat([(queries[start:start + chunk] @ bank.T).topk(k, dim=1).values[:, -1]
                          for start in range(0, len(queries), chunk)])

    def check_model(self, model) -> None:
        """Refuse a model whose classifier is not the one the bank was made with: a PyTorch model's weights, to
        the precision it runs in, or the fingerprint an exported model's metadata holds of its float32 ones."""
        weight = getattr(getattr(model, "fc", None), "weight", None)
        if weight is None:  # an exported model (OnnxModel): its graph's second output gives the features
            if not getattr(model, "has_features", False):
                raise FeatureBankError(f"--feature-bank {self.source}: {model.path} gives no pooled features (an "
                                       f"export from before residual wrote them); export the model file again")
            if model.classifier_fingerprint != classifier_fingerprint(self.classifier):
                raise FeatureBankError(f"--feature-bank {self.source}: made with another model than {model.path} was "
                                       f"exported from (or with that model in bf16 or fp16); `residual eval "
                                       f"MODEL_FILE DATA --unknown FOLDER` in fp32 writes its bank")
            return
        weight = weight.detach().float().cpu()
        if weight.shape != self.classifier.shape or not torch.allclose(
                weight, self.classifier, rtol=SAME_CLASSIFIER_TOLERANCE, atol=SAME_CLASSIFIER_TOLERANCE * float(
                    self.classifier.abs().max())):
            raise FeatureBankError(f"--feature-bank {self.source}: made with another model (its classifier differs); "
                                   f"`residual eval MODEL DATA --unknown FOLDER` writes this model's")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        metadata = {"format": BANK_FORMAT, "k": str(self.k), "floor": json.dumps(self.floor),
                    "keep_known": json.dumps(self.keep_known)}
        with atomic_path(path) as tmp:
            safetensors.torch.save_file({"features": self.features.cpu().contiguous(),
                                         "classifier": self.classifier.contiguous()}, tmp, metadata=metadata)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> FeatureBank:
        path = Path(path)
        if not path.is_file():
            raise FeatureBankError(f"--feature-bank {path}: no such file")
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types for every malformed file
            raise FeatureBankError(f"--feature-bank {path}: not a readable safetensors file ({error})") from None
        if metadata.get("format") != BANK_FORMAT or set(tensors) != {"features", "classifier"}:
            raise FeatureBankError(f"--feature-bank {path}: not a feature bank (`residual eval MODEL DATA --unknown "
                                   f"FOLDER` writes one)")
        return FeatureBank(tensors["features"].float(), int(metadata["k"]), json.loads(metadata["floor"]),
                           tensors["classifier"].float(), json.loads(metadata["keep_known"]), str(path))
