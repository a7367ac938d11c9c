"""Grad-CAM on videos: where the model looked in every frame, as a video to watch, and a picture per segment.

`explain_video(model, "clip.mp4", "out")` decodes the frames (data.frames: upright, timed by their own timestamps,
at most `fps` a second when asked), explains each at the class the model predicts for it, or at `target`
(explain.grad_cam), and writes:
- out/clip.mp4.METHOD.mp4: the video again, each frame with its heatmap over the square the model sees (the
  frame resized and center-cropped as the model's preprocessing says), the rest dimmed, as the model never saw
  it, and the class explained with its probability across the top; with the video's sound;
- out/clip.mp4.t=SECONDS.CLASS.METHOD.png, one per segment (video.segments: the stretches of time each class
  holds, from the probabilities smoothed over `smooth` seconds): the segment's frame where its class (or
  `target`) is most probable, explained at that class and drawn as `explain` draws an image, the model's input
  beside its overlay.
Frames stream through in batches: memory holds a batch of frames, not the video. The key frames are decoded a
second time once the segments are known; decoding costs a fraction of the gradients' pass. A live stream (a
camera, a broadcast) cannot be decoded twice: its overlays are written as its frames come, until it ends or
Ctrl-C, the frames the model cannot keep up with let go as predict lets them go, without its sound and without
key frames; its segments are found as its frames come (video.SegmentFinder), in memory that does not grow with
the stream, so it may run for days: its frames' times and probabilities are not kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .annotate import captioned
from .data.frames import (Frame, VideoInfo, arrived_frames, is_streamed, source_file_name, stop_requests,
                          video_frames, video_info, write_video)
from .data.transforms import center_crop_box, normalize, resize_center_crop
from .errors import ConfigError
from .explain import Explanation, blended, explained_module, grad_cam, resolve_target, save_explanation
from .predict import class_names_of, class_thresholds, is_multi_label, model_device
from .progress import progress_bar
from .video import (SMOOTH_SECONDS, FrameScores, Segment, SegmentFinder, check_smooth, expected_frames, frame_source,
                    segment_finder, video_segments)

UNSEEN_BRIGHTNESS = 0.4  # what the center crop leaves out is dimmed to this, not hidden: the scene stays readable


@dataclass
class VideoExplanation:
    info: VideoInfo
    frames: int  # how many were explained
    # Per frame explained (a file's; a live stream's are not kept, as it may run for days: empty): its time in
    # seconds, its probabilities (frames x classes) and the class explained.
    times: np.ndarray
    probabilities: np.ndarray
    explained: np.ndarray
    segments: list[Segment]
    key_frames: list[Explanation]  # one per segment, in the segments' order (none for a live stream); `path`: the PNG
    path: Path | None  # the video of overlays; None where no frame could be decoded
    failed: list[str]  # damaged stretches skipped, one line each


def explain_video(model, video: str | VideoInfo, out_dir: str | Path, method: str = "gradcam",
                  target: int | str | None = None,
                  layer: str | None = None, fps: float | None = None, smooth: float = SMOOTH_SECONDS,
                  batch_size: int = 16, name: str | None = None, progress: bool = False) -> VideoExplanation:
    """Explain every frame of `video` (with `fps`, at most that many a second) and write the video of overlays
    and a key frame per segment into `out_dir`, named after `name` (default: the video's file name); a live
    stream's overlays as its frames come, and no key frames. `video` may be its VideoInfo (a live stream's as
    video_info(..., keep_open=True) left it, to be read on)."""
    check_smooth(smooth)
    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps must be above 0, got {fps}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    explained_module(model, method, layer)
    target_id = resolve_target(model, target)
    info = video if isinstance(video, VideoInfo) else video_info(video, keep_open=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or source_file_name(info.path)
    model.eval()
    # A live stream's probabilities go straight to the finder of its segments; a file's are kept, to find each
    # segment's key frame.
    scores = segment_finder(model, info, smooth) if info.live else FrameScores()
    explained = None if info.live else []
    failed = []
    path = out / f"{name}.{method}.mp4"
    with progress_bar(f"explaining {info.name}", progress, unit="frames/s") as bar, \
            stop_requests(is_streamed(info.path)) as stop:
        task = bar.add_task("frames", total=expected_frames(info, fps))
        frames = video_frames(info, fps, failed, stop)
        # A live stream's frames as they arrive (the oldest let go where the gradients fall behind), a file's in
        # batches.
        groups = (arrived_frames(frames, batch_size, stop, info.name, failed) if info.live
                  else _chunks(frames, batch_size))
        first = next(groups, None)
        if first is None:  # nothing to draw; said, as a video the user asked about
            path = None
            failed.append(f"{info.name}: no frame to explain (none decoded); nothing written")
        else:
            write_video(path, _overlaid(model, itertools.chain([first], groups), method, target_id, layer, scores,
                                        explained, lambda count: bar.advance(task, count)),
                        sound_from=None if info.live else info.path, growing=info.live)
    names = class_names_of(model)
    if info.live:
        return VideoExplanation(info, scores.frames, np.zeros(0), np.zeros((0, len(names)), dtype=np.float32),
                                np.zeros(0, dtype=np.int64), scores.finish(), [], path, failed)
    times, probabilities = scores.arrays(len(names))
    found = video_segments(model, info, scores, smooth)
    key_frames = _key_frames(model, info, fps, found, times, probabilities, method, target_id, layer, batch_size,
                             out, name)
    return VideoExplanation(info, len(times), times, probabilities, np.asarray(explained, dtype=np.int64), found,
                            key_frames, path, failed)


def _overlaid(model, groups: Iterator[list[Frame]], method: str, target_id: int | None, layer: str | None,
              scores: FrameScores | SegmentFinder, explained: list[int] | None,
              advance: Callable[[int], None]) -> Iterator[Frame]:
    """Each frame of the `groups` (a batch each) with its heatmap drawn over it and the class explained across its
    top; every frame's time and probabilities go to `scores`, the class explained to `explained` (if kept)."""
    names = class_names_of(model)
    for chunk in groups:
        heatmaps, probabilities, classes, _ = _explained(model, [frame.image for frame in chunk], target_id, layer,
                                                         method)
        scores.add([frame.time for frame in chunk], probabilities, None)
        if explained is not None:
            explained += classes
        for frame, heatmap, row, class_id in zip(chunk, heatmaps, probabilities, classes):
            picture = frame_overlay(frame.image, heatmap.numpy(), model.preprocessing)
            yield Frame(frame.time, captioned(picture, f"{method}: {names[class_id]} {row[class_id]:.2f}"))
        advance(len(chunk))


def _explained(model, images: list[Image.Image], targets: int | list[int] | None, layer: str | None,
               method: str) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """Heatmaps, probabilities, the classes explained and the crops (uint8) for whole frames, each resized and
    center-cropped as the model's preprocessing says: at `targets` (one class for all, or one per frame), else the
    predicted class."""
    pre = model.preprocessing
    crops = torch.stack([resize_center_crop(image, pre.resize_size, pre.input_size, pre.interpolation)
                         for image in images])
    x = normalize(crops.to(model_device(model)).float() / 255, pre)
    classes = [targets] * len(images) if isinstance(targets, int) else targets
    heatmaps, probabilities = grad_cam(model, x, classes, layer, method)
    return heatmaps, probabilities, classes or probabilities.argmax(1).tolist(), crops


def frame_overlay(image: Image.Image, heatmap: np.ndarray, preprocessing, alpha: float = 0.5) -> Image.Image:
    """A whole frame with the heatmap of its center crop (as `preprocessing` resizes and crops) blended over the
    crop, and the rest, which the model did not see, dimmed."""
    left, top, right, bottom = center_crop_box(image.height, image.width, preprocessing.resize_size,
                                               preprocessing.input_size)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = torch.from_numpy(np.array(heatmap, dtype=np.float32))[None, None]  # a copy: any strides will do
    heat = F.interpolate(heat, size=(bottom - top, right - left), mode="bilinear", align_corners=False)[0, 0].numpy()
    shown = (pixels * UNSEEN_BRIGHTNESS).astype(np.uint8)
    shown[top:bottom, left:right] = blended(pixels[top:bottom, left:right], heat, alpha)
    return Image.fromarray(shown)


def _key_frames(model, info: VideoInfo, fps: float | None, found: list[Segment], times: np.ndarray,
                probabilities: np.ndarray, method: str, target_id: int | None, layer: str | None, batch_size: int,
                out: Path, name: str) -> list[Explanation]:
    """Per segment, its frame where the class (the segment's, or `target_id`) is most probable, decoded again,
    explained at that class and written as explain's two panels."""
    names = class_names_of(model)
    thresholds = class_thresholds(model) if is_multi_label(model) else None
    wanted = []  # (frame index, class) per segment
    for segment in found:
        class_id = target_id if target_id is not None else names.index(segment.label)
        # Its frames; a frame timed like the next one (a damaged stream's) still counts as its segment's own.
        inside = np.flatnonzero((times >= segment.start) & ((times < segment.end) | (times == segment.start)))
        wanted.append((int(inside[np.argmax(probabilities[inside, class_id])]), class_id))
    needed = {index for index, _ in wanted}
    frames = {}
    # The same decoding as the first pass, so a frame's index is the same frame.
    for index, frame in enumerate(video_frames(info.path, fps)):
        if index in needed:
            frames[index] = frame
            if len(frames) == len(needed):
                break
    key_frames = []
    for chunk in _chunks(iter(wanted), batch_size):
        images = [frames[index].image for index, _ in chunk]
        heatmaps, rows, _, crops = _explained(model, images, [class_id for _, class_id in chunk], layer, method)
        for (index, class_id), heatmap, row, crop in zip(chunk, heatmaps, rows, crops):
            time = frames[index].time
            probability, top = float(row[class_id]), int(row.argmax())
            explanation = Explanation(frame_source(info.name, time), class_id, names[class_id], probability, top,
                                      heatmap.numpy(), crop.permute(1, 2, 0).numpy(),
                                      predicted=(probability >= thresholds[class_id] if thresholds is not None
                                                 else class_id == top))
            explanation.path = out / f"{name}.t={time:.3f}.{names[class_id]}.{method}.png"
            save_explanation(explanation, explanation.path, method)
            key_frames.append(explanation)
    return key_frames


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
