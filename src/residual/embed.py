"""Image features from a ResNet's pooled penultimate layer (include_top=False), and retrieval by them.

`embed` turns images into one feature vector each (the model's `pre_logits`), using the
preprocessing stored with the model; `similar` ranks a gallery folder by cosine
similarity to a query image: the retrieval / face-recognition use of ResNet features.
An unreadable file is skipped and reported, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from .data.datasets import input_images
from .data.decode import BadImageError
from .data.loaders import inference_batches
from .data.transforms import normalize
from .errors import ResidualError
from .models import ResNet
from .progress import progress_bar


class EmbedError(ResidualError):
    """Nothing to compute features of: no image files, or a gallery that is not a folder of them."""


@dataclass
class Embeddings:
    features: np.ndarray  # N x D, float32, one row per readable image
    paths: list[Path]  # the image of each row
    failed: list[str] = field(default_factory=list)  # one message per unreadable file


@torch.inference_mode()
def embed(model: ResNet, sources: list[str | Path], batch_size: int = 64, progress: bool = False) -> Embeddings:
    """Pooled features of every image, in the order given; unreadable files listed in `failed`."""
    model.eval()
    device = next(model.parameters()).device
    pre = model.preprocessing
    files = input_images(sources)
    if not files:
        raise EmbedError(f"no image files in {' '.join(map(str, sources))}")
    rows, kept, failed = [], [], []
    with progress_bar("embedding", progress) as bar:
        task = bar.add_task("embed", total=len(files))
        for batch in inference_batches(files, pre.resize_size, pre.input_size, pre.interpolation, batch_size):
            failed += [message for _, message in batch.failed]
            if batch.images is not None:
                x = normalize(batch.images.to(device).float() / 255, pre)
                rows.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
                kept += [files[index] for index in batch.indices]
            bar.advance(task, len(batch.indices) + len(batch.failed))
    features = torch.cat(rows).numpy() if rows else np.zeros((0, model.num_features), dtype=np.float32)
    return Embeddings(features, kept, failed)


def cosine_similarity(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    q = query / max(np.linalg.norm(query), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return g @ q


def similar(model: ResNet, query: str | Path, gallery: str | Path, topk: int = 5,
            batch_size: int = 64) -> tuple[list[tuple[Path, float]], list[str]]:
    """The `topk` gallery images most similar to `query` (cosine of pooled features), best first."""
    found = embed(model, [query], batch_size)
    if not found.paths:
        raise BadImageError(found.failed[0])
    if not Path(gallery).is_dir():
        raise EmbedError(f"{gallery}: no such folder; the gallery is a folder of images")
    shelf = embed(model, [gallery], batch_size)
    if not shelf.paths:
        raise EmbedError(f"{gallery}: none of its {len(shelf.failed)} image(s) could be read "
                         f"(first: {shelf.failed[0]})")
    scores = cosine_similarity(found.features[0], shelf.features)
    order = np.argsort(-scores, kind="stable")[:topk]
    return [(shelf.paths[i], float(scores[i])) for i in order], shelf.failed
