"""How far the device JPEG decoder's pixels are from Pillow's, after the same resize and crop.

`--decoder torchvision` decodes on the model's device (nvjpeg on CUDA). On the CPU, torchvision decodes
with libjpeg-turbo, as Pillow does, and the two paths agree; nvjpeg may upsample chroma and round its
IDCT differently. And a JPEG at least twice the size it is resized to is decoded by Pillow at a reduced
size (draft mode: libjpeg scales in the DCT), by the device at full size: the two differ there on the CPU
too. This prints, for small (32 px shapes), photo-sized (500x375) and large (1024x768) JPEGs, the mean and
the largest absolute difference per image, in grey levels, so tests and docs can use measured tolerances.

    PYTHONPATH=src python3 benchmarks/decoder_agreement.py --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from residual.bench import write_jpegs
from residual.data.loaders import inference_batches
from residual.data.shapes import write_shapes


def decoded(files: list[Path], size: int, decoder: str, device: str) -> np.ndarray:
    batches = inference_batches(files, size, size, batch_size=64, workers=0, decoder=decoder, device=device)
    return np.concatenate([batch.images.cpu().numpy() for batch in batches]).astype(np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shapes = write_shapes(root / "shapes", size=32, per_class=10, seed=0, progress=False)
        small = []
        for path in sorted((shapes / "test").glob("*/*.png"))[:40]:
            small.append(root / f"{path.parent.name}-{path.stem}.jpg")
            Image.open(path).convert("RGB").save(small[-1], quality=95)
        photos = sorted((write_jpegs(root / "photos", (500, 375), 40) / "train").glob("*/*.jpg"))
        large = sorted((write_jpegs(root / "large", (1024, 768), 40) / "train").glob("*/*.jpg"))
        print("| JPEGs | size | images | mean |diff| (levels) | worst image's mean | largest |diff| |")
        print("|---|---:|---:|---:|---:|---:|")
        rows = [("shapes, quality 95", small, 32), ("photo-like 500x375", photos, 224),
                ("photo-like 1024x768 (Pillow decodes at half size: draft mode)", large, 224)]
        for name, files, size in rows:
            pillow = decoded(files, size, "pillow", args.device)
            device = decoded(files, size, "torchvision", args.device)
            diff = np.abs(pillow - device)
            per_image = diff.reshape(len(files), -1).mean(1)
            print(f"| {name} | {size} | {len(files)} | {diff.mean():.3f} | {per_image.max():.3f} | {diff.max()} |")


if __name__ == "__main__":
    main()
