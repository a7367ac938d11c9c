"""The frames of a video file, as a player shows them, for predicting on videos.

FFmpeg decodes them, through PyAV (optional: pip install av, or residual[video]). A frame comes out as an RGB
PIL image turned upright: phones store video sideways and put the turn in the display matrix, as they put it in
a photo's EXIF orientation. Each frame carries its time in seconds from the video's start, read from its own
timestamp, so variable-rate video (phones again) is timed right.

`fps` samples the video: at most that many frames per second, the first frame at or after each tick.

`write_video` writes frames back out (H.264 in an MP4), each at its own time.

Bad input is reported, never dropped in silence: a file FFmpeg cannot open is refused in one line naming it, and
a packet it cannot decode, or a frame it marks as damaged, is skipped and goes to `failed`, one line per kind of
damage with how many frames and when.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from ..atomic import atomic_path
from ..errors import ConfigError
from .decode import BadImageError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


def is_video_file(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int  # as shown: a turned video's sides swapped
    height: int
    rate: float | None  # average frames per second, where the file says
    duration: float | None  # seconds, where the file says
    frames: int | None  # where the file says (a count, or duration x rate)
    rotation: int  # degrees the frames are turned counter-clockwise to be shown upright


@dataclass(frozen=True)
class Frame:
    time: float  # seconds from the video's start
    image: Image.Image  # RGB, upright


def _av():
    try:
        import av
    except ImportError:
        raise ConfigError("videos are decoded by FFmpeg through PyAV, which is not installed: pip install av "
                            "(or residual[video])") from None
    return av


def _open(path: str | os.PathLike):
    """The container and its first video stream, or a one-line BadImageError naming the file."""
    av = _av()
    if not Path(path).is_file():
        raise BadImageError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise BadImageError(f"{path}: not a video FFmpeg can read ({error.strerror}); is the file complete?") from None
    if not container.streams.video:
        container.close()
        raise BadImageError(f"{path}: has no video stream (only {len(container.streams)} other stream(s))")
    return container, container.streams.video[0]


def video_info(path: str | os.PathLike) -> VideoInfo:
    """What the file says about its video stream, without decoding it."""
    container, stream = _open(path)
    with container:
        rate = float(stream.average_rate) if stream.average_rate else None
        duration = (float(stream.duration * stream.time_base) if stream.duration is not None
                    else container.duration / 1e6 if container.duration is not None else None)
        frames = stream.frames or (round(duration * rate) if duration and rate else None)
        rotation = _stream_rotation(stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation % 180:
            width, height = height, width
        return VideoInfo(str(path), width, height, rate, duration, frames, rotation)


def _stream_rotation(stream) -> int:
    """The turn the stream's display matrix asks for, read from its first frame (where FFmpeg puts it); 0 where
    that frame cannot be decoded (video_frames reports the damage, and turns each frame by its own)."""
    try:
        for frame in stream.container.decode(stream):
            return round(frame.rotation)
    except _av().error.FFmpegError:
        pass
    return 0


def video_frames(path: str | os.PathLike, fps: float | None = None,
                 failed: list[str] | None = None) -> Iterator[Frame]:
    """The frames of `path` in order (with `fps`, at most that many per second), upright, in RGB.

    FFmpeg decodes with its own threads. Frames lost to damage are reported in `failed` once the video ends."""
    if fps is not None and fps <= 0:
        raise ConfigError(f"--fps must be above 0, got {fps}")
    av = _av()
    container, stream = _open(path)
    stream.thread_type = "AUTO"  # frame and slice threads: several times faster on large frames
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    rate = float(stream.average_rate) if stream.average_rate else None
    listed = stream.frames  # how many the file's index lists; 0 where it does not say
    damage: dict[str, list[float]] = {}  # what was skipped ("packets ...", "frames ...") -> when
    next_tick, decoded, at = 0.0, 0, 0.0
    with container:
        for packet in container.demux(stream):
            if packet.pts is not None:  # the flushing packet at the end has none: its damage is the last time's
                at = float(packet.pts * stream.time_base) - start
            try:
                frames = packet.decode()
            except av.error.FFmpegError as error:
                damage.setdefault(f"packet(s) FFmpeg could not decode ({error.strerror})", []).append(at)
                continue
            for frame in frames:
                decoded += 1
                time = float(frame.time) - start if frame.time is not None else (decoded - 1) / (rate or 1)
                if frame.is_corrupt:
                    damage.setdefault("frame(s) FFmpeg marked as damaged", []).append(time)
                    continue
                if fps is not None:
                    if time < next_tick - 1e-6:
                        continue
                    next_tick = (int(time * fps + 1e-6) + 1) / fps
                image = frame.to_image()
                yield Frame(time, image.rotate(frame.rotation, expand=True) if frame.rotation else image)
    # Decoding in threads, FFmpeg reports a damaged packet late, with a later packet, and two damaged in a row may
    # come out as one report: frames the index lists beyond those decoded or reported are damage too.
    unaccounted = listed - decoded - sum(len(times) for what, times in damage.items() if what.startswith("packet"))
    if failed is not None:
        failed += [f"{path}: skipped {len(times)} {what.replace('(s)', 's' if len(times) > 1 else '')} "
                   + (f"from {min(times):.2f} s to {max(times):.2f} s" if max(times) > min(times)
                      else f"at {times[0]:.2f} s") for what, times in damage.items()]
        if damage and unaccounted > 0:
            failed.append(f"{path}: skipped {unaccounted} more frame{'s' if unaccounted > 1 else ''} the file lists, "
                          f"in the damage above")


def write_video(path: str | os.PathLike, frames: Iterable[Frame]) -> int:
    """`frames` as an MP4 at `path` (H.264 where PyAV's FFmpeg has it, else MPEG-4), each shown at its own time,
    written atomically; returns how many. Sides are cut to even numbers of pixels, as 4:2:0 colour needs."""
    av = _av()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    count, last_pts = 0, -1
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=1000)
        stream.codec_context.time_base = Fraction(1, 1000)  # milliseconds: any frame's own time, to a ms
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        for frame in frames:
            if count == 0:
                stream.width, stream.height = frame.image.width // 2 * 2, frame.image.height // 2 * 2
            picture = av.VideoFrame.from_image(frame.image.crop((0, 0, stream.width, stream.height)))
            # Strictly increasing, as the encoder requires, even for two frames within one millisecond.
            last_pts = picture.pts = max(round(frame.time * 1000), last_pts + 1)
            picture.time_base = Fraction(1, 1000)
            container.mux(stream.encode(picture))
            count += 1
        container.mux(stream.encode())
    return count
