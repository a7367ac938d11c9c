"""Video prediction throughput of `residual predict` against a plain PyAV + PyTorch loop over the same file.

The video is made here: 720p H.264 at 30 frames/s, moving texture (so the encoder has real work to undo). The
model is resnet18 at 224 px in fp32 (random weights: speed only). Paths, timed in one process, rounds
alternating so the machine's drift hits each alike (the first round is warm-up and left out):
- decode only: PyAV's frames as RGB PIL images, nothing else (the bound for any path);
- plain loop: PyAV decodes, PIL resizes and crops, batches of 64 through the model (what one writes by hand);
- residual: `predict_video` (every frame), with its segments;
- residual --fps 5: the same, predicting five frames a second (every frame is still decoded);
- plain Grad-CAM loop --fps 5: PyAV decodes, five frames a second are cropped, run forward and backward in
  batches with hooks on the last stage, their heatmaps blended over the crop (jet colours) and the frames
  encoded again as H.264 (what one writes by hand to watch Grad-CAM on a video);
- residual explain --fps 5: `explain_video`: the same, over the whole frame with the rest dimmed, a caption, the
  sound, and a key frame per segment (a second decode).
Prints frames per second (of the video's frames, so --fps 5's is video time covered) and the ratio to the plain
loop; record it in docs/BENCHMARKS.md.

    python benchmarks/video_cpu.py [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import matplotlib
import numpy as np
import torch
from PIL import Image

import residual
from residual.video import predict_video
from residual.video_explain import explain_video

BATCH = 64


def write_video(path: Path, seconds: int, rate: int = 30) -> Path:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (720 + 64, 1280 + 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for index in range(seconds * rate):
            shift = index % 64  # the texture pans: motion for the encoder
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[shift:shift + 720, shift:shift + 1280]))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded(path: Path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_image()


def decode_only(path: Path, model) -> int:
    return sum(1 for _ in decoded(path))


def prepare(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    scale = resize / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    return torch.from_numpy(np.asarray(image.crop((left, top, left + crop, top + crop))).copy()).permute(2, 0, 1)


@torch.inference_mode()
def plain_loop(path: Path, model) -> int:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    answers, batch = [], []
    for image in decoded(path):
        batch.append(prepare(image))
        if len(batch) == BATCH:
            answers += model((torch.stack(batch).float() / 255 - mean) / std).softmax(1).argmax(1).tolist()
            batch = []
    if batch:
        answers += model((torch.stack(batch).float() / 255 - mean) / std).softmax(1).argmax(1).tolist()
    return len(answers)


def sampled(path: Path, fps: float):
    """The decoded frames at most `fps` a second, the first at or after each tick, with their times."""
    tick = 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.time >= tick - 1e-6:
                tick = (int(frame.time * fps + 1e-6) + 1) / fps
                yield frame.time, frame.to_image()


def plain_grad_cam(path: Path, model, fps: float = 5) -> int:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    kept = {}
    hook = model.layer4.register_forward_hook(lambda module, inputs, output: kept.update(activation=output))
    jet = matplotlib.colormaps["jet"]
    with tempfile.TemporaryDirectory() as folder, av.open(f"{folder}/cams.mp4", "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 224
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "20", "preset": "veryfast"}
        batch: list[torch.Tensor] = []

        def explain(crops: list[torch.Tensor]) -> None:
            x = (torch.stack(crops).float() / 255 - mean) / std
            logits = model(x)
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            activation = kept.pop("activation")
            (gradient,) = torch.autograd.grad(score, activation)
            cam = (gradient.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True).relu().detach()
            cam = torch.nn.functional.interpolate(cam, size=(224, 224), mode="bilinear")[:, 0]
            cam = cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-7)
            for crop, heat in zip(crops, cam.numpy()):
                blended = 0.5 * crop.permute(1, 2, 0).numpy() + 0.5 * jet(heat)[..., :3] * 255
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(blended.astype(np.uint8)))
                container.mux(stream.encode(picture))

        for _, image in sampled(path, fps):
            batch.append(prepare(image))
            if len(batch) == 16:
                explain(batch)
                batch = []
        if batch:
            explain(batch)
        container.mux(stream.encode())
    hook.remove()
    with av.open(str(path)) as source:
        return source.streams.video[0].frames


def residual_explain(path: Path, model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        result = explain_video(model, str(path), folder, fps=5, batch_size=16)
        assert result.key_frames and not result.failed
    return result.info.frames


def with_residual(fps: float | None):
    def run(path: Path, model) -> int:
        result = predict_video(model, str(path), batch_size=BATCH, fps=fps)
        assert result.segments and not result.failed
        return result.info.frames
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)  # the same weights each run: explain's key frames, one per segment, depend on them
    model = residual.create_model("resnet18").eval()
    paths = {"decode only (PyAV to PIL)": decode_only, "plain loop (PyAV, PIL, PyTorch)": plain_loop,
             "residual predict": with_residual(None), "residual predict --fps 5": with_residual(5),
             "plain Grad-CAM loop --fps 5": plain_grad_cam, "residual explain --fps 5": residual_explain}
    with tempfile.TemporaryDirectory() as folder:
        video = write_video(Path(folder) / "pan.mp4", args.seconds)
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for round_index in range(args.rounds + 1):
            for name, run in paths.items():
                start = time.perf_counter()
                frames = run(video, model)
                if round_index:  # the first round warms caches and threads up
                    rates[name].append(frames / (time.perf_counter() - start))
    peer = statistics.median(rates["plain loop (PyAV, PIL, PyTorch)"])
    print(f"720p H.264, {args.seconds} s at 30 frames/s, resnet18 224 px fp32, batch {BATCH}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    cam_peer = statistics.median(rates["plain Grad-CAM loop --fps 5"])
    print(f"{'path':34} {'video frames/s':>15} {'x plain loop':>13} {'x plain Grad-CAM':>17}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:34} {rate:15.1f} {rate / peer:12.2f}x {rate / cam_peer:16.2f}x")


if __name__ == "__main__":
    main()
