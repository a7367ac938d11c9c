"""Predictions on videos: a class for every frame, and the stretches of time each class holds.

`predict_video(model, "clip.mp4")` decodes the frames (data.frames: upright, timed by their own timestamps, at
most `fps` a second when asked), runs them through the model in batches as `predict` runs images (the same
preprocessing, test-time augmentation, exported runtimes), and returns:
- every frame's prediction, named `clip.mp4#t=SECONDS`: the W3C media-fragment form, which a browser opens at
  that moment, so each row of a CSV of frames points at what the model saw;
- the segments. Frame-by-frame answers flicker (motion blur, a frame between two scenes), so each class's
  probability is first averaged over the frames within `smooth` seconds around each frame; then consecutive
  frames with the same answer make one segment. With `min_confidence` (or a `feature_bank`), frames whose
  smoothed top class (or similarity to the nearest training image) stays below its floor make segments of no
  class. A multi-label model's segments are per class (where its smoothed probability reaches the class's
  threshold), so they may overlap, and a time with none present has none.

`plot_timeline` draws them: the smoothed probability of each class the video shows over time, under a band of
its segments. `write_annotated` writes the video again with each moment's segments drawn on its frames.
Every frame's probabilities are kept for the segments: frames x classes x 4 bytes (an hour at 30 frames/s and
1000 classes is 430 MB; `fps` thins it).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from .annotate import captioned
from .data.frames import (Frame, VideoInfo, arrived_frames, is_stream, source_file_name, stop_requests, video_frames,
                          video_info, write_video)
from .data.loaders import InferenceBatch, check_stream
from .data.transforms import resize_center_crop
from .errors import ConfigError
from .feature_bank import FeatureBank
from .figures import COLOURS, new_figure, save_png
from .predict import (Prediction, batch_predictions, check_min_confidence, class_names_of, class_thresholds,
                      inference_compile, inference_forward, is_multi_label, model_device, probabilities_in_flight,
                      tta_image_size)
from .progress import progress_bar

SMOOTH_SECONDS = 1.0  # about a scene cut's blur and a camera's shake; short enough to keep a 2 s shot apart
TIMELINE_CLASSES = 8  # lines drawn at most: beyond this the colours repeat and the legend hides the plot
CLOSED_LOOK_SECONDS = 1.0  # how often (in stream time) a live stream's segments are looked at for closed ones
ANNOTATE_WHY = "--annotate decodes it again to draw on its frames"


@dataclass
class Segment:
    start: float  # seconds from the video's start
    end: float  # where the next segment starts, or the video ends
    label: str | None  # None: no class reached the floor asked for (min_confidence, a feature bank's)
    probability: float  # the label's smoothed probability averaged over the segment (the top class's, for None)
    frames: int


@dataclass
class FrameScores:
    """A video's frames as they are predicted: their times and the model's class probabilities."""

    times: list[float] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)
    similarities: list[float] = field(default_factory=list)  # to the nearest training image, with a feature bank

    def add(self, times: list[float], probabilities: torch.Tensor, similarities: list[float] | None) -> None:
        self.times += times
        self.probabilities.append(probabilities.float().numpy())
        self.similarities += similarities or []

    def arrays(self, classes: int) -> tuple[np.ndarray, np.ndarray]:
        probabilities = np.concatenate(self.probabilities) if self.probabilities else np.zeros((0, classes))
        return np.asarray(self.times, dtype=np.float64), probabilities


@dataclass
class VideoPrediction:
    info: VideoInfo
    times: np.ndarray  # seconds, one per frame predicted
    probabilities: np.ndarray  # frames x classes, as the model gave them (not smoothed)
    predictions: list[Prediction]
    segments: list[Segment]
    failed: list[str]  # damaged stretches skipped, one line each


def frame_source(video: str, time: float) -> str:
    return f"{video}#t={time:.3f}"


def check_smooth(smooth: float) -> None:
    if not smooth >= 0:
        raise ConfigError(f"--smooth must be 0 (no smoothing) or more seconds, got {smooth}")


def iter_predict_video(model, info: VideoInfo, scores: FrameScores, topk: int = 5, batch_size: int = 64,
                       tta: str = "none", fps: float | None = None, min_confidence: float | None = None,
                       failed: list[str] | None = None, progress: bool = False, compile: bool | None = None,
                       feature_bank: FeatureBank | None = None) -> Iterator[Prediction]:
    """The predictions of the frames of the video `info` describes (data.frames.video_info), in order, as they
    are computed; their times and probabilities (and with `feature_bank` their similarities to the nearest
    training image) go to `scores` for `video_segments`. The arguments are checked here, before the first
    prediction is asked for, so that a writer has written nothing when one is wrong."""
    check_video_arguments(model, topk, batch_size, tta, fps, min_confidence, feature_bank, compile)
    expected = expected_frames(info, fps)
    if isinstance(model, torch.nn.Module):
        model.eval()
    compiled = feature_bank is None and inference_compile(model, compile, expected or 0)[0]
    return _video_predictions(model, inference_forward(model, compiled, batch_size), info, scores, topk,
                              batch_size, tta, fps, min_confidence, failed, progress, expected, feature_bank)


def check_video_arguments(model, topk: int, batch_size: int, tta: str, fps: float | None,
                          min_confidence: float | None, feature_bank: FeatureBank | None = None,
                          compile: bool | None = None) -> None:
    """Refuse, in one line, arguments iter_predict_video cannot work with."""
    if topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {topk}")
    check_min_confidence(min_confidence, is_multi_label(model))
    tta_image_size(model.preprocessing, tta)
    check_stream(batch_size, 0, "pillow", model_device(model))
    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps must be above 0, got {fps}")
    if feature_bank is not None:
        feature_bank.check_model(model)
        if compile:
            raise ConfigError("--feature-bank reads the features of the model run eagerly; leave --compile out")


def check_read_twice(info: VideoInfo, why: str) -> None:
    """Refuse, in one line, a live stream where the video is to be decoded a second time (`why`)."""
    if info.live:
        raise ConfigError(f"{info.name}: a live stream cannot be read a second time ({why}); record it first "
                          f"(ffmpeg -i ADDRESS -c copy clip.mp4) and give the file")


def expected_frames(info: VideoInfo, fps: float | None) -> int | None:
    """About how many frames will be predicted (for the progress bar and the choice to compile)."""
    if fps is not None and info.duration:
        sampled = int(info.duration * fps) + 1
        return min(sampled, info.frames) if info.frames else sampled
    return info.frames


def _video_predictions(model, forward, info: VideoInfo, scores: FrameScores, topk: int, batch_size: int,
                       tta: str, fps: float | None, min_confidence: float | None, failed: list[str] | None,
                       progress: bool, expected: int | None,
                       feature_bank: FeatureBank | None) -> Iterator[Prediction]:
    frame_times: list[float] = []  # every frame batched so far, by its index
    with progress_bar(f"predicting {info.name}", progress, unit="frames/s") as bar, \
            stop_requests(is_stream(info.path)) as stop:
        task = bar.add_task("frames", total=expected)
        frames = video_frames(info.path, fps, failed, stop)
        # A live stream's frames are answered as they come: batches of those that arrived, none waited for.
        groups = (arrived_frames(frames, batch_size, stop, info.name, failed) if info.live
                  else batched(frames, batch_size))
        batches = _frame_batches(groups, model, tta, frame_times)
        for batch, probabilities, features in probabilities_in_flight(forward, batches, tta, is_multi_label(model),
                                                                      features=feature_bank is not None,
                                                                      ahead=not info.live):
            times = [frame_times[index] for index in batch.indices]
            predictions = batch_predictions(model, [frame_source(info.name, time) for time in times], probabilities,
                                            features, topk, min_confidence, feature_bank)
            scores.add(times, probabilities, [p.similarity for p in predictions] if feature_bank else None)
            yield from predictions
            bar.advance(task, len(times))


def batched(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    """`frames` in lists of `size` (the last may be shorter)."""
    group: list[Frame] = []
    for frame in frames:
        group.append(frame)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _frame_batches(groups: Iterator[list[Frame]], model, tta: str,
                   frame_times: list[float]) -> Iterator[InferenceBatch]:
    """Each group of frames resized and center-cropped as the model's preprocessing says, as a batch on the
    model's device; each frame's time is appended to `frame_times`, where the batch's indices point."""
    pre = model.preprocessing
    crop = tta_image_size(pre, tta)
    device = model_device(model)
    for group in groups:
        images = torch.stack([resize_center_crop(frame.image, pre.resize_size, crop, pre.interpolation)
                              for frame in group])
        seen = len(frame_times)
        frame_times += [frame.time for frame in group]
        yield InferenceBatch(list(range(seen, len(frame_times))), images.to(device), [])


def smoothed(times: np.ndarray, probabilities: np.ndarray, seconds: float) -> np.ndarray:
    """Each frame's probabilities averaged over the frames within `seconds` / 2 of it (0: as they are)."""
    if seconds == 0 or len(times) == 0:
        return probabilities
    # Window sums from running sums: one pass, whatever the window, and right for uneven frame times.
    running = np.concatenate([np.zeros((1, probabilities.shape[1])), np.cumsum(probabilities, axis=0)])
    first = np.searchsorted(times, times - seconds / 2, side="left")
    last = np.searchsorted(times, times + seconds / 2, side="right")
    return (running[last] - running[first]) / (last - first)[:, None]


def segments(times: np.ndarray, probabilities: np.ndarray, names: list[str], end: float | None = None,
             smooth: float = SMOOTH_SECONDS, min_confidence: float | None = None,
             thresholds: np.ndarray | None = None, similarities: np.ndarray | None = None,
             similarity_floor: float | None = None) -> list[Segment]:
    """The stretches of time each answer holds, in order of their start. `end`: when the video ends (else the
    last frame's time plus the usual gap between frames). `thresholds`: a multi-label model's, per class:
    then each class has its own segments, where its smoothed probability reaches its threshold. A single-label
    model's frames have no class where the smoothed top probability is below `min_confidence`, or the
    smoothed `similarities` (to the nearest training image, per frame) below `similarity_floor`."""
    check_smooth(smooth)
    if len(times) == 0:
        return []
    if np.any(np.diff(times) < 0):  # a damaged stream's timestamps can step back: put the frames in time order
        order = np.argsort(times, kind="stable")
        times, probabilities = times[order], probabilities[order]
        similarities = None if similarities is None else np.asarray(similarities)[order]
    scores = smoothed(times, probabilities, smooth)
    gap = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    ends = np.append(times[1:], end if end is not None and end > times[-1] else times[-1] + gap)
    if thresholds is not None:
        found = [segment for index, name in enumerate(names)
                 for segment in _runs(scores[:, index] >= thresholds[index], times, ends, scores[:, index], name)]
        return sorted(found, key=lambda segment: (segment.start, segment.label))
    top = scores.argmax(axis=1)
    unsure = scores.max(axis=1) < min_confidence if min_confidence is not None else np.zeros(len(top), bool)
    if similarities is not None and similarity_floor is not None:
        unsure |= smoothed(times, np.asarray(similarities, dtype=np.float64)[:, None], smooth)[:, 0] < similarity_floor
    answers = np.where(unsure, -1, top)
    found = []
    for start, stop in _run_bounds(answers):
        label = None if answers[start] < 0 else names[answers[start]]
        held = scores[np.arange(start, stop), top[start:stop]] if label is None else scores[start:stop, answers[start]]
        found.append(Segment(float(times[start]), float(ends[stop - 1]), label, float(np.mean(held)), stop - start))
    return found


def _run_bounds(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal consecutive values."""
    changes = np.flatnonzero(values[1:] != values[:-1]) + 1
    bounds = np.concatenate([[0], changes, [len(values)]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _runs(present: np.ndarray, times: np.ndarray, ends: np.ndarray, scores: np.ndarray,
          name: str) -> list[Segment]:
    return [Segment(float(times[start]), float(ends[stop - 1]), name, float(scores[start:stop].mean()), stop - start)
            for start, stop in _run_bounds(present) if present[start]]


def video_segments(model, info: VideoInfo, scores: FrameScores, smooth: float = SMOOTH_SECONDS,
                   min_confidence: float | None = None, feature_bank: FeatureBank | None = None) -> list[Segment]:
    """`segments` of a video predicted by `model` (its classes, and a multi-label model's thresholds; with the
    `feature_bank` it was predicted with, its floor of similarity)."""
    names = class_names_of(model)
    times, probabilities = scores.arrays(len(names))
    thresholds = class_thresholds(model) if is_multi_label(model) else None
    return segments(times, probabilities, names, info.duration, smooth, min_confidence, thresholds,
                    np.asarray(scores.similarities) if feature_bank is not None else None,
                    feature_bank.floor if feature_bank is not None else None)


class ClosedSegments:
    """A live stream's segments as each closes. A frame's smoothed probabilities are final once the frames
    `smooth` / 2 seconds after it have come, so a segment is final once its end (the next segment's first
    frame) is: no later frame can move it. Looked for at most once a second of the stream, over the frames so
    far (`video_segments`, so what is handed on is what the whole stream's segments would hold)."""

    def __init__(self, model, info: VideoInfo, scores: FrameScores, smooth: float = SMOOTH_SECONDS,
                 min_confidence: float | None = None, feature_bank: FeatureBank | None = None):
        self.model, self.info, self.scores, self.smooth = model, info, scores, smooth
        self.min_confidence, self.feature_bank = min_confidence, feature_bank
        self.handed_on: set[tuple[str | None, float]] = set()  # (label, start) of the segments given
        self.looked_at = -np.inf  # the stream time of the last look

    def closed(self) -> list[Segment]:
        """The segments closed since the last call (none if less than a second of the stream has come)."""
        if not self.scores.times or self.scores.times[-1] < self.looked_at + CLOSED_LOOK_SECONDS:
            return []
        self.looked_at = self.scores.times[-1]
        final = self.scores.times[-1] - self.smooth / 2
        return self._new([segment for segment in self._all() if segment.end <= final])

    def rest(self) -> list[Segment]:
        """The segments not handed on yet, once the stream has ended."""
        return self._new(self._all())

    def _all(self) -> list[Segment]:
        return video_segments(self.model, self.info, self.scores, self.smooth, self.min_confidence,
                              self.feature_bank)

    def _new(self, found: list[Segment]) -> list[Segment]:
        new = [segment for segment in found if (segment.label, segment.start) not in self.handed_on]
        self.handed_on |= {(segment.label, segment.start) for segment in new}
        return new


def segments_as_they_close(model, infos: list[VideoInfo], scores: list[FrameScores],
                           predictions: list[Iterator[Prediction]], smooth: float = SMOOTH_SECONDS,
                           min_confidence: float | None = None,
                           feature_bank: FeatureBank | None = None) -> Iterator[tuple[str, Segment]]:
    """(video name, segment) for each video in turn, as its frames are predicted: a live stream's as each
    closes, a file's (or a stream's last ones) once its frames are done."""
    for info, frames, answers in zip(infos, scores, predictions):
        closing = ClosedSegments(model, info, frames, smooth, min_confidence, feature_bank)
        for _ in answers:
            if info.live:
                yield from ((info.name, segment) for segment in closing.closed())
        yield from ((info.name, segment) for segment in closing.rest())


def predict_video(model, video: str, topk: int = 5, batch_size: int = 64, tta: str = "none",
                  fps: float | None = None, smooth: float = SMOOTH_SECONDS, min_confidence: float | None = None,
                  progress: bool = False, compile: bool | None = None,
                  feature_bank: FeatureBank | None = None) -> VideoPrediction:
    """Every frame's top-`topk` classes (with `fps`, at most that many frames a second) and the segments of
    time each class holds, the probabilities smoothed over `smooth` seconds first (0: not smoothed).
    `min_confidence`, `feature_bank`: frames below either floor get no class, as predict's images do, and so do
    stretches whose smoothed top probability or similarity stays below it."""
    check_smooth(smooth)
    info = video_info(video)
    scores, failed = FrameScores(), []
    predictions = list(iter_predict_video(model, info, scores, topk, batch_size, tta, fps, min_confidence,
                                          failed, progress, compile, feature_bank))
    times, probabilities = scores.arrays(len(class_names_of(model)))
    return VideoPrediction(info, times, probabilities, predictions,
                           video_segments(model, info, scores, smooth, min_confidence, feature_bank), failed)


def plot_timeline(times: np.ndarray, probabilities: np.ndarray, found: list[Segment], names: list[str],
                  path, title: str, smooth: float = SMOOTH_SECONDS, floor: float | None = None) -> None:
    """The smoothed probability of each class the segments name (the most probable ones, up to
    TIMELINE_CLASSES) over time, under a band with the segments in the same colours; `floor`: the
    min_confidence below which a stretch has no class, as a dashed line."""
    scores = smoothed(times, probabilities, smooth)
    shown = [name for name in dict.fromkeys(segment.label for segment in found) if name is not None]
    shown = sorted(shown, key=lambda name: -scores[:, names.index(name)].sum())[:TIMELINE_CLASSES]
    colour = {name: COLOURS[index % len(COLOURS)] for index, name in enumerate(shown)}
    figure = new_figure(figsize=(10, 4.2))
    band, curves = figure.subplots(2, 1, height_ratios=(1, 5), sharex=True)
    # Segments that overlap (a multi-label model's) get a lane per class; others share one.
    lanes = shown if any(a.end > b.start for a, b in zip(found, found[1:])) else []
    span = max([segment.end for segment in found] + [float(times[-1]) if len(times) else 1.0])
    for segment in found:
        lane = lanes.index(segment.label) if segment.label in lanes else 0
        band.broken_barh([(segment.start, segment.end - segment.start)], (lane, 0.9),
                         facecolors=colour.get(segment.label, "lightgrey"))
        if segment.end - segment.start > span / 12:  # named where the name fits
            band.text((segment.start + segment.end) / 2, lane + 0.45, segment.label or "unsure", ha="center",
                      va="center", fontsize=8, color="white" if segment.label in colour else "black", clip_on=True)
    band.set_yticks([])
    band.set_ylim(0, max(len(lanes), 1))
    band.set_title(title, fontsize=10)
    for name in shown:
        curves.plot(times, scores[:, names.index(name)], color=colour[name], linewidth=1.2, label=name)
    if floor is not None:
        curves.axhline(floor, color="grey", linestyle="--", linewidth=1, label=f"floor {floor:g}")
    curves.set_ylim(0, 1.02)
    curves.set_xlim(0, span)
    curves.set_xlabel("time (s)")
    curves.set_ylabel(f"probability (mean over {smooth:g} s)" if smooth else "probability")
    if shown or floor is not None:
        curves.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    save_png(figure, path)


def video_files(infos: list[VideoInfo], folder: str | Path, suffix: str) -> list[Path]:
    """Where a file for each video goes: FOLDER/NAME`suffix` (".timeline.png"), numbered where two videos share a
    name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [source_file_name(info.path) for info in infos]
    return [folder / (f"{name}{suffix}" if names.count(name) == 1 else f"{name}.{index}{suffix}")
            for index, name in enumerate(names, 1)]


def write_segments(rows: Iterable[tuple[str, Segment]], stream: TextIO) -> int:
    """A CSV of (video, segment) rows: video, start, end (seconds), label (empty: no class reached the floor),
    probability, frames; each row written and flushed as it comes (a live stream's as its segment closes)."""
    writer = csv.writer(stream)
    writer.writerow(["video", "start", "end", "label", "probability", "frames"])
    count = 0
    for count, (video, segment) in enumerate(rows, 1):
        writer.writerow([video, f"{segment.start:.3f}", f"{segment.end:.3f}", segment.label or "",
                         f"{segment.probability:.6f}", segment.frames])
        stream.flush()
    return count


def write_annotated(info: VideoInfo, found: list[Segment], path: Path) -> int:
    """The video again, every frame (whatever `fps` predicted) with the segments it falls in written across its
    top (class and the segment's probability; "unsure" where no class reached the floor), as an MP4 at `path`,
    upright, with its sound; returns how many frames."""
    return write_video(path, (_annotated(frame, found) for frame in video_frames(info.path)), sound_from=info.path)


def _annotated(frame: Frame, found: list[Segment]) -> Frame:
    at = [segment for segment in found if segment.start <= frame.time < segment.end]
    # "(none)": a multi-label model's moment with no class present, or one before the first frame predicted.
    text = ", ".join(f"{segment.label or 'unsure'} {segment.probability:.2f}" for segment in at) or "(none)"
    return Frame(frame.time, captioned(frame.image, text))

