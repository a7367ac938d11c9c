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
Ctrl-C, the frames the model cannot keep up with let go as predict lets them go, without its sound; its segments
are found as its frames come (video.SegmentFinder), in memory that does not grow with the stream, so it may run
for days: its frames' times and probabilities are not kept. Its key frames are written as its segments close:
the model's input (the crop) is kept only of the frames that may yet be a segment's peak (SegmentFinder's
`candidates`: those not final yet, and the open segments' peaks so far).
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
    key_frames: list[Explanation]  # one per segment of a class, in the segments' order; `path`: the PNG
    path: Path | None  # the video of overlays; None where no frame could be decoded
    failed: list[str]  # damaged stretches skipped, one line each


def explain_video(model, video: str | VideoInfo, out_dir: str | Path, method: str = "gradcam",
                  target: int | str | None = None,
                  layer: str | None = None, fps: float | None = None, smooth: float = SMOOTH_SECONDS,
                  batch_size: int = 16, name: str | None = None, progress: bool = False) -> VideoExplanation:
    """Explain every frame of `video` (with `fps`, at most that many a second) and write the video of overlays
    and a key frame per segment into `out_dir`, named after `name` (default: the video's file name); a live
    stream's overlays as its frames come, and its key frames as its segments close. `video` may be its VideoInfo
    (a live stream's as video_info(..., keep_open=True) left it, to be read on)."""
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
    # A live stream's probabilities go straight to the finder of its segments, and its key frames are written as
    # they close; a file's are kept, and its key frames decoded again at the end.
    scores = segment_finder(model, info, smooth, peak_of=target_id) if info.live else FrameScores()
    live_key_frames = (LiveKeyFrames(model, scores, info.name, method, target_id, layer, batch_size, out, name)
                       if info.live else None)
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
                                        explained, live_key_frames, lambda count: bar.advance(task, count)),
                        sound_from=None if info.live else info.path, growing=info.live)
    names = class_names_of(model)
    if info.live:
        live_key_frames.write(scores.finish())
        return VideoExplanation(info, scores.frames, np.zeros(0), np.zeros((0, len(names)), dtype=np.float32),
                                np.zeros(0, dtype=np.int64), scores.found, live_key_frames.in_order(), path,
                                failed)
    times, probabilities = scores.arrays(len(names))
    found = video_segments(model, info, scores, smooth, peak_of=target_id)
    key_frames = _key_frames(model, info, fps, found, method, target_id, layer, batch_size, out, name)
    return VideoExplanation(info, len(times), times, probabilities, np.asarray(explained, dtype=np.int64), found,
                            key_frames, path, failed)


def _overlaid(model, groups: Iterator[list[Frame]], method: str, target_id: int | None, layer: str | None,
              scores: FrameScores | SegmentFinder, explained: list[int] | None,
              live_key_frames: LiveKeyFrames | None, advance: Callable[[int], None]) -> Iterator[Frame]:
    """Each frame of the `groups` (a batch each) with its heatmap drawn over it and the class explained across its
    top; every frame's time and probabilities go to `scores`, the class explained to `explained` (if kept), and
    the crops to `live_key_frames` (if any)."""
    names = class_names_of(model)
    for chunk in groups:
        crops = _crops(model, [frame.image for frame in chunk])
        heatmaps, probabilities, classes = _explained(model, crops, target_id, layer, method)
        times = [frame.time for frame in chunk]
        scores.add(times, probabilities, None)
        if explained is not None:
            explained += classes
        if live_key_frames is not None:
            live_key_frames.add(times, crops)
        for frame, heatmap, row, class_id in zip(chunk, heatmaps, probabilities, classes):
            picture = frame_overlay(frame.image, heatmap.numpy(), model.preprocessing)
            yield Frame(frame.time, captioned(picture, f"{method}: {names[class_id]} {row[class_id]:.2f}"))
        advance(len(chunk))


def _crops(model, images: list[Image.Image]) -> torch.Tensor:
    """Whole frames resized and center-cropped as the model's preprocessing says: what it sees (uint8, N x C x H x
    W)."""
    pre = model.preprocessing
    return torch.stack([resize_center_crop(image, pre.resize_size, pre.input_size, pre.interpolation)
                        for image in images])


def _explained(model, crops: torch.Tensor, targets: int | list[int] | None, layer: str | None,
               method: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Heatmaps, probabilities and the classes explained for `crops` (as `_crops` makes them): at `targets` (one
    class for all, or one per crop), else the predicted class."""
    x = normalize(crops.to(model_device(model)).float() / 255, model.preprocessing)
    classes = [targets] * len(crops) if isinstance(targets, int) else targets
    heatmaps, probabilities = grad_cam(model, x, classes, layer, method)
    return heatmaps, probabilities, classes or probabilities.argmax(1).tolist()


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


def _key_frames(model, info: VideoInfo, fps: float | None, found: list[Segment], method: str,
                target_id: int | None, layer: str | None, batch_size: int, out: Path, name: str) -> list[Explanation]:
    """A file's key frames: each segment's peak (its frame where its class, or `target_id`, is most probable),
    decoded again, explained at that class and written as explain's two panels."""
    wanted = [(segment.peak, class_id) for segment, class_id in _explained_at(model, found, target_id)]
    if not wanted:
        return []
    needed = {number for number, _ in wanted}
    frames = {}
    # The same decoding as the first pass, so a frame's number is the same frame.
    for number, frame in enumerate(video_frames(info.path, fps)):
        if number in needed:
            frames[number] = frame
            if len(frames) == len(needed):
                break
    crops = dict(zip(frames, _crops(model, [frame.image for frame in frames.values()])))
    return _write_key_frames(model, info.name, [(frames[number].time, crops[number], class_id)
                                                for number, class_id in wanted], method, layer, batch_size, out, name)


def _explained_at(model, segments: list[Segment], target_id: int | None) -> list[tuple[Segment, int]]:
    """The segments that have a key frame (a peak: those of a class), each with the class it is explained at: its
    own, or `target_id`."""
    names = class_names_of(model)
    return [(segment, target_id if target_id is not None else names.index(segment.label))
            for segment in segments if segment.peak is not None]


def _write_key_frames(model, video_name: str, wanted: list[tuple[float, torch.Tensor, int]], method: str,
                     layer: str | None, batch_size: int, out: Path, name: str) -> list[Explanation]:
    """Each (time, crop, class) of `wanted` explained at its class and written as explain's two panels, as
    out/NAME.t=SECONDS.CLASS.METHOD.png."""
    names = class_names_of(model)
    thresholds = class_thresholds(model) if is_multi_label(model) else None
    written = []
    for chunk in _chunks(iter(wanted), batch_size):
        crops = torch.stack([crop for _, crop, _ in chunk])
        heatmaps, rows, _ = _explained(model, crops, [class_id for _, _, class_id in chunk], layer, method)
        for (time, crop, class_id), heatmap, row in zip(chunk, heatmaps, rows):
            probability, top = float(row[class_id]), int(row.argmax())
            explanation = Explanation(frame_source(video_name, time), class_id, names[class_id], probability, top,
                                      heatmap.numpy(), crop.permute(1, 2, 0).numpy(),
                                      predicted=(probability >= thresholds[class_id] if thresholds is not None
                                                 else class_id == top))
            explanation.path = out / f"{name}.t={time:.3f}.{names[class_id]}.{method}.png"
            save_explanation(explanation, explanation.path, method)
            written.append(explanation)
    return written


class LiveKeyFrames:
    """A live stream's key frames, written as its segments close: each segment's peak (its frame where its class,
    or `target_id`, is most probable), explained at that class. Of the frames explained, the crops kept are those
    of the frames that may yet be a peak (the finder's `candidates`), so memory does not grow with the stream."""

    def __init__(self, model, finder: SegmentFinder, video_name: str, method: str, target_id: int | None,
                 layer: str | None, batch_size: int, out: Path, name: str):
        self.model, self.finder, self.video_name, self.method = model, finder, video_name, method
        self.target_id, self.layer, self.batch_size, self.out, self.name = target_id, layer, batch_size, out, name
        self.crops: dict[int, tuple[float, torch.Tensor]] = {}  # by the frame's number (the finder's): time, crop
        self.written: list[tuple[Segment, Explanation]] = []

    def add(self, times: list[float], crops: torch.Tensor) -> None:
        """The crops of the frames just given to the finder; writes the key frames of the segments it closed."""
        first = self.finder.frames - len(times)
        self.crops.update((first + offset, (time, crop)) for offset, (time, crop) in enumerate(zip(times, crops)))
        self.write(self.finder.closed())
        from_number, peaks = self.finder.candidates
        self.crops = {number: kept for number, kept in self.crops.items() if number >= from_number or number in peaks}

    def write(self, segments: list[Segment]) -> None:
        """The key frames of `segments`, closed: their peaks' crops, kept, explained and written."""
        shown = _explained_at(self.model, segments, self.target_id)
        written = _write_key_frames(self.model, self.video_name,
                                    [(*self.crops[segment.peak], class_id) for segment, class_id in shown],
                                    self.method, self.layer, self.batch_size, self.out, self.name)
        self.written += zip((segment for segment, _ in shown), written)

    def in_order(self) -> list[Explanation]:
        """The key frames written, in the order of their segments (the finder's `found`)."""
        position = {id(segment): index for index, segment in enumerate(self.finder.found)}
        return [explanation for _, explanation in sorted(self.written, key=lambda pair: position[id(pair[0])])]


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
