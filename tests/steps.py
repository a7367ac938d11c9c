"""For the tests that compare optimizer steps: data whose classes weigh differently, and how far apart
two sets of weights are."""

from pathlib import Path

import torch

from residual.data.shapes import write_shapes


def imbalanced_shapes(root: Path) -> Path:
    """`shapes` at 16 px with 15 training images: five classes of one image and five of two, so their
    class weights differ (4/3 and 2/3)."""
    data = write_shapes(root, size=16, per_class=2, seed=1, progress=False)
    for shape in sorted(path.name for path in (data / "train").iterdir())[:5]:
        (data / "train" / shape / "00001.png").unlink()
    return data


def distance(weights: dict, other: dict) -> torch.Tensor:
    """The Euclidean distance between two state dicts' floating-point tensors."""
    return torch.cat([(weights[k] - other[k]).flatten() for k in weights if weights[k].is_floating_point()]).norm()
