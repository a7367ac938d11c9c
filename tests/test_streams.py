"""Predicting on network streams (a camera's rtsp://, a live http:// broadcast): read as a file is, frame for frame;
a stream that falls silent or breaks off is said and the frames before it kept; Ctrl-C ends a live one with what
came so far written; its password is never shown; what needs a second reading is refused. The streams here are
MPEG-TS over HTTP from a server on 127.0.0.1, as a camera or an encoder sends them. A camera on the machine
(/dev/video0) is read the same way, through FFmpeg's Video4Linux input."""

import base64
import csv
import http.server
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import residual
from residual.cli import main
from residual.data import frames as frames_module
from residual.data.decode import BadImageError
from residual.annotate import captioned
from residual.data.frames import (Frame, arrived_frames, camera_device, camera_settings, is_camera, is_stream,
                                  is_video_source, shown_source, source_file_name, video_frames, video_info)
from residual.errors import ConfigError
from residual.predict import Prediction, write_json
from residual import video_explain as video_explain_module
from residual.video import SMOOTH_SECONDS, SegmentFinder, predict_video, segment_finder
from residual.video_explain import explain_video

av = pytest.importorskip("av")

PASSWORD = "s3cret-Pa55"


def transport_stream(frames: list[np.ndarray], rate: int = 10) -> bytes:
    """`frames` as MPEG-TS, the container live streams are sent in (MPEG-4 video, `rate` frames a second)."""
    out = io.BytesIO()
    with av.open(out, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


class StreamServer:
    """An HTTP server on 127.0.0.1 sending `body` at /cam/live.ts as a live stream does, with no length, after
    asking for the name and password `user:PASSWORD`. `pieces` and `pause`: sent in that many pieces that far
    apart (a stream in real time); `then`: after `cut` of the body, "end" (the last chunk of a chunked answer),
    "stall" (hold the connection, silent) or "close" (an answer not chunked, its connection dropped: FFmpeg
    cannot tell that from a chunked answer's own end, nor a chunked answer cut short from its end)."""

    def __init__(self, body: bytes, pieces: int = 1, pause: float = 0.0, cut: float = 1.0, then: str = "end"):
        self.body, self.pieces, self.pause, self.cut, self.then = body, pieces, pause, cut, then
        self.authorized = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.authorized.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                chunked = server.then != "close"
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                sent = server.body[:len(server.body) * int(server.cut * 1000) // 1000 // 188 * 188]
                step = -(-len(sent) // server.pieces)
                try:
                    for start in range(0, len(sent), step):
                        piece = sent[start:start + step]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                        self.wfile.flush()
                        time.sleep(server.pause)
                    if server.then == "stall":
                        time.sleep(5)
                    elif server.then == "end":
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):  # the reader stopped listening
                    pass
                self.close_connection = True

            def log_message(self, *_):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://user:{PASSWORD}@127.0.0.1:{self.http.server_port}/cam/live.ts"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve_stream():
    servers = []

    def start(body: bytes, **how) -> StreamServer:
        servers.append(StreamServer(body, **how))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def grey_frames(count: int, size: int = 32) -> list[np.ndarray]:
    return [np.full((size, size, 3), 20 + 7 * (index % 30), np.uint8) for index in range(count)]


def everything_written(folder: Path, captured: str) -> str:
    return captured + "".join(path.read_bytes().decode("latin-1") for path in folder.rglob("*") if path.is_file())


def test_a_stream_is_predicted_frame_for_frame_as_its_file_is_and_its_password_never_shown(demo_run, tmp_path,
                                                                                          serve_stream, capsys):
    """Three seconds each of circles, squares and stars, sent as a live stream: every frame's probabilities, the
    segments and the timeline are those of the same bytes read from a file; the rows are named by the stream's
    address with its password hidden, and the password appears in nothing printed or written."""
    shapes = ("circle", "square", "star")
    pictures = [np.asarray(Image.open(path).convert("RGB")) for shape in shapes
                for path in sorted((demo_run["data"] / "test" / shape).iterdir())[:30]]
    body = transport_stream(pictures)
    (tmp_path / "scenes.ts").write_bytes(body)
    server = serve_stream(body, pieces=8)
    shown = server.url.replace(PASSWORD, "***")
    model = str(demo_run["model"])

    info = video_info(server.url)
    assert info.live and info.name == shown and (info.width, info.height) == (32, 32)
    assert main(["predict", model, server.url, "--format", "csv", "--out", str(tmp_path / "out" / "stream.csv"),
                 "--timeline", str(tmp_path / "out"), "--quiet"]) == 0
    assert main(["predict", model, str(tmp_path / "scenes.ts"), "--format", "csv", "--out",
                 str(tmp_path / "file.csv"), "--quiet"]) == 0
    assert main(["predict", model, server.url, "--format", "segments", "--out", str(tmp_path / "out" / "seg.csv"),
                 "--quiet"]) == 0
    assert server.authorized == ["/cam/live.ts"] * 3  # video_info; each predict opens it once, to look and read on
    with open(tmp_path / "out" / "stream.csv") as streamed, open(tmp_path / "file.csv") as read:
        streamed_rows, file_rows = list(csv.DictReader(streamed)), list(csv.DictReader(read))
    assert len(streamed_rows) == len(file_rows) == 90 * 5  # the top five classes of each frame
    for from_stream, from_file in zip(streamed_rows, file_rows):
        assert from_stream["frame"].replace(shown, "") == from_file["frame"].replace(str(tmp_path / "scenes.ts"), "")
        assert from_stream["frame"].startswith(shown + "#t=")
        assert from_stream["class_name"] == from_file["class_name"]
        assert float(from_stream["probability"]) == pytest.approx(float(from_file["probability"]), abs=1e-5)
    with open(tmp_path / "out" / "seg.csv") as stream:
        segments = list(csv.DictReader(stream))
    assert [row["label"] for row in segments] == list(shapes) and {row["video"] for row in segments} == {shown}
    assert (tmp_path / "out" / f"127.0.0.1-{server.http.server_port}-cam-live.ts.timeline.png").is_file()
    assert PASSWORD not in everything_written(tmp_path / "out", "".join(capsys.readouterr()))


def test_a_sender_that_connects_once_is_read_whole_from_the_one_connection(untrained, tmp_path, capsys):
    """tcp://HOST:PORT?listen: residual listens, and the sender (ffmpeg ... -f mpegts tcp://HOST:PORT) connects
    once and sends. The one connection is looked at and read on: every frame is predicted, the first included."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    listening.close()
    connections = []

    def send() -> None:
        while not connections:  # until residual listens
            try:
                connections.append(socket.create_connection(("127.0.0.1", port)))
            except ConnectionRefusedError:
                time.sleep(0.02)
        with connections[0]:
            connections[0].sendall(transport_stream(grey_frames(30)))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    assert main(["predict", str(untrained), f"tcp://127.0.0.1:{port}?listen", "--format", "csv", "--topk", "1",
                 "--quiet"]) == 0
    sender.join(timeout=10)
    times = [float(row.split(",")[0].rsplit("#t=", 1)[1]) for row in capsys.readouterr().out.splitlines()[1:]]
    assert times == pytest.approx([index / 10 for index in range(30)]) and len(connections) == 1


def test_a_stream_that_falls_silent_or_breaks_off_is_said_and_its_frames_before_kept(untrained, tmp_path,
                                                                                    serve_stream, monkeypatch):
    """Half a stream, then silence (past the timeout) or a dropped connection: the frames that came are the file's
    first frames, pixel for pixel and time for time, and `failed` says where and why it stopped."""
    monkeypatch.setattr(frames_module, "STREAM_TIMEOUT", 1.0)
    pictures = [np.full((32, 32, 3), 20 + 3 * index, np.uint8) for index in range(60)]
    body = transport_stream(pictures)
    (tmp_path / "whole.ts").write_bytes(body)
    whole = list(video_frames(tmp_path / "whole.ts"))
    assert len(whole) == 60
    for then, why in (("stall", "no data for 1 s"), ("close", "the connection ended")):
        server = serve_stream(body, cut=0.5, then=then)
        failed = []
        came = list(video_frames(server.url, failed=failed))
        assert 15 < len(came) < 45
        for frame, same in zip(came, whole):
            assert frame.time == pytest.approx(same.time)
            assert np.array_equal(np.asarray(frame.image), np.asarray(same.image))
        assert len(failed) == 1 and why in failed[0] and "the frames before it are kept" in failed[0]
        assert failed[0].startswith(server.url.replace(PASSWORD, "***") + ": the stream stopped at ")

    model = residual.load_model(untrained)
    result = predict_video(model, serve_stream(body, cut=0.5, then="stall").url)
    assert 15 < len(result.predictions) < 45 and "no data for 1 s" in result.failed[0]
    assert sum(segment.frames for segment in result.segments) == len(result.predictions)


def test_an_address_that_does_not_answer_or_refuses_the_password_is_one_line_naming_it(untrained, tmp_path,
                                                                                      serve_stream, capsys):
    server = serve_stream(transport_stream(grey_frames(20)))
    wrong = server.url.replace(PASSWORD, "wrong")
    with pytest.raises(BadImageError, match=r"^http://user:\*\*\*@127\.0\.0\.1:\d+/cam/live\.ts: cannot be read "
                                            r"\(.*401.*\); check the address"):
        video_info(wrong)
    with socket_nobody_listens_on() as port:
        dead = f"rtsp://127.0.0.1:{port}/live"
        with pytest.raises(BadImageError, match=r"^rtsp://127\.0\.0\.1:\d+/live: cannot be read \(Connection refused"):
            video_info(dead)
        # Among others: the one that cannot be read is named, the others predicted, exit 1.
        code = main(["predict", str(untrained), dead, server.url, "--format", "csv", "--topk", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and len(out.splitlines()) == 21 and f"{dead}: cannot be read" in err
    assert "wrong" not in err and PASSWORD not in out + err
    with pytest.raises(BadImageError, match=r"^srt://127\.0\.0\.1:9: PyAV's FFmpeg does not read srt:// "):
        video_info("srt://127.0.0.1:9")  # PyAV's wheels are built without SRT


class socket_nobody_listens_on:
    """A port on 127.0.0.1 that refuses connections: bound, so no one else takes it, and not listening."""

    def __enter__(self) -> int:
        import socket
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *_):
        self.socket.close()


def json_rows_as_they_come(stream, count: int) -> list[dict]:
    """The first `count` rows of a JSON array being written, each as soon as its last byte came, as a streaming
    JSON parser reads them."""
    rows, text, depth = [], "", 0
    assert stream.read(1) == "["
    while len(rows) < count:
        character = stream.read(1)
        assert character, "the output ended"
        depth += {"{": 1, "}": -1}.get(character, 0)
        text += character
        if character == "}" and depth == 0:
            rows.append(json.loads(text.lstrip(",\n ")))
            text = ""
    return rows


def lines_then_ctrl_c(process: subprocess.Popen, count: int) -> tuple[list[str], str, str]:
    """The first `count` lines a live run writes, read while it is still reading its stream; then Ctrl-C, its
    exit code checked, and the rest of what it wrote."""
    try:
        lines = [process.stdout.readline() for _ in range(count)]
        assert process.poll() is None, "written while the stream was still being read"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    return lines, out, err


@pytest.mark.parametrize("stop, output_format", [(signal.SIGINT, "csv"), (signal.SIGTERM, "json"),
                                                 (signal.SIGINT, "jsonl")],
                         ids=["ctrl-c-csv", "sigterm-json", "ctrl-c-jsonl"])
def test_ctrl_c_ends_a_live_stream_and_writes_what_came(untrained, tmp_path, serve_stream, stop, output_format):
    """`residual predict MODEL URL` on a stream sent in real time: its rows come out as frames arrive (stdout is
    flushed per row: a CSV line, a JSON array's object), Ctrl-C (or a service manager's SIGTERM) stops it, the
    segments, timeline and annotated recording of what came are written, and it exits 0."""
    body = transport_stream(grey_frames(300))  # 30 s at 10 frames/s, sent in about that time
    server = serve_stream(body, pieces=60, pause=0.5)
    process = subprocess.Popen(
        [sys.executable, "-m", "residual", "predict", str(untrained), server.url, "--format", output_format,
         "--fps", "5", "--topk", "1", "--timeline", str(tmp_path / "timeline"), "--annotate", str(tmp_path / "seen")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:  # ten rows, before the stream ends
        if output_format == "csv":
            header, *rows = [process.stdout.readline() for _ in range(11)]
            assert header.startswith("frame,")
            frames = [row.split(",")[0] for row in rows]
        elif output_format == "jsonl":  # each line whole as it comes
            frames = [json.loads(process.stdout.readline())["frame"] for _ in range(10)]
        else:
            frames = [row["frame"] for row in json_rows_as_they_come(process.stdout, 10)]
        assert process.poll() is None
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    if output_format in ("csv", "jsonl"):
        assert 0 < len(out.splitlines()) < 140
        answered = len(frames) + len(out.splitlines())
    else:
        assert out.rstrip().endswith("]") and out.count('"frame"') < 140  # the array is closed
        answered = len(frames) + out.count('"frame"')
    assert [float(frame.rsplit("#t=", 1)[1]) for frame in frames[:3]] == pytest.approx([0.0, 0.2, 0.4])
    assert "stopping the stream: the frames so far are kept" in err
    name = f"127.0.0.1-{server.http.server_port}-cam-live.ts"
    assert (tmp_path / "timeline" / f"{name}.timeline.png").is_file()
    # Every frame answered, in order (more than the rows read here: what the reader had buffered is not counted).
    recorded = [frame.time for frame in video_frames(tmp_path / "seen" / f"{name}.annotated.mp4")]
    assert len(recorded) >= answered and recorded == pytest.approx([index / 5 for index in range(len(recorded))])
    assert PASSWORD not in out + err


def test_a_live_streams_segments_are_written_as_each_closes(demo_run, tmp_path, serve_stream):
    """`--format segments` on a stream sent in real time: a scene's segment is written once the stream has gone
    on past it (half the smoothing window, and a look a second), while the stream is still being sent; the last
    one, still open, when Ctrl-C ends it."""
    def pictures(shape: str, count: int) -> list[np.ndarray]:
        paths = sorted((demo_run["data"] / "test" / shape).iterdir())
        return [np.asarray(Image.open(paths[index % len(paths)]).convert("RGB")) for index in range(count)]

    scenes = pictures("circle", 30) + pictures("square", 30) + pictures("star", 240)  # 3 s, 3 s, 24 s
    server = serve_stream(transport_stream(scenes), pieces=60, pause=0.5)  # sent in about 30 s
    process = subprocess.Popen(
        [sys.executable, "-m", "residual", "predict", str(demo_run["model"]), server.url, "--format", "segments",
         "--fps", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (header, *closed), out, err = lines_then_ctrl_c(process, 3)  # the first two scenes' segments
    assert header.strip() == "video,start,end,label,probability,frames"
    rows = list(csv.reader(closed + out.splitlines(keepends=True)))
    assert [row[3] for row in rows] == ["circle", "square", "star"]
    assert [float(row[1]) for row in rows] == pytest.approx([0.0, 3.0, 6.0], abs=0.25)
    assert float(rows[0][2]) == float(rows[1][1]) and float(rows[1][2]) == float(rows[2][1])
    assert 6.0 < float(rows[2][2]) < 29.0  # the open one, cut by Ctrl-C


def test_explain_writes_a_live_streams_overlays_and_key_frames_as_they_come(untrained, tmp_path, serve_stream,
                                                                            capsys, monkeypatch):
    """A live stream cannot be decoded a second time: explain writes the video of overlays as the frames come,
    from the one connection, and each segment's key frame as the segment closes, from the crops it kept."""
    monkeypatch.setenv("COLUMNS", "200")
    server = serve_stream(transport_stream(grey_frames(20)))
    assert main(["explain", str(untrained), server.url, "--fps", "5", "--out", str(tmp_path / "cams")]) == 0
    captured = capsys.readouterr()
    name = f"127.0.0.1-{server.http.server_port}-cam-live.ts"
    written = tmp_path / "cams" / f"{name}.gradcam.mp4"
    pictures = sorted(path.name for path in (tmp_path / "cams").glob("*.png"))
    assert pictures and all(picture.startswith(f"{name}.t=") for picture in pictures)
    assert sorted(path.name for path in (tmp_path / "cams").iterdir()) == sorted([written.name, *pictures])
    assert f"wrote {written} and {len(pictures)} key frame(s) beside it" in captured.out.replace("\n", "")
    assert all(picture in captured.out for picture in pictures)  # each named in its segment's row
    assert "live: Ctrl-C ends it" in captured.err and PASSWORD not in captured.out + captured.err
    assert [frame.time for frame in video_frames(written)] == pytest.approx([index / 5 for index in range(10)],
                                                                            abs=1e-3)
    assert len(server.authorized) == 1

    # Sent at once, faster than the gradients are computed: beyond two batches waiting, the oldest frames are let go,
    # as predict lets them go, and said.
    server = serve_stream(transport_stream(grey_frames(20)))
    result = explain_video(residual.load_model(untrained), server.url, tmp_path / "api", batch_size=4)
    let_go = [int(re.search(r"let go (\d+) frame", line)[1]) for line in result.failed]
    assert result.frames + sum(let_go) == 20 and len(let_go) <= 1 and result.segments
    assert [key.class_name for key in result.key_frames] == [segment.label for segment in result.segments]


def test_a_live_explain_finds_its_segments_in_memory_that_does_not_grow(untrained, tmp_path, serve_stream,
                                                                         monkeypatch):
    """A live explain may run for days: its frames' probabilities go to a SegmentFinder as they come, which holds
    only those of the smoothing window and a look, not every frame's; its segments are those of all its frames'
    probabilities taken at once. Of the crops, it keeps those of the frames that may yet be a key frame, and each
    segment's key frame is its most probable frame of its class, as of all the frames at once."""
    kept, given, crops_held = [], [], []

    def watched(*args, **kwargs):
        finder = segment_finder(*args, **kwargs)
        add = finder.add

        def add_and_count(times, probabilities, similarities):
            given.append((list(times), probabilities.clone()))
            add(times, probabilities, similarities)
            kept.append(finder.kept_frames)

        finder.add = add_and_count
        return finder

    monkeypatch.setattr(video_explain_module, "segment_finder", watched)
    add_crops = video_explain_module.LiveKeyFrames.add

    def add_and_count_crops(self, times, crops):
        add_crops(self, times, crops)
        crops_held.append(len(self.crops))

    monkeypatch.setattr(video_explain_module.LiveKeyFrames, "add", add_and_count_crops)
    model = residual.load_model(untrained)
    # 10 s at 10 frames a second, sent in 20 pieces 0.15 s apart (over three times real time).
    server = serve_stream(transport_stream(grey_frames(100)), pieces=20, pause=0.15)
    result = explain_video(model, server.url, tmp_path / "live", fps=5, batch_size=8)
    let_go = sum(int(re.search(r"let go (\d+) frame", line)[1]) for line in result.failed)
    assert result.frames + let_go == 50 and len(result.times) == len(result.probabilities) == len(result.explained) == 0
    held_at_most = 5 * (SMOOTH_SECONDS + 1) + 8 + 1  # the smoothing window's frames, a look's and a batch
    assert max(kept) <= held_at_most < result.frames and sum(len(times) for times, _ in given) == result.frames
    at_once = SegmentFinder(model.class_names, smooth=SMOOTH_SECONDS)
    at_once.add([t for times, _ in given for t in times], torch.cat([p for _, p in given]))
    expected = at_once.finish()
    assert [(s.label, s.start, s.end, s.frames) for s in result.segments] == [
        (s.label, s.start, s.end, s.frames) for s in expected]
    assert [s.probability for s in result.segments] == pytest.approx([s.probability for s in expected], abs=1e-9)
    # The crops of the frames not final yet, and of each open segment's peak so far.
    assert max(crops_held) <= held_at_most + len(model.class_names) < result.frames
    times = [t for times, _ in given for t in times]
    probabilities = torch.cat([p for _, p in given])
    assert [s.peak for s in result.segments] == [s.peak for s in expected]
    assert len(result.key_frames) == len(expected) > 0
    for segment, key in zip(expected, result.key_frames):
        column = model.class_names.index(segment.label)
        inside = [number for number, t in enumerate(times) if segment.start <= t < segment.end]
        assert segment.peak == inside[int(probabilities[inside, column].argmax())]
        assert key.class_name == segment.label and key.source.endswith(f"#t={times[segment.peak]:.3f}")
        assert key.probability == pytest.approx(float(probabilities[segment.peak, column]), abs=1e-5)
        assert key.path.is_file()


def test_annotate_records_a_live_stream_each_frame_with_its_answer_as_it_is_answered(untrained, tmp_path,
                                                                                     serve_stream, capsys):
    """A live stream cannot be decoded again to draw its segments on, as a file is: `--annotate` records the
    frames predicted (here at --fps 5 of 10), each at its time with the answer its row gives written across it."""
    pictures = [np.full((64, 64, 3), 60 + 6 * index, np.uint8) for index in range(20)]
    server = serve_stream(transport_stream(pictures))
    assert main(["predict", str(untrained), server.url, "--annotate", str(tmp_path / "seen"), "--fps", "5",
                 "--format", "csv", "--topk", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert len(rows) == 10 and "annotated: 1 video(s) in" in captured.err
    recorded = list(video_frames(tmp_path / "seen" / f"127.0.0.1-{server.http.server_port}-cam-live.ts.annotated.mp4"))
    assert [frame.time for frame in recorded] == pytest.approx([float(row["frame"].rsplit("#t=", 1)[1])
                                                                for row in rows], abs=1e-3)
    for frame, row in zip(recorded, rows):
        sent = Image.fromarray(pictures[round(frame.time * 10)])
        drawn = captioned(sent, f"{row['class_name']} {float(row['probability']):.2f}")
        seen = np.asarray(frame.image, np.float32)
        off_drawn = np.abs(seen - np.asarray(drawn, np.float32)).mean()
        off_sent = np.abs(seen - np.asarray(sent, np.float32)).mean()  # the band and its words make the difference
        assert off_drawn < 3 and off_sent > 3 * off_drawn
    assert len(server.authorized) == 1  # looked at and read from one connection

    # Of several live streams, each is opened again when its turn comes: held open while another is read, its
    # unread data would pile up.
    others = [serve_stream(transport_stream(grey_frames(10))) for _ in range(2)]
    assert main(["predict", str(untrained), *(other.url for other in others), "--annotate", str(tmp_path / "both"),
                 "--format", "csv", "--topk", "1", "--quiet"]) == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 20
    assert [len(other.authorized) for other in others] == [2, 2]
    assert len(list((tmp_path / "both").glob("*.annotated.mp4"))) == 2


def test_stream_addresses_are_told_from_files_named_for_files_and_shown_without_their_password():
    assert is_stream("rtsp://admin:pw@192.168.1.5:554/Streaming/Channels/101")
    assert is_stream("udp://@:5000") and is_stream("HTTPS://example.com/live/index.m3u8")
    assert not is_stream("clip.mp4") and not is_stream("ftp://host/clip.mp4") and not is_stream(Path("a://b"))
    assert shown_source("rtsp://admin:pw@192.168.1.5:554/live") == "rtsp://admin:***@192.168.1.5:554/live"
    assert shown_source("rtsp://192.168.1.5/live") == "rtsp://192.168.1.5/live"
    assert shown_source("videos/a:pw@b.mp4") == "videos/a:pw@b.mp4"  # a file's name is its name
    assert source_file_name("rtsp://admin:pw@192.168.1.5:554/Streaming/Channels/101") == \
        "192.168.1.5-554-Streaming-Channels-101"
    assert source_file_name("udp://@:5000") == "5000" and source_file_name("runs/clip.mp4") == "clip.mp4"


def test_frames_are_handed_on_as_they_arrive_and_the_oldest_let_go_where_the_model_falls_behind():
    """arrived_frames with a model slower than the stream: each time, every frame waiting (up to the batch);
    beyond two batches waiting the oldest are let go, said in `failed`; the newest always reach the model, in
    order. A decoding error is raised in the reader, and the stream is told to stop once the reader is done."""
    image = Image.new("RGB", (8, 8))
    sent = threading.Event()

    def stream():
        for index in range(100):
            yield Frame(index / 10, image)
        sent.set()

    stop, failed = threading.Event(), []
    groups = []
    for group in arrived_frames(stream(), 4, stop, "rtsp://cam/live", failed):
        groups.append([frame.time for frame in group])
        sent.wait(5)  # the model is slow: the whole stream has come by the time it is done with one batch
    handed = [time for group in groups for time in group]
    assert all(0 < len(group) <= 4 for group in groups) and handed == sorted(handed) and handed[-1] == 9.9
    assert len(handed) <= 4 + 8  # the first batch, then the two batches' worth still waiting
    let_go = sorted({index / 10 for index in range(100)} - set(handed))
    assert failed == [f"rtsp://cam/live: let go {len(let_go)} frames from {let_go[0]:.2f} s to {let_go[-1]:.2f} s: "
                      f"the model fell behind the stream; give a lower --fps, or a faster --device"]
    assert stop.is_set()

    def broken():
        yield Frame(0.0, image)
        raise BadImageError("rtsp://cam/live: broken")

    with pytest.raises(BadImageError, match="broken"):
        list(arrived_frames(broken(), 4, threading.Event(), "rtsp://cam/live"))


def test_a_video_on_a_web_server_has_a_length_and_is_read_twice_as_a_file_is(untrained, tmp_path, capsys):
    """An .mp4 served as a plain file (its length known) is no live stream: `--annotate` reads it again and
    writes it with every frame."""
    site = tmp_path / "site"
    site.mkdir()
    with av.open(str(site / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for pixels in grey_frames(30):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/clip.mp4"
        info = video_info(url)
        assert not info.live and info.duration == pytest.approx(3.0) and info.frames == 30
        assert main(["predict", str(untrained), url, "--annotate", str(tmp_path / "seen"), "--quiet"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    written = tmp_path / "seen" / f"127.0.0.1-{server.server_port}-clip.mp4.annotated.mp4"
    assert len(list(video_frames(written))) == 30
    assert f"{url}: 30 frames" in capsys.readouterr().out


def test_each_json_row_is_handed_on_whole_as_soon_as_it_is_written():
    """A live stream's JSON rows reach a reader as they come: each is flushed once its object is closed, not
    held in a line buffer until the next row ends the line."""
    class Flushes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.handed_on = []  # what had been written at each flush

        def flush(self):
            self.handed_on.append(self.getvalue())

    written = Flushes()
    rows = [Prediction(f"cam#t={index / 5:.3f}", [(0, "circle", 0.9)]) for index in range(3)]
    assert write_json(iter(rows), written, "frame") == 3
    at_a_row_end = [text for text in written.handed_on if text.endswith("}")]
    assert [text.count('"frame"') for text in at_a_row_end] == [1, 2, 3]
    assert [row["frame"] for row in json.loads(written.getvalue())] == ["cam#t=0.000", "cam#t=0.200", "cam#t=0.400"]


# A camera stood in for by FFmpeg's lavfi input device: a test picture at 10 frames/s in real time. Only the
# device is stood in for; it is opened, read and stopped by FFmpeg as /dev/video0 would be.
TEST_CAMERA = "testsrc2=size=64x48:rate=10,realtime"


def test_a_camera_is_read_as_a_live_stream_its_rows_as_they_come_until_ctrl_c(untrained, tmp_path):
    code = f"""
import sys
from residual.cli import main
from residual.data import frames
frames.CAMERA_INPUT, frames.camera_device = "lavfi", lambda source: {TEST_CAMERA!r}
sys.exit(main(sys.argv[1:]))
"""
    # It sends 64x48 at 10 frames/s: the size asked for is kept, the rate is not, and the run says so.
    process = subprocess.Popen(
        [sys.executable, "-c", code, "predict", str(untrained), "camera:0,size=64x48,fps=30", "--format", "csv",
         "--topk", "1", "--timeline", str(tmp_path / "timeline"), "--annotate", str(tmp_path / "seen")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    (header, *rows), out, err = lines_then_ctrl_c(process, 6)
    assert header.startswith("frame,") and "stopping the stream: the frames so far are kept" in err
    assert (f"camera:0: 64x48 at 10 frames/s, live: Ctrl-C ends it; recording to {tmp_path / 'seen' / 'video0'}"
            f".annotated.mp4 as it is answered") in err
    assert "WARNING: camera:0,size=64x48,fps=30: the camera gives 10 frames/s, not 30; v4l2-ctl -d " in err
    times = [float(row.split(",")[0].rsplit("#t=", 1)[1]) for row in rows + out.splitlines()]
    assert [row.split("#t=")[0] for row in rows] == ["camera:0"] * 5  # named by the camera, not its settings
    assert times[:3] == pytest.approx([0.0, 0.1, 0.2]) and len(times) < 100
    assert (tmp_path / "timeline" / "video0.timeline.png").is_file()
    recorded = list(video_frames(tmp_path / "seen" / "video0.annotated.mp4"))  # as it was answered, at 64x48
    assert [frame.time for frame in recorded] == pytest.approx(times, abs=1e-3)
    assert {frame.image.size for frame in recorded} == {(64, 48)}


def test_a_live_recording_killed_keeps_what_it_recorded_up_to_its_last_second(untrained, tmp_path):
    """A camera's `--annotate` recording may run for hours and end in a kill (a power cut, the OOM killer): it is
    written as it grows, in fragments of a second, so what came before the last second or so still plays."""
    code = f"""
import sys
from residual.cli import main
from residual.data import frames
frames.CAMERA_INPUT, frames.camera_device = "lavfi", lambda source: {TEST_CAMERA!r}
sys.exit(main(sys.argv[1:]))
"""
    process = subprocess.Popen(
        [sys.executable, "-c", code, "predict", str(untrained), "camera:0", "--format", "csv", "--topk", "1",
         "--annotate", str(tmp_path / "seen")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        header, *rows = [process.stdout.readline() for _ in range(41)]  # 40 frames: 4 s at 10 frames/s
        assert header.startswith("frame,") and process.poll() is None
    finally:
        process.kill()
        process.wait()
    times = [float(row.split(",")[0].rsplit("#t=", 1)[1]) for row in rows]
    recorded = [frame.time for frame in video_frames(tmp_path / "seen" / "video0.annotated.mp4")]
    assert len(recorded) >= 20 and recorded == pytest.approx(times[:len(recorded)], abs=1e-3)


def test_a_cameras_size_and_rate_are_asked_of_ffmpegs_input_and_one_it_cannot_give_is_said(monkeypatch, caplog):
    """camera:0,size=WxH,fps=N,format=NAME: FFmpeg's Video4Linux options video_size, framerate and input_format.
    FFmpeg's rawvideo input on /dev/urandom stands in for the camera here: it takes the first two under the same
    names and sends frames of that size, timed at that rate."""
    assert camera_settings("camera:2,size=1280x720,fps=30000/1001,format=mjpeg") == {
        "size": "1280x720", "fps": "30000/1001", "format": "mjpeg"}
    assert camera_settings("/dev/video2") == {} and camera_device("/dev/video2,fps=7.5") == "/dev/video2"
    assert shown_source("/dev/video2,fps=7.5") == "/dev/video2" and source_file_name("camera:2,fps=5") == "video2"
    assert not is_camera("camera:2?fps=5") and not is_camera("/dev/video2/x,fps=5")
    for source, why in [("camera:0,zoom=2", "'zoom=2' is not a setting"), ("camera:0,", "'' is not a setting"),
                        ("camera:0,size=720p", "'size=720p': not a valid size"),
                        ("camera:0,fps=0", "'fps=0': not a valid fps"), ("camera:0,fps=5,fps=6", "fps given twice")]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(source)}: {re.escape(why)}; a camera takes "
                                              r"size=WIDTHxHEIGHT, fps=N and format=NAME .* --list-formats-ext"):
            video_info(source)

    monkeypatch.setattr(frames_module, "CAMERA_INPUT", "rawvideo")
    monkeypatch.setattr(frames_module, "camera_device", lambda source: "/dev/urandom")
    info = video_info("camera:0,size=40x24,fps=5")
    assert (info.width, info.height, info.live, info.name) == (40, 24, True, "camera:0")
    frames = video_frames("camera:0,size=40x24,fps=5")
    first = list(itertools.islice(frames, 3))
    frames.close()
    assert [frame.time for frame in first] == pytest.approx([0.0, 0.2, 0.4])
    assert {frame.image.size for frame in first} == {(40, 24)}
    assert not caplog.records  # all it asked for, given

    monkeypatch.setattr(frames_module, "CAMERA_INPUT", "lavfi")  # a camera that sends 64x48 at 10 frames/s
    monkeypatch.setattr(frames_module, "camera_device", lambda source: TEST_CAMERA)
    assert video_info("/dev/video0,size=1920x1080,fps=10").width == 64
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning == (f"/dev/video0,size=1920x1080,fps=10: the camera gives 64x48, not 1920x1080; v4l2-ctl -d "
                       f"{TEST_CAMERA} --list-formats-ext lists what it can do")


def test_a_camera_that_cannot_be_read_or_read_twice_is_one_line_naming_it(untrained, tmp_path, monkeypatch, capsys):
    assert is_camera("/dev/video0") and is_camera("camera:12") and is_video_source("/dev/video2")
    assert not is_camera("/dev/video") and not is_camera("camera:") and not is_camera("/dev/video0/x")
    assert camera_device("camera:12") == "/dev/video12" and source_file_name("camera:12") == "video12"
    cameras = sorted(str(path) for path in Path("/dev").glob("video*"))
    absent = next(f"/dev/video{number}" for number in range(64) if f"/dev/video{number}" not in cameras)
    assert main(["predict", str(untrained), absent]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: {absent}: no such camera (") and "torch.compile" not in err
    assert main(["explain", str(untrained), absent, "--out", str(tmp_path / "unmade")]) == 1
    assert "no such camera" in capsys.readouterr().err and not (tmp_path / "unmade").exists()
    monkeypatch.setattr(frames_module.sys, "platform", "darwin")
    with pytest.raises(BadImageError, match=r"camera:0: cameras are read through Linux's Video4Linux; .* avfoundation"):
        video_info("camera:0")
    monkeypatch.undo()

    # FFmpeg's own Video4Linux input, on a device that is not a camera: it asks what the device can do and is told
    # it cannot.
    monkeypatch.setattr(frames_module, "camera_device", lambda source: "/dev/null")
    with pytest.raises(BadImageError, match=r"^/dev/null: cannot be read as a camera \(.+; a camera often has a "):
        video_info("/dev/video0")
    with pytest.raises(BadImageError, match=r"^/dev/null: cannot be read as a camera \(.+ with size=64x48, "
                                            r"format=mjpeg; v4l2-ctl -d /dev/null --list-formats-ext lists the sizes"):
        video_info("/dev/video0,size=64x48,format=mjpeg")

    monkeypatch.setattr(frames_module, "CAMERA_INPUT", "lavfi")
    monkeypatch.setattr(frames_module, "camera_device", lambda source: TEST_CAMERA)
    assert video_info("/dev/video0").live
