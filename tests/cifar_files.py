"""CIFAR-10 in its python-pickle layout (cifar-10-batches-py), written small for the tests."""

import pickle
from pathlib import Path

import numpy as np


def write_cifar10(folder: Path, train: int = 4, test: int = 6, seed: int = 0) -> Path:
    """One training batch of `train` random images and a test batch of `test`, with the class names c0-c9."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, count in [("data_batch_1", train), ("test_batch", test)]:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, count).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return folder
