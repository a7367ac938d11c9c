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
`SegmentFinder` finds the segments as the frames come, keeping only the frames still to be smoothed with, so a
live stream's segments close as it goes and it runs for days in the same memory; `TimelineScores` keeps what a
timeline draws in memory that stops growing too. What keeps every frame's probabilities (`predict_video`'s
result, explain's key frames) takes frames x classes x 4 bytes: an hour at 30 frames/s and 1000 classes is
430 MB; `fps` thins it.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image

from .annotate import answer_text, captioned
from .data.frames import (Frame, VideoInfo, VideoWriter, arrived_frames, is_streamed, source_file_name,
                          stop_requests, video_frames, video_info, write_video)
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
TIMELINE_POINTS = 10_000  # a timeline's most points: ten a pixel across its curves (40 MB at 1000 classes)
CLOSED_LOOK_SECONDS = 1.0  # how often (in the video's time) frames are made final, and segments closed
GAP_FRAMES = 100  # a video of unknown length ends a usual gap after its last frame: the median of its last 100


@dataclass
class Segment:
    start: float  # seconds from the video's start
    end: float  # where the next segment starts, or the video ends
    label: str | None  # None: no class reached the floor asked for (min_confidence, a feature bank's)
    probability: float  # the label's smoothed probability averaged over the segment (the top class's, for None)
    frames: int
    # Its frame where its class (or the finder's `peak_of`) is most probable, as the frames' number in the order
    # they were added (from 0); None for a segment of no class. Not compared: where the peak lies is no part of
    # what a segment is.
    peak: int | None = field(default=None, compare=False, repr=False)


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


class TimelineScores:
    """A video's frames' times and probabilities as a timeline draws them, in memory that stops growing: once
    there are more than TIMELINE_POINTS, neighbouring points are merged in pairs (their mean time and mean
    probabilities), so each point stands for 1, 2, 4 ... frames and a week's stream is drawn from as many points
    as a few minutes' (more than the picture has pixels across)."""

    def __init__(self, classes: int):
        self.classes, self.frames_per_point, self.points = classes, 1, 0
        # The points, a batch's at a time (appended without copying those before): times, and probabilities as
        # float32, as the model gives them.
        self._times: list[np.ndarray] = []
        self._probabilities: list[np.ndarray] = []
        # The frames not yet making up a whole point: their count and their sums, time and probabilities.
        self._left = 0
        self._left_sums = np.zeros(1 + classes)

    def add(self, times: list[float], probabilities: torch.Tensor, similarities: list[float] | None) -> None:
        """A batch of frames (the similarities are not drawn)."""
        if len(times) == 0:
            return
        rows = np.concatenate([np.asarray(times, dtype=np.float64)[:, None],
                               probabilities.float().numpy().astype(np.float64)], axis=1)
        rows[0] += self._left_sums
        counts = np.full(len(rows), 1.0)
        counts[0] += self._left
        # Whole points from the frames so far: running sums over the frames, differenced at each k-th frame.
        totals, ends = np.cumsum(counts), np.cumsum(rows, axis=0)
        per = self.frames_per_point
        whole = int(totals[-1]) // per
        if whole:
            at = np.searchsorted(totals, np.arange(1, whole + 1) * per)  # each point's last row
            means = np.diff(ends[at], axis=0, prepend=np.zeros((1, rows.shape[1]))) / per
            self._times.append(means[:, 0].copy())  # not a view, which would keep all of `means`
            self._probabilities.append(means[:, 1:].astype(np.float32))
            self.points += whole
            self._left_sums = ends[-1] - ends[at[-1]]
        else:
            self._left_sums = ends[-1]
        self._left = int(totals[-1]) - whole * per
        while self.points > TIMELINE_POINTS:
            self._merge_pairs()

    def arrays(self, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The points' times and probabilities, the frames not making up a whole point yet as one more."""
        times, probabilities = [np.zeros(0), *self._times], [np.zeros((0, classes), np.float32), *self._probabilities]
        if self._left:
            last = self._left_sums / self._left
            times.append(last[:1])
            probabilities.append(last[None, 1:].astype(np.float32))
        return np.concatenate(times), np.concatenate(probabilities)

    def _merge_pairs(self) -> None:
        """Each two neighbouring points as one; an odd last point goes back to the frames not making up one."""
        times, probabilities = np.concatenate(self._times), np.concatenate(self._probabilities)
        paired = len(times) // 2 * 2
        if paired < len(times):
            self._left += self.frames_per_point
            self._left_sums += np.concatenate([times[-1:], probabilities[-1]]) * self.frames_per_point
        self._times = [times[:paired].reshape(-1, 2).mean(axis=1)]
        self._probabilities = [probabilities[:paired].reshape(-1, 2, self.classes).mean(axis=1)]
        self.points = paired // 2
        self.frames_per_point *= 2


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


def iter_predict_video(model, info: VideoInfo, scores: FrameScores | SegmentFinder, topk: int = 5, batch_size: int = 64,
                       tta: str = "none", fps: float | None = None, min_confidence: float | None = None,
                       failed: list[str] | None = None, progress: bool = False, compile: bool | None = None,
                       feature_bank: FeatureBank | None = None,
                       recording: str | Path | None = None) -> Iterator[Prediction]:
    """The predictions of the frames of the video `info` describes (data.frames.video_info), in order, as they
    are computed; their times and probabilities (and with `feature_bank` their similarities to the nearest
    training image) go to `scores`: a FrameScores keeps them all (for `video_segments`), a SegmentFinder finds the
    segments as they come. `recording`: each frame predicted also goes to this MP4 as it is answered, with its
    answer across its top (a live stream's annotated video: one that cannot be decoded again to draw the
    segments on). The arguments are checked here, before the first prediction is asked for, so that a writer
    has written nothing when one is wrong."""
    check_video_arguments(model, topk, batch_size, tta, fps, min_confidence, feature_bank, compile)
    expected = expected_frames(info, fps)
    if isinstance(model, torch.nn.Module):
        model.eval()
    compiled = feature_bank is None and inference_compile(model, compile, expected or 0)[0]
    return _video_predictions(model, inference_forward(model, compiled, batch_size), info, scores, topk,
                              batch_size, tta, fps, min_confidence, failed, progress, expected, feature_bank,
                              recording)


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


def expected_frames(info: VideoInfo, fps: float | None) -> int | None:
    """About how many frames will be predicted (for the progress bar and the choice to compile)."""
    if fps is not None and info.duration:
        sampled = int(info.duration * fps) + 1
        return min(sampled, info.frames) if info.frames else sampled
    return info.frames


def _video_predictions(model, forward, info: VideoInfo, scores: FrameScores | SegmentFinder, topk: int, batch_size: int,
                       tta: str, fps: float | None, min_confidence: float | None, failed: list[str] | None,
                       progress: bool, expected: int | None, feature_bank: FeatureBank | None,
                       recording: str | Path | None) -> Iterator[Prediction]:
    frame_times: dict[int, float] = {}  # the frames batched and not answered yet, by their index
    # Their pictures too, where they are to be drawn on: a batch's, or two (a batch ahead, not a live stream's).
    pictures: dict[int, Image.Image] | None = {} if recording else None
    with progress_bar(f"predicting {info.name}", progress, unit="frames/s") as bar, \
            stop_requests(is_streamed(info.path)) as stop, \
            VideoWriter(recording, growing=info.live) if recording else nullcontext() as writer:
        task = bar.add_task("frames", total=expected)
        frames = video_frames(info, fps, failed, stop)
        # A live stream's frames are answered as they come: batches of those that arrived, none waited for.
        groups = (arrived_frames(frames, batch_size, stop, info.name, failed) if info.live
                  else batched(frames, batch_size))
        batches = _frame_batches(groups, model, tta, frame_times, pictures)
        for batch, probabilities, features in probabilities_in_flight(forward, batches, tta, is_multi_label(model),
                                                                      features=feature_bank is not None,
                                                                      ahead=not info.live):
            times = [frame_times.pop(index) for index in batch.indices]
            predictions = batch_predictions(model, [frame_source(info.name, time) for time in times], probabilities,
                                            features, topk, min_confidence, feature_bank)
            scores.add(times, probabilities, [p.similarity for p in predictions] if feature_bank else None)
            if writer is not None:
                for index, time, prediction in zip(batch.indices, times, predictions):
                    writer.add(Frame(time, captioned(pictures.pop(index), answer_text(prediction))))
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


def _frame_batches(groups: Iterator[list[Frame]], model, tta: str, frame_times: dict[int, float],
                   pictures: dict[int, Image.Image] | None = None) -> Iterator[InferenceBatch]:
    """Each group of frames resized and center-cropped as the model's preprocessing says, as a batch on the
    model's device; each frame's time goes into `frame_times` under the index the batch gives it, and its
    picture into `pictures`, where given."""
    pre = model.preprocessing
    crop = tta_image_size(pre, tta)
    device = model_device(model)
    seen = 0
    for group in groups:
        images = torch.stack([resize_center_crop(frame.image, pre.resize_size, crop, pre.interpolation)
                              for frame in group])
        indices = list(range(seen, seen + len(group)))
        frame_times.update(zip(indices, (frame.time for frame in group)))
        if pictures is not None:
            pictures.update(zip(indices, (frame.image for frame in group)))
        seen += len(group)
        yield InferenceBatch(indices, images.to(device), [])


def smoothed(times: np.ndarray, probabilities: np.ndarray, seconds: float) -> np.ndarray:
    """Each frame's probabilities averaged over the frames within `seconds` / 2 of it (0: as they are)."""
    if seconds == 0 or len(times) == 0:
        return probabilities
    # Window sums from running sums: one pass, whatever the window, and right for uneven frame times; summed in
    # float64 whatever the probabilities' type, so a long video's sums keep their small differences.
    running = np.zeros((len(probabilities) + 1, probabilities.shape[1]))
    np.cumsum(probabilities, axis=0, out=running[1:])
    first = np.searchsorted(times, times - seconds / 2, side="left")
    last = np.searchsorted(times, times + seconds / 2, side="right")
    return (running[last] - running[first]) / (last - first)[:, None]


def segments(times: np.ndarray, probabilities: np.ndarray, names: list[str], end: float | None = None,
             smooth: float = SMOOTH_SECONDS, min_confidence: float | None = None,
             thresholds: np.ndarray | None = None, similarities: np.ndarray | None = None,
             similarity_floor: float | None = None) -> list[Segment]:
    """The stretches of time each answer holds, in order of their start. `end`: when the video ends (else the
    last frame's time plus the usual gap between the last frames). `thresholds`: a multi-label model's, per
    class: then each class has its own segments, where its smoothed probability reaches its threshold. A
    single-label model's frames have no class where the smoothed top probability is below `min_confidence`, or
    the smoothed `similarities` (to the nearest training image, per frame) below `similarity_floor`. Frames out
    of time order (a damaged stream's timestamps can step back) are put in order first."""
    finder = SegmentFinder(names, end, smooth, min_confidence, thresholds, similarity_floor)
    finder.add(times, probabilities, similarities)
    return finder.finish()


class SegmentFinder:
    """A video's segments found as its frames come, in memory that does not grow with the video (a live stream
    can run for days). A frame's smoothed probabilities are final once the frames `smooth` / 2 seconds after it
    have come; consecutive final frames with the same answer extend the segment open on it, and the first that
    differs closes it (its end: that frame's time). So it keeps only the frames still needed to smooth those not
    final yet, and each open segment's running sums. Frames are made final at most once per CLOSED_LOOK_SECONDS
    of the video's time.

    `add` takes each batch of frames; `closed` hands on the segments closed since it was last called; `finish`,
    at the video's end, closes the rest and hands on those not handed on yet; `found` is every segment so far.
    A frame timed before frames already final (a damaged live stream's timestamps stepping back) counts at the
    last of their times. `record`: every frame also goes to it (for a timeline). Each segment's `peak` is its
    frame where its class, or the class `peak_of`, is most probable (unsmoothed): its key frame; `candidates`
    says which frames may yet be one, so that a caller keeping their pictures can let go of the others."""

    def __init__(self, names: list[str], end: float | None = None, smooth: float = SMOOTH_SECONDS,
                 min_confidence: float | None = None, thresholds: np.ndarray | None = None,
                 similarity_floor: float | None = None, record: FrameScores | TimelineScores | None = None,
                 peak_of: int | None = None):
        check_smooth(smooth)
        self.names, self.end, self.smooth, self.record, self.peak_of = names, end, smooth, record, peak_of
        self.min_confidence, self.thresholds, self.similarity_floor = min_confidence, thresholds, similarity_floor
        self.frames = 0  # added so far
        self._summed = np.zeros(len(names), dtype=np.float64)  # every frame's probabilities, summed
        # The frames kept, in time order: the first `_final` are final (kept as the others' smoothing window).
        self._times, self._similarities = np.zeros(0), np.zeros(0)
        self._probabilities = np.zeros((0, len(names)), dtype=np.float32)  # as the model gives them
        self._numbers = np.zeros(0, dtype=np.int64)  # each frame's number: the order it was added in
        self._final = 0
        self._final_until = -np.inf  # the time of the last frame made final
        self._arrived: list[tuple[np.ndarray, ...]] = []  # added since the last look, as the four above
        self._recent_times: deque[float] = deque(maxlen=GAP_FRAMES + 1)  # for the last frame's length
        self._newest, self._looked_at = -np.inf, -np.inf
        # Per answer (a class's index; len(names): no class) the segment open on it: [start, summed probability,
        # frames, its peak's unsmoothed probability, its peak's number].
        self._open: dict[int, list] = {}
        self._closed: list[Segment] = []  # since `closed` was last called
        self._found: list[Segment] = []
        self._finished = False

    @property
    def kept_frames(self) -> int:
        """How many frames' probabilities are held now."""
        return len(self._times) + sum(len(part[0]) for part in self._arrived)

    @property
    def candidates(self) -> tuple[int, set[int]]:
        """The frames that may yet be a segment's peak: (the number from which on every frame may; the numbers of
        the open segments' peaks so far). The frames not final yet are the numbers from the first."""
        waiting = [self._numbers[self._final:], *(part[3] for part in self._arrived)]
        first = min((int(numbers.min()) for numbers in waiting if len(numbers)), default=self.frames)
        return first, {run[4] for run in self._open.values() if run[4] is not None}

    @property
    def found(self) -> list[Segment]:
        """Every segment closed so far, in order of start."""
        return sorted(self._found, key=_in_order)

    @property
    def mean_probabilities(self) -> np.ndarray | None:
        """Each class's probability averaged over every frame added (None before the first): the video's as a
        whole, as eval scores a clip."""
        return (self._summed / self.frames).astype(np.float32) if self.frames else None

    def add(self, times: list[float] | np.ndarray, probabilities: torch.Tensor | np.ndarray,
            similarities: list[float] | np.ndarray | None = None) -> None:
        if self.record is not None:
            self.record.add(times, probabilities, similarities)
        if len(times) == 0:
            return
        times = np.asarray(times, dtype=np.float64)
        if isinstance(probabilities, torch.Tensor):
            probabilities = probabilities.float().numpy()
        self._summed += probabilities.sum(axis=0, dtype=np.float64)
        similarities = np.zeros(len(times)) if similarities is None else similarities
        numbers = np.arange(self.frames, self.frames + len(times), dtype=np.int64)
        self._arrived.append((times, np.asarray(probabilities), np.asarray(similarities, dtype=np.float64), numbers))
        self.frames += len(times)
        self._recent_times.extend(times[-(GAP_FRAMES + 1):].tolist())
        self._newest = max(self._newest, float(times.max()))
        if self._newest >= self._looked_at + CLOSED_LOOK_SECONDS:
            self._looked_at = self._newest
            self._make_final(before=self._newest - self.smooth / 2)

    def closed(self) -> list[Segment]:
        """The segments closed since the last call, in order of start."""
        closed, self._closed = self._closed, []
        return sorted(closed, key=_in_order)

    def finish(self) -> list[Segment]:
        """At the video's end: every frame made final, the segments still open closed; returns the segments not
        handed on by `closed` yet. Once: later calls return none."""
        if not self._finished:
            self._finished = True
            self._make_final(before=np.inf)
            if self._open:
                last = float(self._times[-1])
                recent = np.sort(np.fromiter(self._recent_times, dtype=np.float64))
                gap = float(np.median(np.diff(recent))) if len(recent) > 1 else 0.0
                end = self.end if self.end is not None and self.end > last else last + gap
                for answer, run in sorted(self._open.items()):
                    self._close(answer, run, end)
                self._open.clear()
        return self.closed()

    def _make_final(self, before: float) -> None:
        """Make the frames timed before `before` final: extend or close the segments with their answers, then
        let go of the frames no frame still to come is smoothed with."""
        self._take_arrived()
        stop = self._final + int(np.searchsorted(self._times[self._final:], before, side="left"))
        if stop > self._final:
            final = slice(self._final, stop)
            times, raw, numbers = self._times[final], self._probabilities[final], self._numbers[final]
            scores = smoothed(self._times, self._probabilities, self.smooth)[final]
            if self.thresholds is not None:  # each class its own segments, where it reaches its threshold
                present = scores >= self.thresholds
                columns = {answer: (present[:, answer], scores[:, answer])
                           for answer in np.flatnonzero(present.any(axis=0)).tolist()}
            else:  # one answer a frame: the top class, or none where it (or the similarity) is below its floor
                held = scores.max(axis=1)
                unsure = held < self.min_confidence if self.min_confidence is not None else np.zeros(len(held), bool)
                if self.similarity_floor is not None:
                    similarity = smoothed(self._times, self._similarities[:, None], self.smooth)[final, 0]
                    unsure |= similarity < self.similarity_floor
                answers = np.where(unsure, len(self.names), scores.argmax(axis=1))
                columns = {answer: (answers == answer, held) for answer in np.unique(answers).tolist()}
            absent = (np.zeros(len(times), bool), None)
            for answer in sorted(columns.keys() | self._open.keys()):
                peaked = (None if answer == len(self.names)
                          else raw[:, self.peak_of if self.peak_of is not None else answer])
                self._extend(answer, *columns.get(answer, absent), times, peaked, numbers)
            self._final, self._final_until = stop, float(times[-1])
        if len(self._times):
            needed_from = self._times[min(self._final, len(self._times) - 1)] - self.smooth / 2
            let_go = int(np.searchsorted(self._times, needed_from, side="left"))
            self._times, self._probabilities = self._times[let_go:], self._probabilities[let_go:]
            self._similarities, self._numbers = self._similarities[let_go:], self._numbers[let_go:]
            self._final -= let_go

    def _take_arrived(self) -> None:
        """The frames added since the last look join those kept, the frames not final yet in time order."""
        if not self._arrived:
            return
        kept = (self._times, self._probabilities, self._similarities, self._numbers)
        waiting = [tuple(array[self._final:] for array in kept), *self._arrived]
        waiting = [part for part in waiting if len(part[0])]
        self._arrived = []
        # Copied only where needed: a whole video given at once is one part, in order, and nothing kept before it.
        parts = waiting[0] if len(waiting) == 1 else tuple(np.concatenate(part) for part in zip(*waiting))
        if np.any(np.diff(parts[0]) < 0):
            order = np.argsort(parts[0], kind="stable")
            parts = tuple(array[order] for array in parts)
        parts = (np.maximum(parts[0], self._final_until), *parts[1:])
        if self._final:
            parts = tuple(np.concatenate([array[:self._final], part]) for array, part in zip(kept, parts))
        self._times, self._probabilities, self._similarities, self._numbers = parts

    def _extend(self, answer: int, present: np.ndarray, held: np.ndarray | None, times: np.ndarray,
                peaked: np.ndarray | None, numbers: np.ndarray) -> None:
        """The frames at `times`, made final, given to the segments of one answer: `present`, where they have it;
        `held`, its smoothed probability; `peaked`, the unsmoothed probability its peak is chosen by (None: no
        peak); `numbers`, the frames' numbers."""
        if answer in self._open and not present[0]:
            self._close(answer, self._open.pop(answer), times[0])
        for start, stop in _run_bounds(present):
            if not present[start]:
                continue
            run = (self._open.pop(answer) if start == 0 and answer in self._open
                   else [float(times[start]), 0.0, 0, -np.inf, None])
            run[1] += float(held[start:stop].sum())
            run[2] += stop - start
            if peaked is not None:
                top = start + int(np.argmax(peaked[start:stop]))
                if peaked[top] > run[3]:  # of equals the first, as np.argmax over the whole segment would choose
                    run[3], run[4] = float(peaked[top]), int(numbers[top])
            if stop < len(present):
                self._close(answer, run, times[stop])
            else:
                self._open[answer] = run

    def _close(self, answer: int, run: list, end: float) -> None:
        start, summed, frames, _, peak = run
        label = self.names[answer] if answer < len(self.names) else None
        segment = Segment(start, float(end), label, summed / frames, frames, peak)
        self._closed.append(segment)
        self._found.append(segment)


def _in_order(segment: Segment) -> tuple[float, str]:
    return segment.start, segment.label or ""


def _run_bounds(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal consecutive values."""
    changes = np.flatnonzero(values[1:] != values[:-1]) + 1
    bounds = np.concatenate([[0], changes, [len(values)]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def segment_finder(model, info: VideoInfo, smooth: float = SMOOTH_SECONDS, min_confidence: float | None = None,
                   feature_bank: FeatureBank | None = None, record: FrameScores | TimelineScores | None = None,
                   peak_of: int | None = None) -> SegmentFinder:
    """A SegmentFinder for a video predicted by `model` (its classes, and a multi-label model's thresholds; with
    the `feature_bank` it is predicted with, its floor of similarity)."""
    return SegmentFinder(class_names_of(model), info.duration, smooth, min_confidence,
                         class_thresholds(model) if is_multi_label(model) else None,
                         feature_bank.floor if feature_bank is not None else None, record, peak_of)


def video_segments(model, info: VideoInfo, scores: FrameScores, smooth: float = SMOOTH_SECONDS,
                   min_confidence: float | None = None, feature_bank: FeatureBank | None = None,
                   peak_of: int | None = None) -> list[Segment]:
    """The segments of a video whose frames' `scores` were all kept, predicted by `model` (with `feature_bank`)."""
    finder = segment_finder(model, info, smooth, min_confidence, feature_bank, peak_of=peak_of)
    finder.add(*scores.arrays(len(finder.names)), scores.similarities if feature_bank is not None else None)
    return finder.finish()


def segments_as_they_close(infos: list[VideoInfo], finders: list[SegmentFinder],
                           predictions: list[Iterator[Prediction]]) -> Iterator[tuple[str, Segment]]:
    """(video name, segment) for each video in turn, as its frames are predicted (their scores going to its
    finder): a live stream's as each closes, a file's (or a stream's last ones) once its frames are done."""
    for info, finder, answers in zip(infos, finders, predictions):
        for _ in answers:
            if info.live:
                yield from ((info.name, segment) for segment in finder.closed())
        yield from ((info.name, segment) for segment in finder.finish())


def video_prediction(model, info: VideoInfo, finder: SegmentFinder, answers: Iterator[Prediction], topk: int,
                     min_confidence: float | None = None) -> Iterator[Prediction]:
    """The video's one Prediction, named by it, from the mean of its frames' probabilities (the finder's), once
    `answers` (its frames') are all through; none where no frame was decoded (`failed` says why)."""
    for _ in answers:
        pass
    if finder.mean_probabilities is not None:
        yield from batch_predictions(model, [info.name], torch.from_numpy(finder.mean_probabilities[None]), None, topk,
                                     min_confidence)


def predict_video(model, video: str, topk: int = 5, batch_size: int = 64, tta: str = "none",
                  fps: float | None = None, smooth: float = SMOOTH_SECONDS, min_confidence: float | None = None,
                  progress: bool = False, compile: bool | None = None,
                  feature_bank: FeatureBank | None = None) -> VideoPrediction:
    """Every frame's top-`topk` classes (with `fps`, at most that many frames a second) and the segments of
    time each class holds, the probabilities smoothed over `smooth` seconds first (0: not smoothed).
    `min_confidence`, `feature_bank`: frames below either floor get no class, as predict's images do, and so do
    stretches whose smoothed top probability or similarity stays below it."""
    check_smooth(smooth)
    info = video_info(video, keep_open=True)
    scores, failed = FrameScores(), []
    try:
        predictions = list(iter_predict_video(model, info, scores, topk, batch_size, tta, fps, min_confidence,
                                              failed, progress, compile, feature_bank))
    finally:  # a live source left unread (an argument refused) is let go at once, not when collected
        if info.opened:
            info.opened.close()
    times, probabilities = scores.arrays(len(class_names_of(model)))
    return VideoPrediction(info, times, probabilities, predictions,
                           video_segments(model, info, scores, smooth, min_confidence, feature_bank), failed)


def plot_timeline(times: np.ndarray, probabilities: np.ndarray, found: list[Segment], names: list[str],
                  path, title: str, smooth: float = SMOOTH_SECONDS, floor: float | None = None,
                  frames_per_point: int = 1) -> None:
    """The smoothed probability of each class the segments name (the most probable ones, up to
    TIMELINE_CLASSES) over time, under a band with the segments in the same colours; `floor`: the
    min_confidence below which a stretch has no class, as a dashed line; `frames_per_point`: how many frames
    each of the points given stands for (TimelineScores'), said under the curves."""
    shown = [name for name in dict.fromkeys(segment.label for segment in found) if name is not None]
    shown = sorted(shown, key=lambda name: -probabilities[:, names.index(name)].sum())[:TIMELINE_CLASSES]
    # Only the curves drawn are smoothed: a 1000-class model's every column would take 8 bytes x 3 x classes a point.
    scores = smoothed(times, probabilities[:, [names.index(name) for name in shown]], smooth)
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
    for column, name in enumerate(shown):
        curves.plot(times, scores[:, column], color=colour[name], linewidth=1.2, label=name)
    if floor is not None:
        curves.axhline(floor, color="grey", linestyle="--", linewidth=1, label=f"floor {floor:g}")
    curves.set_ylim(0, 1.02)
    curves.set_xlim(0, span)
    curves.set_xlabel("time (s)" if frames_per_point == 1 else
                      f"time (s); each point the mean of {frames_per_point} frames")
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

