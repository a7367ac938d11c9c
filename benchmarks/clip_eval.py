"""Per clip against per frame: how much `residual eval` gains by answering a clip by its frames' mean.

Clips are made from the `shapes` test split: each clip is `--frames` test images of one class, with Gaussian
noise of `--sigma` (a poor camera), shown one after another at 4 frames a second, at 64 px, in H.264. A class's
first clip goes to train/ (unpack needs one), the rest to test/.
`residual unpack` takes their frames (every one: --fps 4) into an image folder, split by clip, and
`residual eval` scores the model on it: top-1 over the frames, and over the clips.

    python benchmarks/clip_eval.py runs/demo/resnet20-shapes/model.safetensors [--data data/shapes-32]
        [--out /tmp/clip-eval] [--frames 8] [--sigma 0.1]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from residual.data.clips import unpack_clips
from residual.data.corruptions import gaussian_noise
from residual.data.datasets import open_dataset
from residual.data.frames import Frame, write_video
from residual.evaluate import evaluate
from residual.weights import load_model

FRAME_RATE = 4
FRAME_SIZE = 64


def noisy(path: Path, sigma: float, generator: torch.Generator) -> Image.Image:
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    pixels = gaussian_noise(pixels, sigma, generator).clamp(0, 1)
    picture = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return picture.resize((FRAME_SIZE, FRAME_SIZE), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default="data/shapes-32")
    parser.add_argument("--out", default="/tmp/clip-eval")
    parser.add_argument("--frames", type=int, default=8, help="frames (test images) per clip")
    parser.add_argument("--sigma", type=float, default=0.1, help="the noise's standard deviation (pixels 0-1)")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    test = open_dataset(args.data).test
    generator = torch.Generator().manual_seed(0)
    by_class: dict[int, list[Path]] = {}
    for path, label in zip(test.files, test.labels):
        by_class.setdefault(int(label), []).append(Path(path))
    for label, paths in by_class.items():
        for start in range(0, len(paths) - args.frames + 1, args.frames):
            split = "train" if start == 0 else "test"  # unpack reads train/ and test/ together; eval scores test/
            clip = out / "clips" / split / paths[0].parent.name / f"clip{start // args.frames:03d}.mp4"
            clip.parent.mkdir(parents=True, exist_ok=True)
            write_video(clip, (Frame(index / FRAME_RATE, noisy(path, args.sigma, generator))
                               for index, path in enumerate(paths[start:start + args.frames])))
    unpack_clips(out / "clips", out / "frames", fps=FRAME_RATE, progress=False)
    result = evaluate(load_model(args.model), out / "frames", "test", out_dir=out / "report")
    frames, clips = result.metrics, result.metrics["clips"]
    print(f"{args.frames} frames a clip, noise sigma {args.sigma}")
    print(f"per frame: top-1 {frames['top1']:.2%} over {frames['images']:,} frames "
          f"(95% interval {frames['top1_ci95'][0]:.2%} - {frames['top1_ci95'][1]:.2%})")
    print(f"per clip:  top-1 {clips['top1']:.2%} over {clips['clips']:,} clips "
          f"(95% interval {clips['top1_ci95'][0]:.2%} - {clips['top1_ci95'][1]:.2%})")


if __name__ == "__main__":
    main()
