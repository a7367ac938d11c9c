"""What `residual predict STREAM --annotate DIR` adds per frame: each answered frame captioned and encoded as it
comes (`annotate.captioned`, then `frames.VideoWriter.add` writing a growing file: fragmented MP4, x264 tuned for
zero latency), against a plain PyAV loop encoding the same frames uncaptioned into an ordinary MP4 (H.264,
libx264 veryfast, CRF 20), in one process, rounds alternating (the first is warm-up and left out).

The frames are made here: a gradient with noise, moved 8 pixels a frame (so the encoder has motion to code).
Prints milliseconds per frame for each path and size, the ratio to the plain loop, and the file's kilobytes per
frame (a growing file codes each frame alone, without looking ahead, so it is larger); what a frame costs says
how many frames a second a live stream can be recorded at beside the model (`--fps`). Record it in
docs/BENCHMARKS.md.

    python benchmarks/live_annotate.py [--frames 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from residual.annotate import captioned
from residual.data.frames import Frame, VideoWriter

SIZES = ((640, 480), (1280, 720), (1920, 1080))
CAPTION = "circle 0.93, star 0.04, ring 0.01"  # three classes, as a live row's answer reads


def moving_frames(width: int, height: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    base = (rng.random((height, width, 3)) * 40 + np.linspace(0, 200, width)[None, :, None]).astype(np.uint8)
    return [Image.fromarray(np.roll(base, 8 * index, axis=1)) for index in range(count)]


def plain_loop(frames: list[Image.Image], path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for index, image in enumerate(frames):
            picture = av.VideoFrame.from_image(image)
            picture.pts, picture.time_base = round(index * 1000 / 30), Fraction(1, 1000)
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


def residual_path(frames: list[Image.Image], path: Path) -> None:
    with VideoWriter(path, growing=True) as writer:
        for index, image in enumerate(frames):
            writer.add(Frame(index / 30, captioned(image, CAPTION)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for width, height in SIZES:
            frames = moving_frames(width, height, args.frames)
            times: dict[str, list[float]] = {"plain PyAV loop": [], "residual (caption + VideoWriter)": []}
            sizes: dict[str, int] = {}
            for round_ in range(args.rounds + 1):
                for (name, run), out in zip([("plain PyAV loop", plain_loop),
                                             ("residual (caption + VideoWriter)", residual_path)],
                                            ("plain.mp4", "residual.mp4")):
                    start = time.perf_counter()
                    run(frames, Path(folder) / out)
                    if round_:  # the first round warms up
                        times[name].append((time.perf_counter() - start) / len(frames))
                    sizes[name] = (Path(folder) / out).stat().st_size
            plain = statistics.median(times["plain PyAV loop"])
            for name, measured in times.items():
                median = statistics.median(measured)
                print(f"{width}x{height}  {name:<34} {1000 * median:6.1f} ms/frame  {1 / median:6.0f} frames/s  "
                      f"{median / plain:4.2f}x the plain loop's time  {sizes[name] / len(frames) / 1000:6.1f} kB/frame")


if __name__ == "__main__":
    main()
