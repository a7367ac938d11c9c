"""The frames of a video file, as a player shows them, for predicting on videos.

FFmpeg decodes them, through PyAV (optional: pip install av, or residual[video]). A frame comes out as an RGB
PIL image turned upright: phones store video sideways and put the turn in the display matrix, as they put it in
a photo's EXIF orientation. Each frame carries its time in seconds from the video's start, read from its own
timestamp, so variable-rate video (phones again) is timed right.

`fps` samples the video: at most that many frames per second, the first frame at or after each tick.

A stream (rtsp://, http://, udp:// ... : a camera, a live broadcast) is read as a file is, but for this: a
stream that stays silent for STREAM_TIMEOUT seconds, or breaks off, has stopped (said in `failed`, and the
frames before it kept); one also ends when the user says so (`stop_requests`: Ctrl-C or SIGTERM; the frames so
far are kept, and a second Ctrl-C stops at once); `arrived_frames` hands on a live stream's frames as they come,
not once a batch has filled; and its password is never shown (`VideoInfo.name`). A camera on this machine
(/dev/video0, or camera:0 for the same: FFmpeg's Video4Linux input, on Linux) is read as a live stream, at the
picture size, rate and format it is set to, or at those its source asks for: camera:0,size=1280x720,fps=30,format=mjpeg
(commas, not a URL's ? and &, which a shell would take for its own).

`write_video` writes frames back out (H.264 in an MP4), each at its own time; `VideoWriter` takes them one at a
time, as a live stream's come. A live source given to `video_info(..., keep_open=True)` stays open, and
`video_frames(info)` reads on from it: it is opened once.

Bad input is reported, never dropped in silence: a file FFmpeg cannot open is refused in one line naming it, and
a packet it cannot decode, or a frame it marks as damaged, is skipped and goes to `failed`, one line per kind of
damage with how many frames and when.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from ..atomic import atomic_path
from ..errors import ConfigError
from .decode import BadImageError, missing_file

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts",
                    ".mts", ".m2ts")  # the last three: MPEG transport streams (broadcasts, camcorders)
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
STREAM_TIMEOUT = 10.0  # seconds a stream may stay silent, opening or playing, before it counts as stopped
# A recording that grows as a live stream is answered: fragmented MP4, a fragment a second, each written out at once.
GROWING_MP4 = {"movflags": "empty_moov+default_base_moof+frag_keyframe", "frag_duration": "1000000",
               "flush_packets": "1"}
CAMERA = re.compile(r"(/dev/video(\d+)|camera:(\d+))((?:,[^,]*)*)")  # the device, then its settings
CAMERA_INPUT = "v4l2"  # FFmpeg's Video4Linux2 input device, which PyAV's Linux wheels include
# A camera's settings, as its source names them -> the Video4Linux input's options, and what each takes.
CAMERA_SETTINGS = {"size": ("video_size", re.compile(r"[1-9]\d*x[1-9]\d*")),
                   # a number or fraction above 0: 30, 7.5, 30000/1001
                   "fps": ("framerate", re.compile(r"(?!0+(\.0*)?(/|$))\d+(\.\d+)?(/[1-9]\d*)?")),
                   "format": ("input_format", re.compile(r"[a-z0-9_]+"))}

log = logging.getLogger(__name__)


def is_video_file(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(VIDEO_EXTENSIONS)


def is_stream(source) -> bool:
    """An address FFmpeg reads over the network: rtsp://camera/live, http://host/live.ts, udp://@:5000 ..."""
    return isinstance(source, str) and "://" in source and urlsplit(source).scheme.lower() in STREAM_SCHEMES


def is_camera(source) -> bool:
    """A camera on this machine: /dev/video0, or camera:0 for the same."""
    return isinstance(source, str) and CAMERA.fullmatch(source) is not None


def camera_number(source: str) -> int:
    _, device, number, _ = CAMERA.fullmatch(source).groups()
    return int(device if device is not None else number)


def camera_device(source: str) -> str:
    """The device file a camera source names: camera:N is /dev/videoN."""
    return f"/dev/video{camera_number(source)}"


def camera_settings(source: str) -> dict[str, str]:
    """The settings a camera source asks for (camera:0,size=1280x720,fps=30,format=mjpeg -> {"size": "1280x720",
    ...}), each checked; a ConfigError naming the source where one is not a setting or not a value it takes."""
    settings: dict[str, str] = {}
    for setting in CAMERA.fullmatch(source).group(4).split(",")[1:]:
        key, _, value = setting.partition("=")
        if key not in CAMERA_SETTINGS or not CAMERA_SETTINGS[key][1].fullmatch(value) or key in settings:
            why = (f"{key} given twice" if key in settings
                   else f"{setting!r}: not a valid {key}" if key in CAMERA_SETTINGS
                   else f"{setting!r} is not a setting")
            raise ConfigError(f"{source}: {why}; a camera takes size=WIDTHxHEIGHT, fps=N and format=NAME (mjpeg, "
                              f"yuyv422, h264 ...), as in camera:0,size=1280x720,fps=30; v4l2-ctl -d "
                              f"{camera_device(source)} --list-formats-ext lists what it can do")
        settings[key] = value
    return settings


def is_streamed(source) -> bool:
    """Read as it comes, and ended by the user: a network address or a camera."""
    return is_stream(source) or is_camera(source)


def is_video_source(source) -> bool:
    return is_streamed(source) or is_video_file(source)


def shown_source(source: str) -> str:
    """`source` as it may be printed and written: a stream's password (rtsp://admin:PASSWORD@camera) hidden, a
    camera's settings left to its own line (/dev/video0,fps=30 is /dev/video0)."""
    if is_camera(source):
        return CAMERA.fullmatch(source).group(1)
    if not is_stream(source):
        return source
    parts = urlsplit(source)
    if parts.password is None:
        return source
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def source_file_name(source: str) -> str:
    """A file name standing for `source`: its own name, a camera's device (video0), or a stream's host and path
    (camera.local-554-live)."""
    if is_camera(source):
        return f"video{camera_number(source)}"
    if not is_stream(source):
        return Path(source).name
    parts = urlsplit(source)
    name = re.sub(r"[^A-Za-z0-9._]+", "-", f"{parts.hostname or ''}-{parts.port or ''}-{parts.path}")
    return re.sub(r"-{2,}", "-", name).strip("-.") or parts.scheme


@dataclass(frozen=True)
class VideoInfo:
    path: str  # a file, or a stream's address (with its password, where it has one: never print it)
    width: int  # as shown: a turned video's sides swapped
    height: int
    rate: float | None  # average frames per second, where the file says
    duration: float | None  # seconds, where the file says
    frames: int | None  # where the file says (a count, or duration x rate)
    rotation: int  # degrees the frames are turned counter-clockwise to be shown upright
    # A live source as video_info(..., keep_open=True) left it, for video_frames to read on.
    opened: OpenedSource | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The video as it is printed and written: a stream's password hidden."""
        return shown_source(self.path)

    @property
    def live(self) -> bool:
        """A stream with no known end (a camera, a broadcast): it cannot be read a second time."""
        return is_camera(self.path) or (is_stream(self.path) and self.duration is None)


class OpenedSource:
    """A live source kept open from `video_info` to `video_frames`, which reads on from where it was: such a source
    cannot be counted on to open a second time (a tcp://...?listen address's sender connects once), and what it
    sent between two openings would be lost. The frames decoded to find the rotation are the first read."""

    def __init__(self, container, stream, decoded: list):
        self._held = (container, stream, decoded)

    def take(self) -> tuple | None:
        """(container, stream, frames decoded already) the first time; None after: opened again."""
        held, self._held = self._held, None
        return held

    def close(self) -> None:
        """Let the source go unread (a no-op once taken)."""
        if held := self.take():
            held[0].close()


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
    """The container and its first video stream, or a one-line BadImageError naming the file or stream."""
    av = _av()
    if is_stream(path):
        return _open_stream(av, str(path))
    if is_camera(path):
        return _open_camera(av, str(path))
    if not Path(path).is_file():
        raise missing_file(Path(path))
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise BadImageError(f"{path}: not a video FFmpeg can read ({error.strerror}); is the file complete?") from None
    return _video_stream(container, path)


def _open_stream(av, address: str):
    # RTSP's pictures over the connection it opened (TCP) where the server offers it, else over UDP, FFmpeg's first
    # choice: UDP loses packets on a busy network, and a lost packet smears the frames up to the next key frame.
    options = {"rtsp_flags": "prefer_tcp"} if urlsplit(address).scheme.lower() in ("rtsp", "rtsps") else {}
    try:  # a timeout for opening and for each read: a camera that is off or stops sending does not hang us
        container = av.open(address, options=options, timeout=(STREAM_TIMEOUT, STREAM_TIMEOUT))
    except av.error.ExitError:
        raise BadImageError(f"{shown_source(address)}: no answer in {STREAM_TIMEOUT:g} s; is the address right and "
                            f"the camera or server sending?") from None
    except av.error.ProtocolNotFoundError:
        raise BadImageError(f"{shown_source(address)}: PyAV's FFmpeg does not read {urlsplit(address).scheme}:// "
                            f"addresses; relay the stream as rtsp://, http:// or udp://") from None
    except (av.error.FFmpegError, OSError) as error:
        raise BadImageError(f"{shown_source(address)}: cannot be read "
                            f"({getattr(error, 'strerror', None) or error}); check the address, the port and "
                            f"the name and password") from None
    return _video_stream(container, shown_source(address))


def _open_camera(av, source: str):
    if sys.platform != "linux":
        raise BadImageError(f"{source}: cameras are read through Linux's Video4Linux; here, stream the camera with "
                            f"FFmpeg and give udp://@:5000 (on a Mac: ffmpeg -f avfoundation -framerate 30 -i 0 "
                            f"-f mpegts udp://127.0.0.1:5000; on Windows: ffmpeg -f dshow -i video=NAME ...)")
    device, settings = camera_device(source), camera_settings(source)
    # The container's options only: given to the decoder as well, a size the driver did not keep would be read as
    # the frames' size.
    options = {CAMERA_SETTINGS[key][0]: value for key, value in settings.items()}
    try:  # at the picture size, rate and format asked for, else those the camera is set to (v4l2-ctl sets them)
        container = av.open(device, format=CAMERA_INPUT, container_options=options,
                            timeout=(STREAM_TIMEOUT, STREAM_TIMEOUT))
    except FileNotFoundError:
        cameras = sorted(str(path) for path in Path("/dev").glob("video*"))
        raise BadImageError(f"{source}: no such camera ("
                            + (f"the cameras here: {', '.join(cameras)})" if cameras else "none here: no /dev/video*)")
                            ) from None
    except PermissionError:
        raise BadImageError(f"{device}: not allowed to read this camera; add yourself to its group (sudo usermod "
                            f"-aG video $USER, then log in again)") from None
    except ValueError:  # the format unknown: an FFmpeg built without it
        raise BadImageError(f"{device}: this PyAV's FFmpeg has no Video4Linux input; install PyAV's own wheel "
                            f"(pip install av)") from None
    except (av.error.FFmpegError, OSError) as error:
        reason = getattr(error, "strerror", None) or error
        why = ("in use by another program" if error.errno == errno.EBUSY
               else f"{reason} with {', '.join(f'{key}={value}' for key, value in settings.items())}; v4l2-ctl -d "
                    f"{device} --list-formats-ext lists the sizes, rates and formats it takes" if settings
               else f"{reason}; a camera often has a second device, for metadata, which gives no pictures: "
                    f"v4l2-ctl --list-devices names each")
        raise BadImageError(f"{device}: cannot be read as a camera ({why})") from None
    return _video_stream(container, source)


def _video_stream(container, name):
    if not container.streams.video:
        container.close()
        raise BadImageError(f"{name}: has no video stream (only {len(container.streams)} other stream(s))")
    stream = container.streams.video[0]
    # Frame and slice threads, several times faster on large frames; set before the first frame is decoded, which
    # opens the decoder.
    stream.thread_type = "AUTO"
    return container, stream


def video_info(path: str | os.PathLike, keep_open: bool = False) -> VideoInfo:
    """What the file says about its video stream, and the first frame's turn. With `keep_open`, a live source
    (`VideoInfo.live`) is left open for `video_frames(info)` to read on."""
    container, stream = _open(path)
    try:
        rate = float(stream.average_rate) if stream.average_rate else None
        duration = (float(stream.duration * stream.time_base) if stream.duration is not None
                    else container.duration / 1e6 if container.duration is not None else None)
        frames = stream.frames or (round(duration * rate) if duration and rate else None)
        rotation, decoded = _stream_rotation(stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation % 180:
            width, height = height, width
        if is_camera(path):
            _say_settings_not_kept(str(path), width, height, rate)
        info = VideoInfo(str(path), width, height, rate, duration, frames, rotation)
    except BaseException:
        container.close()
        raise
    if keep_open and info.live:
        return replace(info, opened=OpenedSource(container, stream, decoded))
    container.close()
    return info


def _say_settings_not_kept(source: str, width: int, height: int, rate: float | None) -> None:
    """A size or rate the camera cannot give is changed by its driver to the nearest it can, and FFmpeg goes on
    with that: said, as a warning."""
    settings, changed = camera_settings(source), []
    if "size" in settings and settings["size"] != f"{width}x{height}":
        changed.append(f"{width}x{height}, not {settings['size']}")
    if "fps" in settings and rate and not math.isclose(rate, float(Fraction(settings["fps"])), rel_tol=0.01):
        changed.append(f"{rate:g} frames/s, not {settings['fps']}")
    if changed:
        log.warning("%s: the camera gives %s; v4l2-ctl -d %s --list-formats-ext lists what it can do", source,
                    " and ".join(changed), camera_device(source))


def _stream_rotation(stream) -> tuple[int, list]:
    """The turn the stream's display matrix asks for, read from its first frame (where FFmpeg puts it), and that
    frame; 0 and none where it cannot be decoded (video_frames reports the damage, and turns each frame by its
    own)."""
    try:
        for frame in stream.container.decode(stream):
            return round(frame.rotation), [frame]
    except _av().error.FFmpegError:
        pass
    return 0, []


def video_frames(video: VideoInfo | str | os.PathLike, fps: float | None = None, failed: list[str] | None = None,
                 stop: threading.Event | None = None) -> Iterator[Frame]:
    """The frames of `video` (a file or a stream, or its VideoInfo: a live source it holds open is read on) in
    order (with `fps`, at most that many per second), upright, in RGB; a stream's end where `stop` is set (by
    `stop_requests`).

    FFmpeg decodes with its own threads. Frames lost to damage, and a stream that stopped, are reported in
    `failed` once the video ends."""
    if fps is not None and fps <= 0:
        raise ConfigError(f"--fps must be above 0, got {fps}")
    av = _av()
    held = video.opened.take() if isinstance(video, VideoInfo) and video.opened else None
    path = video.path if isinstance(video, VideoInfo) else video
    container, stream, decoded_already = held or (*_open(path), [])
    streamed, name = is_streamed(path), shown_source(str(path))
    # A stream joined midway may not say where it started: its first frame is its time 0.
    start = (float(stream.start_time * stream.time_base) if stream.start_time is not None
             else None if streamed else 0.0)
    rate = float(stream.average_rate) if stream.average_rate else None
    listed = stream.frames  # how many the file's index lists; 0 where it does not say
    # What was skipped ("packets ...", "frames ...") -> [how many, the first time, the last] (not each time: a
    # live stream may run for days).
    damage: dict[str, list] = {}
    stopped: list[str] = []  # why a stream ended before its end
    next_tick, decoded, at = 0.0, 0, 0.0

    def decoded_frames() -> Iterator:
        """Each frame FFmpeg decodes, those of an open source decoded already first; packets it cannot decode are
        counted in `damage`, at their time."""
        nonlocal at
        yield from decoded_already
        for packet in _packets(av, container, stream, streamed, stop, stopped):
            if packet is not None and packet.pts is not None:  # the flushing packet at the end has none
                at = float(packet.pts * stream.time_base) - (start or 0.0)
            try:
                yield from packet.decode() if packet is not None else stream.decode(None)
            except av.error.FFmpegError as error:
                _count(damage, f"packet(s) FFmpeg could not decode ({error.strerror})", at)

    with container:
        for frame in decoded_frames():
            decoded += 1
            # The stream's time base, not the frame's: frames flushed from the decoder carry none.
            stamp = float(frame.pts * stream.time_base) if frame.pts is not None else None
            if start is None:
                start = stamp or 0.0
            time = stamp - start if stamp is not None else (decoded - 1) / (rate or 1)
            if frame.is_corrupt:
                _count(damage, "frame(s) FFmpeg marked as damaged", time)
                continue
            if fps is not None:
                if time < next_tick - 1e-6:
                    continue
                next_tick = (int(time * fps + 1e-6) + 1) / fps
            image = frame.to_image()
            yield Frame(time, image.rotate(frame.rotation, expand=True) if frame.rotation else image)
    # Decoding in threads, FFmpeg reports a damaged packet late, with a later packet, and two damaged in a row may
    # come out as one report: frames the index lists beyond those decoded or reported are damage too.
    unaccounted = listed - decoded - sum(count for what, (count, _, _) in damage.items() if what.startswith("packet"))
    if failed is not None:
        failed += [f"{name}: skipped {count} {what.replace('(s)', 's' if count > 1 else '')} "
                   + (f"from {first:.2f} s to {last:.2f} s" if last > first else f"at {first:.2f} s")
                   for what, (count, first, last) in damage.items()]
        if damage and unaccounted > 0:
            failed.append(f"{name}: skipped {unaccounted} more frame{'s' if unaccounted > 1 else ''} the file lists, "
                          f"in the damage above")
        failed += [f"{name}: the stream stopped at {at:.2f} s ({why}); the frames before it are kept"
                   for why in stopped]


def _count(counts: dict[str, list], what: str, time: float) -> None:
    """One more of `what` at `time`: how many, and the first and last time, not each (a stream may run for days)."""
    count, first, last = counts.get(what, (0, time, time))
    counts[what] = [count + 1, min(first, time), max(last, time)]


def _packets(av, container, stream, streamed: bool, stop: threading.Event | None, stopped: list[str]) -> Iterator:
    """The video stream's packets, ending with the demuxer's flushing packet; a network stream that falls silent
    or breaks off ends there instead (why, in `stopped`), as one stopped by the user (`stop`) does, with None:
    flush the decoder, whose frames are the stream's last."""
    packets = container.demux(stream)
    while stop is None or not stop.is_set():
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as error:
            if not streamed:
                raise
            # A live HTTP stream's server closing the connection reads as an I/O error: FFmpeg cannot tell it
            # from one cut off.
            stopped.append(f"no data for {STREAM_TIMEOUT:g} s" if isinstance(error, av.error.ExitError)
                           else f"the connection ended: {error.strerror}")
            break
        yield packet
    yield None


@contextmanager
def stop_requests(wanted: bool) -> Iterator[threading.Event]:
    """An event the first Ctrl-C or SIGTERM sets while inside, where `wanted` (a stream: the user's way to end
    it, keeping what came so far); a second Ctrl-C interrupts as usual. Only the main thread takes signals."""
    stop = threading.Event()
    if not wanted or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(number, _frame):
        if stop.is_set() and number == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        print("stopping the stream: the frames so far are kept (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = {number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def arrived_frames(frames: Iterator[Frame], most: int, stop: threading.Event, name: str,
                   failed: list[str] | None = None) -> Iterator[list[Frame]]:
    """The frames a thread decodes from `frames` (a live stream's), handed on as they arrive: each time all those
    waiting (at least one, at most `most`), so the model answers a frame moments after it was sent rather than
    once a batch has filled. Where the model falls behind the stream, the oldest frames waiting beyond two
    batches are let go, as a live view would, and said in `failed`: the answers stay current, and the memory
    bounded. Sets `stop` when done with, ending the thread's stream."""
    waiting: deque[Frame] = deque()
    arrival = threading.Condition()
    let_go: dict[str, list] = {}  # "frames" -> [how many, the first time, the last], as video_frames' damage
    ended: list[BaseException | None] = []  # set once the thread is done: what ended it, None for the end

    def decode() -> None:
        error = None
        try:
            for frame in frames:
                with arrival:
                    if len(waiting) >= 2 * most:
                        _count(let_go, "frames", waiting.popleft().time)
                    waiting.append(frame)
                    arrival.notify()
        except BaseException as raised:  # handed to the reader, who raises it
            error = raised
        with arrival:
            ended.append(error)
            arrival.notify()

    threading.Thread(target=decode, name=f"decoding {name}", daemon=True).start()
    try:
        while True:
            with arrival:
                arrival.wait_for(lambda: waiting or ended)
                if not waiting:
                    break
                taken = [waiting.popleft() for _ in range(min(most, len(waiting)))]
            yield taken
    finally:
        stop.set()
    if ended[0] is not None:
        raise ended[0]
    if let_go and failed is not None:
        count, first, last = let_go["frames"]
        failed.append(f"{name}: let go {count} frame{'s' if count > 1 else ''} from {first:.2f} s to {last:.2f} s: "
                      f"the model fell behind the stream; give a lower --fps, or a faster --device")


def write_video(path: str | os.PathLike, frames: Iterable[Frame], sound_from: str | os.PathLike | None = None,
                growing: bool = False) -> int:
    """`frames` as an MP4 at `path` (VideoWriter's); returns how many."""
    with VideoWriter(path, sound_from, growing) as writer:
        for frame in frames:
            writer.add(frame)
    return writer.count


class VideoWriter:
    """Frames written to an MP4 at `path` as they are added (H.264 where PyAV's FFmpeg has it, else MPEG-4), each
    shown at its own time; a context manager: the file appears, whole, when it closes without an error, and not
    at all where no frame was added. Sides are cut to even numbers of pixels, as 4:2:0 colour needs.

    `sound_from`: the video the frames came from (their times count from its video stream's start); its first
    sound track goes in beside them on the same clock, as it is where MP4 holds its codec (AAC, MP3, Opus, PCM
    ...), else re-encoded as AAC, mono or stereo (a security camera's G.711, a WMV's WMA). Sound before the
    first frame's time 0 is left out.

    `growing`: a live stream's recording, which may run for hours and end in a kill: written at `path` as it
    grows, in fragments of a second each written out as it closes (fragmented MP4), so the file plays while it
    is written and a kill leaves all but its last second or so, rather than a temporary file no player opens."""

    def __init__(self, path: str | os.PathLike, sound_from: str | os.PathLike | None = None, growing: bool = False):
        self.path, self.sound_from, self.growing, self.count = Path(path), sound_from, growing, 0
        self._opened = ExitStack()  # the file, the container and the sound's source, once the first frame comes
        self._container = self._stream = self._sound = None
        self._last_pts = -1

    def __enter__(self) -> VideoWriter:
        return self

    def add(self, frame: Frame) -> None:
        if self._stream is None:
            self._start(frame.image.width // 2 * 2, frame.image.height // 2 * 2)
        picture = _av().VideoFrame.from_image(frame.image.crop((0, 0, self._stream.width, self._stream.height)))
        # Strictly increasing, as the encoder requires, even for two frames within one millisecond.
        self._last_pts = picture.pts = max(round(frame.time * 1000), self._last_pts + 1)
        picture.time_base = Fraction(1, 1000)
        self._container.mux(self._stream.encode(picture))
        self._sound.mux_until(frame.time)  # interleaved: a player reads sound and pictures of a moment together
        self.count += 1

    def _start(self, width: int, height: int) -> None:
        av = _av()
        if self.growing:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            written, options = self.path, GROWING_MP4
        else:
            written, options = self._opened.enter_context(atomic_path(self.path)), {}
        self._container = self._opened.enter_context(av.open(str(written), "w", format="mp4", options=options))
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = self._container.add_stream(codec, rate=1000)
        stream.codec_context.time_base = Fraction(1, 1000)  # milliseconds: any frame's own time, to a ms
        stream.pix_fmt, stream.width, stream.height = "yuv420p", width, height
        if codec == "libx264":  # a growing file's frames encoded as they come: no frames held to look ahead
            stream.options = {"crf": "20", "preset": "veryfast", **({"tune": "zerolatency"} if self.growing else {})}
        self._sound = self._opened.enter_context(SoundTrack(self._container, self.sound_from))
        self._stream = stream

    def __exit__(self, kind, error, trace) -> None:
        if kind is None and self._stream is not None:
            try:  # the frames the encoder still holds, and the sound after the last frame
                self._container.mux(self._stream.encode())
                self._sound.mux_until(math.inf)
            except BaseException as failed:
                self._opened.__exit__(type(failed), failed, failed.__traceback__)
                raise
        # Closed in turn: the sound's source, the container, then the file put in place (or let go, on an error).
        self._opened.__exit__(kind, error, trace)


class SoundTrack:
    """The first sound track of the video `source` (None: none), muxed into `container` as its frames are written
    (`mux_until` a frame's time, in seconds from the source's video stream's start); a context manager, which
    closes the source."""

    AAC_FRAME = 1024  # samples per AAC frame: what the encoder takes at a time
    AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)

    def __init__(self, container, source: str | os.PathLike | None):
        self.container, self.source, self.waiting = container, None, None
        self.packets: Iterator = iter(())
        if source is None:
            return
        av = _av()
        self.source = av.open(str(source))
        if not self.source.streams.audio:
            return
        audio, video = self.source.streams.audio[0], self.source.streams.video[0]
        start = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
        if audio.codec_context.codec.canonical_name in container.supported_codecs:
            self.packets = self._copied(audio, container.add_stream_from_template(audio), start)
        else:
            # Mono or stereo, more channels mixed down: AAC takes only some layouts, and none left unnamed (AVI's).
            layout = "mono" if audio.layout.nb_channels == 1 else "stereo"
            rate = audio.rate if audio.rate in self.AAC_RATES else 48000  # others resampled to one AAC has
            self.packets = self._encoded(audio, container.add_stream("aac", rate=rate, layout=layout), start)

    def __enter__(self) -> SoundTrack:
        return self

    def __exit__(self, *_) -> None:
        if self.source is not None:
            self.source.close()

    def mux_until(self, time: float) -> None:
        """Mux the sound up to `time` (seconds)."""
        while True:
            if self.waiting is None:
                self.waiting = next(self.packets, None)
                if self.waiting is None:
                    return
            at, packet = self.waiting
            if at > time:
                return
            self.container.mux(packet)
            self.waiting = None

    @staticmethod
    def _copied(audio, out, start: float) -> Iterator:
        """The source's packets as they are, moved onto the frames' clock: (seconds, packet)."""
        offset = round(start / audio.time_base)
        for packet in audio.container.demux(audio):
            if packet.pts is None or packet.pts < offset:  # the demuxer's flushing packet; sound before time 0
                continue
            packet.dts = (packet.dts if packet.dts is not None else packet.pts) - offset
            packet.pts -= offset
            packet.stream = out
            yield float(packet.pts * audio.time_base), packet

    def _encoded(self, audio, out, start: float) -> Iterator:
        """The source's sound decoded and encoded again as AAC, from time 0 on: (seconds, packet)."""
        av = _av()
        rate = out.rate
        resampler = av.AudioResampler(format="fltp", layout=out.layout.name, rate=rate, frame_size=self.AAC_FRAME)
        samples = None  # the next piece's time, in samples from time 0; None: set by the next frame's own time
        for packet in audio.container.demux(audio):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError:  # damaged sound: left out, and the clock set again after it
                samples = None
                continue
            for frame in decoded + ([None] if packet.size == 0 else []):  # None, at the end: the resampler's rest
                if frame is not None:
                    at = (float(frame.time) if frame.time is not None else 0.0) - start
                    if at < 0:
                        continue
                    samples = round(at * rate) if samples is None else samples
                for piece in resampler.resample(frame):
                    samples = samples or 0
                    piece.pts, piece.time_base, samples = samples, Fraction(1, rate), samples + piece.samples
                    yield from ((float(p.pts / rate), p) for p in out.encode(piece))
        yield from ((math.inf, p) for p in out.encode(None))
