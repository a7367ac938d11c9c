"""Predicting on videos: frames decoded upright and timed by their own timestamps, a prediction per frame as predict
gives an image, segments of time per class, damage reported, and the command line's formats and timeline. Explaining
them: a video of every frame's Grad-CAM overlay where the model looked, and a key frame per segment."""

import csv
import dataclasses
import io
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import residual
from residual.cli import main
from residual.data.decode import BadImageError
from residual.data.frames import VideoInfo, video_frames, video_info
from residual.data.transforms import center_crop_box, resize_center_crop
from residual.errors import ConfigError
from residual.explain import blended
from residual.feature_bank import FeatureBank
from residual.predict import collected_features
from residual.video import (FrameScores, SegmentFinder, TimelineScores, iter_predict_video, predict_video,
                            segment_finder, segments, smoothed)
from residual.video_explain import UNSEEN_BRIGHTNESS, explain_video, frame_overlay

av = pytest.importorskip("av")


def write_video(path, frames: list[np.ndarray], rate: int = 10, times: list[float] | None = None,
                rotation: int | None = None):
    """A video of RGB `frames`, at `rate` frames a second or at the given `times` (seconds): MPEG-4 in an .mp4,
    or lossless FFV1 (RGB, so the frames decode to exactly these pixels) in an .mkv."""
    lossless = str(path).endswith(".mkv")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1" if lossless else "mpeg4", rate=1000 if times else rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if lossless else "yuv420p"
        stream.bit_rate = 4_000_000
        if times:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if times:
                frame.pts, frame.time_base = round(times[index] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def grey_frames(count: int, size: int = 32) -> list[np.ndarray]:
    return [np.full((size, size, 3), 20 + 7 * index, np.uint8) for index in range(count)]


def test_a_video_of_three_scenes_gives_three_segments_and_each_frame_the_prediction_its_image_gets(demo_run,
                                                                                                 tmp_path):
    """Three seconds each of circles, squares and stars (a new test image every frame): the segments are the three
    shapes, changing within a frame or two of 3 s and 6 s, and every frame's probabilities are those `predict`
    gives the same picture."""
    shapes = ("circle", "square", "star")
    pictures = [np.asarray(Image.open(path).convert("RGB")) for shape in shapes
                for path in sorted((demo_run["data"] / "test" / shape).iterdir())[:30]]
    video = write_video(tmp_path / "scenes.mp4", pictures)
    model = residual.load_model(demo_run["model"]).eval()

    result = predict_video(model, str(video), topk=3, batch_size=16)
    assert result.info.frames == 90 and result.info.duration == pytest.approx(9.0) and not result.failed
    assert [segment.label for segment in result.segments] == list(shapes)
    assert result.segments[0].start == 0 and result.segments[-1].end == pytest.approx(9.0)
    for segment, change in zip(result.segments[1:], (3.0, 6.0)):
        assert abs(segment.start - change) <= 0.2
    assert sum(segment.frames for segment in result.segments) == 90
    assert [p.source for p in result.predictions[:2]] == [f"{video}#t=0.000", f"{video}#t=0.100"]
    assert np.allclose(result.times, np.arange(90) / 10)

    decoded = [frame.image for frame in video_frames(video)]
    as_images = residual.predict(model, decoded, topk=3)
    for frame, image in zip(result.predictions, as_images.predictions):
        assert [name for _, name, _ in frame.top] == [name for _, name, _ in image.top]
        assert np.allclose([p for *_, p in frame.top], [p for *_, p in image.top], atol=1e-5)
    # Frame by frame the model errs now and then; the segments smooth that over, the frames do not.
    per_frame = [p.top[0][1] for p in result.predictions]
    truth = [shape for shape in shapes for _ in range(30)]
    assert 0.8 < np.mean([a == b for a, b in zip(per_frame, truth)]) <= 1


def test_with_a_feature_bank_frames_of_none_of_the_classes_make_a_stretch_of_no_class(demo_run, tmp_path, capsys):
    """Two seconds of stars, then two of noise, which the demo model still calls some shape: the feature bank's
    floor (training images' features; the floor keeps 95% of the test stars) turns the noise into a segment of no
    class, in predict_video and on the command line. The video is lossless: a compressed one's 32 px frames
    lose enough of their texture that some fall below a floor set on the PNGs (docs/video.md)."""
    model = residual.load_model(demo_run["model"]).eval()
    train = [demo_run["data"] / "train" / shape / name for shape in ("star", "circle", "ring")
             for name in sorted(p.name for p in (demo_run["data"] / "train" / shape).iterdir())[:60]]
    stars = sorted((demo_run["data"] / "test" / "star").iterdir())
    with collected_features(model) as pooled:
        residual.predict(model, train + stars)
    features = torch.cat(pooled)
    bank = FeatureBank.of(features[:len(train)], 5, 0.0, model)
    star_similarity = bank.similarity(features[len(train):]).numpy()
    bank.floor = float(np.quantile(star_similarity, 0.05))
    bank.save(tmp_path / "bank.safetensors")

    rng = np.random.default_rng(0)
    pictures = ([np.asarray(Image.open(path).convert("RGB")) for path in stars[:20]]
                + [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(20)])
    video = write_video(tmp_path / "stars-then-noise.mkv", pictures)
    without = predict_video(model, str(video))
    assert None not in [segment.label for segment in without.segments]  # the noise gets some shape
    result = predict_video(model, str(video), feature_bank=bank)
    assert [segment.label for segment in result.segments] == ["star", None]
    assert 1.5 <= result.segments[1].start <= 2.0  # smoothed over 1 s: a change moves by half of it at most
    # Frame by frame: every noise frame is unsure; a star is when its picture is below the floor, as 5% of the
    # test stars are. How many of these twenty depends on the demo model: 1, 1, 2 and 6 in four trainings.
    assert [p.unsure for p in result.predictions[20:]] == [True] * 20
    assert [p.unsure for p in result.predictions[:20]] == list(star_similarity[:20] < bank.floor)
    assert sum(p.unsure for p in result.predictions[:20]) <= 0.05 * len(stars)
    assert all(p.similarity is not None for p in result.predictions)

    assert main(["predict", str(demo_run["model"]), str(video), "--feature-bank", str(tmp_path / "bank.safetensors"),
                 "--format", "segments", "--quiet"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["label"], row["start"]) for row in rows] == [
        (segment.label or "", f"{segment.start:.3f}") for segment in result.segments]


def test_frames_are_timed_by_their_own_timestamps_and_sampled_at_the_first_frame_of_each_tick(tmp_path):
    times = [0, 0.1, 0.5, 0.55, 1.2, 2.0]  # a variable frame rate, as phones record
    video = write_video(tmp_path / "vfr.mp4", grey_frames(len(times)), times=times)
    frames = list(video_frames(video))
    assert [frame.time for frame in frames] == pytest.approx(times)
    brightness = [np.asarray(frame.image).mean() for frame in frames]
    assert brightness == sorted(brightness)  # in order, each its own frame
    assert [frame.time for frame in video_frames(video, fps=2)] == pytest.approx([0, 0.5, 1.2, 2.0])
    steady = write_video(tmp_path / "steady.mp4", grey_frames(30))
    assert [frame.time for frame in video_frames(steady, fps=3)][:5] == pytest.approx([0, 0.4, 0.7, 1.0, 1.4])
    assert len(list(video_frames(steady, fps=3))) == 9  # ticks at 0, 1/3, ... 8/3 s


def test_h264_with_b_frames_and_a_sound_track_gives_every_frame_once_in_time_order(tmp_path):
    """H.264 decodes frames in another order than it shows them (B-frames); the sound track is left alone."""
    coarse = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((160, 96), Image.Resampling.BICUBIC))  # smooth: survives 4:2:0
    with av.open(str(tmp_path / "phone.mp4"), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 128, 64, "yuv420p"
        sound = container.add_stream("aac", rate=48000)
        for index in range(30):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(
                texture[index:index + 64, index:index + 128]))))
            quiet = av.AudioFrame.from_ndarray(np.zeros((1, 1920), np.float32), format="fltp", layout="mono")
            quiet.sample_rate = 48000
            container.mux(sound.encode(quiet))
        container.mux(video.encode())
        container.mux(sound.encode())
    failed: list[str] = []
    frames = list(video_frames(tmp_path / "phone.mp4", failed=failed))
    assert [frame.time for frame in frames] == pytest.approx(np.arange(30) / 25) and not failed
    # Each frame is its own picture, in order: the texture pans a pixel a frame, and each frame is nearest the
    # texture at its own pan of those around it.
    for index, frame in enumerate(frames):
        distances = {shift: np.abs(np.asarray(frame.image, float) - texture[shift:shift + 64, shift:shift + 128]).mean()
                     for shift in range(max(0, index - 2), min(30, index + 3))}
        assert min(distances, key=distances.get) == index, (index, distances)


def test_a_video_stored_sideways_comes_out_as_a_player_shows_it(tmp_path):
    """A phone stores a portrait video as landscape frames and the turn in its display matrix."""
    landscape = np.zeros((32, 64, 3), np.uint8)
    landscape[:, :32] = 255  # the left half white
    video = write_video(tmp_path / "phone.mp4", [landscape] * 3, rotation=90)
    info = video_info(video)
    assert (info.width, info.height, info.rotation) == (32, 64, 90)
    upright = np.asarray(next(iter(video_frames(video))).image)
    assert upright.shape == (64, 32, 3)
    # Turned a quarter counter-clockwise: the left half is now the bottom half.
    assert upright[40:].mean() > 240 and upright[:24].mean() < 15


def test_damaged_packets_are_skipped_and_reported_and_the_rest_predicted(untrained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(40)]
    whole = write_video(tmp_path / "whole.mp4", noise).read_bytes()
    damaged = bytearray(whole)
    middle = len(whole) // 3
    damaged[middle:middle + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (tmp_path / "damaged.mp4").write_bytes(damaged)

    failed: list[str] = []
    frames = list(video_frames(tmp_path / "damaged.mp4", failed=failed))
    assert 0 < len(frames) < 40 and failed
    assert all(line.startswith(f"{tmp_path / 'damaged.mp4'}: skipped ") and " s" in line for line in failed)
    assert len(frames) + sum(int(line.split("skipped ")[1].split()[0]) for line in failed) == 40

    (tmp_path / "cut.mp4").write_bytes(whole[:len(whole) // 2])  # the index (written last) is missing
    (tmp_path / "notes.mp4").write_text("not a video")
    code = main(["predict", str(untrained), str(tmp_path / "damaged.mp4"), str(tmp_path / "cut.mp4"),
                 str(tmp_path / "notes.mp4"), "--format", "segments", "--quiet"])
    assert code == 1
    printed = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(printed.out)))
    assert {row["video"] for row in rows} == {str(tmp_path / "damaged.mp4")}
    assert sum(int(row["frames"]) for row in rows) == len(frames)
    errors = printed.err.strip().splitlines()
    assert errors[:2] == [f"error: {tmp_path / name}: not a video FFmpeg can read (Invalid data found when processing "
                          f"input); is the file complete?" for name in ("cut.mp4", "notes.mp4")]
    assert errors[2:] == [f"error: {line}" for line in failed]


def wholly_damaged(folder):
    """An MP4 of three frames whose every packet is zeros."""
    rng = np.random.default_rng(0)
    whole = bytearray(write_video(folder / "whole.mp4", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                                                         for _ in range(3)]).read_bytes())
    start, end = whole.index(b"mdat") + 4, whole.index(b"moov")  # the packets, between their box and the index
    whole[start:end] = bytes(end - start)
    (folder / "damaged.mp4").write_bytes(whole)
    return folder / "damaged.mp4"


def test_frames_lost_to_damage_are_all_reported_even_where_ffmpeg_reports_them_together(tmp_path):
    """Decoding in threads, FFmpeg reports three damaged packets in two reports, the first one late."""
    failed: list[str] = []
    assert list(video_frames(wholly_damaged(tmp_path), failed=failed)) == []
    assert sum(int(line.split("skipped ")[1].split()[0]) for line in failed) == 3
    assert failed[-1] == f"{tmp_path / 'damaged.mp4'}: skipped 1 more frame the file lists, in the damage above"


def test_segments_smooth_over_an_odd_frame_and_follow_uneven_times():
    names = ["cat", "dog"]
    times = np.array([0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 3.0, 3.2])
    cat, dog = [0.9, 0.1], [0.2, 0.8]
    probabilities = np.array([cat, cat, cat, cat, dog, cat, cat, cat, cat, dog, dog])
    raw = segments(times, probabilities, names, end=3.4, smooth=0)
    assert [(s.label, s.start, s.end, s.frames) for s in raw] == [
        ("cat", 0, 0.8, 4), ("dog", 0.8, 1.0, 1), ("cat", 1.0, 3.0, 4), ("dog", 3.0, 3.4, 2)]
    assert raw[0].probability == pytest.approx(0.9)
    found = segments(times, probabilities, names, end=3.4, smooth=1.0)
    assert [(s.label, s.start, s.end) for s in found] == [("cat", 0, 3.0), ("dog", 3.0, 3.4)]
    # Smoothing averages the frames within half a second either side: 1.6 s has 1.2 to 1.6 (all cat), 3.0 s has
    # 3.0 and 3.2 (the gap between them holds no frame).
    averaged = smoothed(times, probabilities, 1.0)
    assert averaged[8] == pytest.approx(cat) and averaged[9] == pytest.approx(dog)
    assert averaged[4] == pytest.approx(np.mean([cat, cat, dog, cat, cat], axis=0))
    # With no end given, the last segment runs one usual frame gap past the last frame.
    assert segments(times, probabilities, names, smooth=0)[-1].end == pytest.approx(3.4)
    # Timestamps out of order (a damaged stream's) are put in order first.
    shuffled = np.random.default_rng(0).permutation(len(times))
    assert segments(times[shuffled], probabilities[shuffled], names, end=3.4, smooth=1.0) == found

    unsure = segments(times, probabilities, names, end=3.4, smooth=0, min_confidence=0.85)
    assert [(s.label, s.start, s.end) for s in unsure] == [("cat", 0, 0.8), (None, 0.8, 1.0), ("cat", 1.0, 3.0),
                                                          (None, 3.0, 3.4)]
    assert unsure[-1].probability == pytest.approx(0.8)  # the top class's, for a stretch of no class


def test_a_multi_label_models_segments_are_per_class_and_may_overlap():
    names = ["person", "dog", "car"]
    times = np.arange(6) * 0.5
    probabilities = np.array([[0.9, 0.1, 0.0], [0.9, 0.7, 0.0], [0.8, 0.8, 0.0], [0.2, 0.9, 0.0], [0.1, 0.2, 0.0],
                              [0.1, 0.1, 0.0]])
    found = segments(times, probabilities, names, end=3.0, smooth=0, thresholds=np.array([0.5, 0.6, 0.5]))
    assert [(s.label, s.start, s.end, s.frames) for s in found] == [("person", 0, 1.5, 3), ("dog", 0.5, 2.0, 3)]


@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
def test_a_live_streams_segments_are_handed_on_as_each_closes_and_add_up_to_the_whole_streams(untrained,
                                                                                            multi_label):
    """Frames arriving a batch at a time: each segment is handed on once the frames half the smoothing window
    past its end have come (and no later), and those handed on, then the rest at the end, are the segments of
    the whole stream."""
    model = residual.load_model(untrained)  # classes a, b, c
    model.multi_label, model.threshold = multi_label, 0.5
    info = VideoInfo("rtsp://127.0.0.1:8554/cam", 32, 32, None, None, None, 0)
    rng = np.random.default_rng(0)
    scenes = [0] * 23 + [1] * 17 + [2] * 31 + [1] * 4 + [0] * 25  # 100 frames at 10 a second; a short scene
    times = np.arange(len(scenes)) / 10
    probabilities = np.full((len(scenes), 3), 0.1) + rng.uniform(0, 0.05, (len(scenes), 3))
    probabilities[np.arange(len(scenes)), scenes] = 0.8
    probabilities = probabilities.astype(np.float32)  # as the model gives them
    finder = segment_finder(model, info, smooth=1.0)
    handed_on = []  # (segment, the last frame's time when it was handed on)
    for start in range(0, len(scenes), 4):  # batches of four frames, as they arrive
        finder.add(list(times[start:start + 4]), torch.from_numpy(probabilities[start:start + 4]), None)
        handed_on += [(segment, times[start:start + 4][-1]) for segment in finder.closed()]
    rest = finder.finish()
    whole = segments(times, probabilities, ["a", "b", "c"], smooth=1.0,
                     thresholds=np.full(3, 0.5) if multi_label else None)
    ours = sorted([segment for segment, _ in handed_on] + rest, key=lambda s: (s.start, s.label or ""))
    assert _same_segments(ours, whole) and finder.found == ours
    assert len(handed_on) >= 3 and len(rest) >= 1  # the last segment stays open until the stream ends
    for segment in ours:  # its peak: its most probable frame of its class (unsmoothed), as the frames' number
        column = ["a", "b", "c"].index(segment.label)
        inside = np.flatnonzero((times >= segment.start) & (times < segment.end))
        assert segment.peak == inside[np.argmax(probabilities[inside, column])]
    for segment, when in handed_on:
        assert segment.end + 0.5 < when < segment.end + 0.5 + 1.0 + 0.4  # final, then seen within a look and a batch


def _same_segments(found, expected) -> bool:
    """The same segments, their probabilities summed in another order aside."""
    return ([(s.label, s.start, s.end, s.frames) for s in found] == [(s.label, s.start, s.end, s.frames)
                                                                      for s in expected]
            and [s.probability for s in found] == pytest.approx([s.probability for s in expected], rel=1e-9))


def _plain_segments(times, probabilities, names, smooth, end, min_confidence=None, thresholds=None):
    """The segments worked out the plain way, the whole video at once: each frame's probabilities averaged over
    the frames within smooth / 2 of it, its answer(s), runs of frames with the same answer."""
    scores = np.array([probabilities[np.abs(times - time) <= smooth / 2].mean(axis=0) for time in times])
    ends = np.append(times[1:], end)
    if thresholds is None:
        answers = [names[top] if score[top] >= (min_confidence or 0) else None
                   for score, top in zip(scores, scores.argmax(axis=1))]
        columns = [(answers, scores.max(axis=1))]
    else:
        columns = [([name if present else "" for present in scores[:, index] >= thresholds[index]], scores[:, index])
                   for index, name in enumerate(names)]
    found = []
    for answers, held in columns:
        start = 0
        for index in range(1, len(times) + 1):
            if index == len(times) or answers[index] != answers[start]:
                if answers[start] != "":
                    found.append(residual.video.Segment(float(times[start]), float(ends[index - 1]), answers[start],
                                                        float(held[start:index].mean()), index - start))
                start = index
    return sorted(found, key=lambda s: (s.start, s.label or ""))


@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
def test_a_long_streams_segments_are_found_in_memory_that_does_not_grow(multi_label):
    """Half an hour of a stream at 8 frames a second, in batches of 1 to 12 frames: the segments handed on as
    they close, then the rest, are those worked out the plain way over the whole stream, while the frames kept
    never exceed the smoothing window and a look's worth."""
    names, smooth, fps = ["a", "b", "c", "d", "e"], 1.0, 8
    rng = np.random.default_rng(1)
    scenes = np.concatenate([np.full(rng.integers(1, 80), rng.integers(0, 6)) for _ in range(400)])[:30 * 60 * fps]
    times = np.arange(len(scenes)) / fps  # eighths of a second: windows fall on exact times
    probabilities = rng.uniform(0, 0.3, (len(scenes), 5))
    seen = scenes < 5  # scene 5: no class stands out
    probabilities[np.flatnonzero(seen), scenes[seen]] = 0.9
    probabilities[np.flatnonzero(seen & (rng.uniform(size=len(scenes)) < 0.3)), 4] = 0.8  # e, now and then, too
    thresholds = np.full(5, 0.5) if multi_label else None
    finder = SegmentFinder(names, smooth=smooth, min_confidence=None if multi_label else 0.45, thresholds=thresholds)
    handed_on, start, most_kept = [], 0, 0
    while start < len(times):
        stop = start + int(rng.integers(1, 13))
        finder.add(list(times[start:stop]), torch.from_numpy(probabilities[start:stop].astype(np.float32)))
        handed_on += finder.closed()
        most_kept, start = max(most_kept, finder.kept_frames), stop
    rest = finder.finish()
    as_given = probabilities.astype(np.float32).astype(np.float64)
    plain = _plain_segments(times, as_given, names, smooth, times[-1] + 1 / fps, None if multi_label else 0.45,
                            thresholds)
    assert len(plain) > 200 and len(rest) < 10
    ours = sorted(handed_on + rest, key=lambda s: (s.start, s.label or ""))
    assert _same_segments(ours, plain) and ours == finder.found
    assert (None in [s.label for s in ours]) != multi_label  # unsure stretches are segments of no class
    assert most_kept <= fps * (smooth + 1) + 12 + 1, "the frames of the smoothing window and of a look, at most"


def test_a_frame_timed_before_frames_already_final_counts_at_the_last_of_them():
    """A damaged live stream's timestamps step back: the frame is not lost, it counts where the stream was."""
    finder = SegmentFinder(["a", "b"], smooth=0)
    finder.add(list(np.arange(40) / 10), np.tile([0.9, 0.1], (40, 1)))  # 0 to 3.9 s; those before 3.9 s final
    finder.add([0.35, 4.0], np.array([[0.1, 0.9], [0.9, 0.1]]))
    assert [(s.label, s.start, s.end, s.frames) for s in finder.finish()] == [
        ("a", 0.0, 3.8, 39), ("b", 3.8, 3.9, 1), ("a", 3.9, pytest.approx(4.1), 2)]


@pytest.mark.parametrize("most", [7, 64])
def test_a_timelines_points_stop_growing_and_each_is_the_mean_of_its_frames(monkeypatch, most):
    """Frames in batches of 1 to 12, far more than a timeline keeps: after every batch the points are at most
    TIMELINE_POINTS, each the mean time and probabilities of the next frames_per_point frames (a power of two),
    the frames short of a whole point as one more."""
    monkeypatch.setattr("residual.video.TIMELINE_POINTS", most)
    rng = np.random.default_rng(2)
    times, probabilities = np.sort(rng.uniform(0, 600, 3000)), rng.uniform(0, 1, (3000, 4)).astype(np.float32)
    timeline, start = TimelineScores(4), 0
    while start < len(times):
        stop = min(start + int(rng.integers(1, 13)), len(times))
        timeline.add(list(times[start:stop]), torch.from_numpy(probabilities[start:stop]), None)
        start = stop
        points_times, points = timeline.arrays(4)
        per = timeline.frames_per_point
        assert len(points_times) == len(points) <= most + 1 and per & (per - 1) == 0
        groups = [slice(first, min(first + per, stop)) for first in range(0, stop, per)]
        assert points_times == pytest.approx([times[group].mean() for group in groups])
        assert points == pytest.approx(np.stack([probabilities[group].mean(axis=0) for group in groups]), abs=1e-6)
    assert timeline.frames_per_point == 2 ** int(np.ceil(np.log2(3000 / most)))


def test_predict_on_a_video_writes_a_row_per_frame_segments_and_a_timeline(untrained, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    video = write_video(tmp_path / "clip.mp4", grey_frames(20))
    model = str(untrained)

    assert main(["predict", model, str(video), "--fps", "5", "--format", "csv", "--topk", "2", "--quiet"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == ["frame", "rank", "class_id", "class_name", "probability"]
    assert [row["frame"] for row in rows[::2]] == [f"{video}#t={t:.3f}" for t in np.arange(10) / 5]

    assert main(["predict", model, str(video), "--format", "json", "--fps", "1", "--quiet"]) == 0
    frames = json.loads(capsys.readouterr().out)
    assert [row["frame"] for row in frames] == [f"{video}#t={t:.3f}" for t in (0, 1)] and len(frames[0]["top"]) == 3

    assert main(["predict", model, str(video), "--format", "probabilities", "--out", str(tmp_path / "p.csv"),
                 "--timeline", str(tmp_path / "pictures"), "--quiet"]) == 0
    assert "wrote 20 frame prediction(s)" in capsys.readouterr().err
    probabilities = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(probabilities) == 20 and list(probabilities[0]) == ["frame", "a", "b", "c"]
    picture = Image.open(tmp_path / "pictures" / "clip.mp4.timeline.png")
    assert picture.width > 600 and picture.height > 300

    assert main(["predict", model, str(video), "--smooth", "0"]) == 0
    table = capsys.readouterr().out
    assert f"{video}: 20 frames" in table and "0:00.0" in table and "0:02.0" in table


def test_per_video_a_videos_row_is_the_mean_of_its_frames_probabilities(untrained, tmp_path, capsys, monkeypatch):
    """`--per-video`: a row per video (a camera trap's clips sorted by what they show), its classes those of its
    frames' probabilities averaged, as the per-frame rows give them, in every format."""
    monkeypatch.setenv("COLUMNS", "250")
    (tmp_path / "clips").mkdir()
    dark = write_video(tmp_path / "clips" / "dark.mp4", grey_frames(12))
    bright = write_video(tmp_path / "clips" / "bright.mp4", [np.full((32, 32, 3), 230 - 9 * i, np.uint8)
                                                             for i in range(8)])
    model = str(untrained)
    assert main(["predict", model, str(tmp_path / "clips"), "--format", "probabilities", "--quiet"]) == 0
    mean = {}  # each video's frames' probabilities averaged by hand
    for row in csv.DictReader(io.StringIO(capsys.readouterr().out)):
        mean.setdefault(row["frame"].split("#t=")[0], []).append([float(row[name]) for name in "abc"])
    mean = {video: np.mean(rows, axis=0) for video, rows in mean.items()}
    assert set(mean) == {str(dark), str(bright)}

    assert main(["predict", model, str(tmp_path / "clips"), "--per-video", "--format", "probabilities",
                 "--quiet"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["video"] for row in rows] == [str(bright), str(dark)]  # a folder's videos in name order
    for row in rows:
        assert [float(row[name]) for name in "abc"] == pytest.approx(mean[row["video"]], abs=2e-6)

    assert main(["predict", model, str(dark), str(bright), "--per-video", "--format", "labels", "--quiet"]) == 0
    labels = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["video"], row["label"]) for row in labels] == [
        (str(video), "abc"[int(np.argmax(mean[str(video)]))]) for video in (dark, bright)]

    assert main(["predict", model, str(dark), "--per-video", "--format", "json", "--topk", "2", "--quiet"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["video"] == str(dark) and len(answer["top"]) == 2
    assert answer["top"][0]["probability"] == pytest.approx(mean[str(dark)].max(), abs=2e-6)

    assert main(["predict", model, str(dark), "--per-video", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "1 video(s), by the mean of their frames' probabilities" in table and "segment" not in table

    # A multi-label model's row: the classes whose mean probability reaches the threshold (each class its own
    # sigmoid), here set between the dark video's classes so that some are in and some out.
    tagger = residual.load_model(model)
    tagger.multi_label = True
    residual.save_model(tagger, tmp_path / "tagger.safetensors")
    tagger = str(tmp_path / "tagger.safetensors")
    assert main(["predict", tagger, str(dark), "--format", "probabilities", "--quiet"]) == 0
    frames = np.array([[float(row[name]) for name in "abc"]
                       for row in csv.DictReader(io.StringIO(capsys.readouterr().out))])
    tagged = frames.mean(axis=0)
    threshold = float(np.sort(tagged)[:2].mean())  # between the least probable class and the next
    present = [name for name, probability in zip("abc", tagged) if probability >= threshold]
    assert np.diff(np.sort(tagged)).min() > 1e-4  # apart by far more than the rows' six decimals
    assert 0 < len(present) < 3 and not np.allclose(frames.sum(axis=1), 1)  # sigmoids, not a softmax
    assert main(["predict", tagger, str(dark), "--per-video", "--format", "labels", "--threshold", str(threshold),
                 "--quiet"]) == 0
    [row] = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert (row["video"], sorted(row["label"].split())) == (str(dark), present)
    assert main(["predict", tagger, str(dark), "--per-video", "--format", "json", "--threshold", str(threshold),
                 "--quiet"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert sorted(answer["labels"]) == present
    assert {top["class_name"]: top["probability"] for top in answer["top"]} == pytest.approx(
        dict(zip("abc", tagged)), abs=2e-6)

    image = tmp_path / "still.png"
    Image.fromarray(grey_frames(1)[0]).save(image)
    for arguments, message in [([str(image), "--per-video"], "--per-video is for videos"),
                               ([str(dark), "--per-video", "--format", "segments"],
                                "--per-video gives a video's classes from its frames' mean probabilities; "
                                "--format segments gives its stretches of time: leave one out")]:
        assert main(["predict", model, *arguments]) == 2
        assert message in capsys.readouterr().err, arguments


def test_annotate_writes_the_video_again_with_its_segments_drawn_on_every_frame(untrained, tmp_path):
    bright = [np.full((64, 96, 3), 200, np.uint8) for _ in range(12)]
    video = write_video(tmp_path / "clip.mp4", bright, rotation=90)  # written upright: 64 wide, 96 high
    assert main(["predict", str(untrained), str(video), "--fps", "2", "--annotate", str(tmp_path / "annotated"),
                 "--format", "segments", "--quiet"]) == 0
    written = list(video_frames(tmp_path / "annotated" / "clip.mp4.annotated.mp4"))
    original = list(video_frames(video))
    assert [frame.time for frame in written] == pytest.approx([frame.time for frame in original])  # every frame
    assert video_info(tmp_path / "annotated" / "clip.mp4.annotated.mp4").rotation == 0
    for frame, source in zip(written, original):
        drawn, before = np.asarray(frame.image, float), np.asarray(source.image, float)
        assert drawn.shape == before.shape == (96, 64, 3)
        assert drawn[:8, :20].mean() < before[:8, :20].mean() - 40  # the dark band behind the class's name
        assert np.abs(drawn[40:] - before[40:]).mean() < 3  # the rest as it was, but for compression


def test_predict_refuses_flags_that_do_not_fit_videos_or_images(untrained, tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    video = write_video(tmp_path / "clips" / "clip.mp4", grey_frames(4))
    image = tmp_path / "still.png"
    Image.fromarray(grey_frames(1)[0]).save(image)
    model = str(untrained)
    cases = [([str(image), "--fps", "2"], "--fps is for videos"),
             ([str(image), "--format", "segments"], "--format segments is for videos"),
             ([str(video), str(image)], f"{image}: predict videos and images in separate calls"),
             ([str(video), "--workers", "2"], "--workers is for images"),
             ([str(video), "--decoder", "torchvision"], "--decoder torchvision is for images"),
             ([str(video), "--fps", "0"], "--fps must be above 0"),
             ([str(video), "--smooth", "-1"], "--smooth must be 0"),
             ([str(tmp_path / "clips"), str(image)], f"{image}: predict videos and images in separate calls")]
    for arguments, message in cases:
        assert main(["predict", model, *arguments]) != 0
        assert message in capsys.readouterr().err, arguments


def test_a_folder_of_videos_is_its_videos_and_a_folder_with_images_is_its_images(untrained, tmp_path, capsys,
                                                                                 monkeypatch, caplog):
    monkeypatch.setenv("COLUMNS", "250")
    for name in ("day1/trap.mp4", "day2/trap.mp4", "day2/notes.txt"):
        (tmp_path / "clips" / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".mp4"):
            write_video(tmp_path / "clips" / name, grey_frames(10))
        else:
            (tmp_path / "clips" / name).write_text("not read")
    assert main(["predict", str(untrained), str(tmp_path / "clips"), "--format", "segments", "--quiet"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted({row["video"] for row in rows}) == [str(tmp_path / "clips" / "day1" / "trap.mp4"),
                                                      str(tmp_path / "clips" / "day2" / "trap.mp4")]
    assert main(["explain", str(untrained), str(tmp_path / "clips"), "--out", str(tmp_path / "cams"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "cams").glob("*.mp4")) == ["trap.mp4.1.gradcam.mp4",
                                                                       "trap.mp4.2.gradcam.mp4"]
    capsys.readouterr()

    Image.fromarray(grey_frames(1)[0]).save(tmp_path / "clips" / "still.png")  # now a folder of images
    assert main(["predict", str(untrained), str(tmp_path / "clips"), "--format", "csv", "--quiet"]) == 0
    assert {row["image"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))} == \
        {str(tmp_path / "clips" / "still.png")}
    assert "left out 3 file(s) whose extension is no image's" in caplog.text  # the videos too: named, not dropped


def test_iter_predict_video_checks_its_arguments_before_the_first_frame(tmp_path):
    video = write_video(tmp_path / "clip.mp4", grey_frames(4))
    model = residual.create_model("resnet20", num_classes=3).eval()
    info = video_info(video)
    with pytest.raises(ConfigError, match="--topk"):
        iter_predict_video(model, info, FrameScores(), topk=0)
    with pytest.raises(ConfigError, match="--min-confidence"):
        iter_predict_video(model, info, FrameScores(), min_confidence=1.5)
    with pytest.raises(BadImageError, match="no such file"):
        video_info(tmp_path / "missing.mp4")
    scores = FrameScores()
    assert len(list(iter_predict_video(model, info, scores, batch_size=3))) == 4
    times, probabilities = scores.arrays(3)
    assert times.tolist() == pytest.approx([0, 0.1, 0.2, 0.3]) and probabilities.shape == (4, 3)
    assert torch.allclose(torch.from_numpy(probabilities).sum(1).float(), torch.ones(4))


def test_explaining_a_video_draws_each_frames_heatmap_over_what_the_model_saw_and_a_key_frame_per_segment(demo_run,
                                                                                                        tmp_path):
    """Circles, squares, then stars, each test image in the middle of a wider frame of grey: every frame of the
    video written is that frame with the heatmap `explain` gives its picture over the square the model sees and
    the grey beside it dimmed; the frames' probabilities are predict's; each segment's key frame is its most
    probable frame of its class, explained."""
    shapes = ("circle", "square", "star")
    pictures = [Image.open(path).convert("RGB").resize((48, 48)) for shape in shapes
                for path in sorted((demo_run["data"] / "test" / shape).iterdir())[:15]]
    frames = [np.full((48, 64, 3), 200, np.uint8) for _ in pictures]
    for frame, picture in zip(frames, pictures):
        frame[:, 8:56] = np.asarray(picture)
    video = write_video(tmp_path / "scenes.mkv", frames)  # lossless: what the test computes is what is decoded
    model = residual.load_model(demo_run["model"]).eval()

    result = residual.explain_video(model, str(video), tmp_path / "out", batch_size=16)
    assert not result.failed and result.path == tmp_path / "out" / "scenes.mkv.gradcam.mp4"
    predicted = predict_video(model, str(video), batch_size=16)
    assert np.allclose(result.probabilities, predicted.probabilities, atol=1e-5)
    assert (result.explained == result.probabilities.argmax(1)).all()
    assert [segment.label for segment in result.segments] == list(shapes)

    decoded = [frame.image for frame in video_frames(video)]
    cams = residual.explain(model, decoded).explanations
    written = list(video_frames(result.path))
    assert [frame.time for frame in written] == pytest.approx(list(result.times), abs=1e-3)
    below_caption = slice(20, None)
    losses, turned_losses = [], []
    for frame, image, cam in list(zip(written, decoded, cams))[::4]:
        shown = np.asarray(frame.image, np.float32)
        assert shown.shape == (48, 64, 3)
        for heatmap, kept in [(cam.heatmap, losses), (cam.heatmap[::-1, ::-1], turned_losses)]:
            expected = np.asarray(frame_overlay(image, heatmap, model.preprocessing), np.float32)
            kept.append(np.abs(shown[below_caption] - expected[below_caption]).mean())
        assert shown[below_caption, :6].mean() == pytest.approx(200 * UNSEEN_BRIGHTNESS, abs=6)
        assert shown[:6, :30].mean() < np.asarray(image, np.float32)[:6, :30].mean() - 40  # the caption's band
    # H.264 loses some of the jet colours' detail; each heatmap turned around (the wrong way up, and a circle's
    # nearly the same) is farther.
    assert max(losses) < 10 and np.mean(losses) < np.mean(turned_losses) / 2

    assert len(result.key_frames) == 3
    for segment, key in zip(result.segments, result.key_frames):
        inside = (result.times >= segment.start) & (result.times < segment.end)
        column = model.class_names.index(segment.label)
        assert key.class_name == segment.label and key.predicted
        assert key.probability == pytest.approx(result.probabilities[inside, column].max(), abs=1e-5)
        time = float(key.source.split("#t=")[1])
        assert segment.start <= time < segment.end
        assert key.path == tmp_path / "out" / f"scenes.mkv.t={time:.3f}.{segment.label}.gradcam.png"
        assert Image.open(key.path).width > 400
        assert np.allclose(key.heatmap, cams[int(np.argmin(np.abs(result.times - time)))].heatmap, atol=1e-5)


def test_the_overlay_covers_the_square_the_model_sees_and_dims_the_rest():
    """center_crop_box is the square resize_center_crop keeps: white there and black around it crops to white."""
    assert center_crop_box(64, 96, 32, 32) == (16, 0, 80, 64)  # half size: 48 x 32, then the middle 32 columns
    assert center_crop_box(100, 100, 36, 32) == (6, 6, 94, 94)
    for height, width, resize, crop in [(64, 96, 32, 32), (100, 100, 36, 32), (480, 270, 256, 224)]:
        left, top, right, bottom = center_crop_box(height, width, resize, crop)
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[top:bottom, left:right] = 255
        kept = resize_center_crop(Image.fromarray(pixels), resize, crop).float()
        # White within; on its one-pixel rim, the antialiasing of the box's fractional edge, more white than black.
        assert kept[:, 1:-1, 1:-1].min() == 255 and kept.min() > 127

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    heatmap = np.repeat(np.linspace(0, 1, 32, dtype=np.float32)[:, None], 32, axis=1)  # 0 at the top, 1 at the foot
    preprocessing = dataclasses.replace(residual.create_model("resnet20", num_classes=3).preprocessing,
                                        resize_size=32, input_size=32)
    shown = np.asarray(frame_overlay(image, heatmap, preprocessing))
    original = np.asarray(image, np.float32)
    assert (shown[:, :16] == (original[:, :16] * UNSEEN_BRIGHTNESS).astype(np.uint8)).all()
    assert (shown[:, 80:] == (original[:, 80:] * UNSEEN_BRIGHTNESS).astype(np.uint8)).all()
    # The crop is 64 px across here: row r of it lies at (r + 0.5) / 2 - 0.5 of the heatmap's 32, the ramp's value.
    enlarged = np.repeat((np.arange(64)[:, None] + 0.5) / 2 - 0.5, 64, axis=1).clip(0, 31) / 31
    difference = np.abs(shown[:, 16:80].astype(float) - blended(original[:, 16:80], enlarged))
    assert difference.mean() < 0.2 and difference.max() <= 3  # the jet colour map is a table of 256 colours


def test_explain_on_the_command_line_takes_videos_a_target_and_fps_and_refuses_what_does_not_fit(untrained, tmp_path,
                                                                                                   capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    video = write_video(tmp_path / "clip.mp4", grey_frames(20, 48))
    model = str(untrained)
    out = tmp_path / "out"

    assert main(["explain", model, str(video), str(video), "--fps", "4", "--target", "b", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"{video}: 8 frames explained by gradcam") == 2  # 0, 0.3, 0.5, 0.8 ... 1.8 s
    for index in (1, 2):  # two videos of one name: numbered
        assert len(list(video_frames(out / f"clip.mp4.{index}.gradcam.mp4"))) == 8
        keys = list(out.glob(f"clip.mp4.{index}.t=*.png"))
        assert keys and all(key.name.endswith(".b.gradcam.png") for key in keys)  # the target's, not the top class's

    result = explain_video(residual.load_model(untrained), str(video), tmp_path / "api", target="b", fps=4,
                           method="layercam", layer="layer2")
    assert (result.explained == 1).all() and len(result.times) == 8
    assert [key.class_name for key in result.key_frames] == ["b"] * len(result.segments)
    assert result.path.name == "clip.mp4.layercam.mp4"

    (tmp_path / "bad.mp4").write_text("not a video")
    assert main(["explain", model, str(tmp_path / "bad.mp4"), str(video), "--out", str(tmp_path / "some"),
                 "--quiet"]) == 1
    assert f"error: {tmp_path / 'bad.mp4'}: not a video FFmpeg can read" in capsys.readouterr().err
    assert (tmp_path / "some" / "clip.mp4.gradcam.mp4").exists()  # the other video still explained

    result = explain_video(residual.load_model(untrained), str(wholly_damaged(tmp_path)), tmp_path / "none")
    assert result.path is None and len(result.times) == 0 and result.key_frames == []
    assert result.failed[-1] == f"{tmp_path / 'damaged.mp4'}: no frame to explain (none decoded); nothing written"
    assert list((tmp_path / "none").iterdir()) == []

    image = tmp_path / "still.png"
    Image.fromarray(grey_frames(1)[0]).save(image)
    cases = [([str(image), "--fps", "2"], "--fps is for videos"),
             ([str(image), "--smooth", "0"], "--smooth is for videos"),
             ([str(video), str(image)], f"{image}: explain videos and images in separate calls"),
             ([str(video), "--workers", "2"], "--workers is for images"),
             ([str(video), "--fps", "0"], "--fps must be above 0"),
             ([str(video), "--layer", "fc"], "--layer 'fc': its output is not a feature map")]
    for arguments, message in cases:
        assert main(["explain", model, *arguments, "--out", str(tmp_path / "refused"), "--quiet"]) == 2, arguments
        assert message in capsys.readouterr().err
        assert not list((tmp_path / "refused").glob("*.mp4"))  # nothing half-written


def sound_video(path, codec: str, rate: int):
    """Video from 0.5 s to 2.5 s at 10 frames/s, black, then white from 1.5 s; sound from 0 to 2.5 s, silent,
    then 440 Hz from 1.5 s: the picture and the sound change at the same moment, 1 s into the video's frames."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        sound = container.add_stream(codec, rate=rate)
        sound.layout = "mono"
        form, size = sound.codec_context.format.name, sound.codec_context.frame_size or 1024
        for index in range(5, 25):
            picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 255 if index >= 15 else 0, np.uint8))
            picture.pts, picture.time_base = index, Fraction(1, 10)
            container.mux(video.encode(picture))
        for first in range(0, int(2.5 * rate), size):
            at = np.arange(first, first + size) / rate
            wave = np.where(at >= 1.5, 0.5 * np.sin(2 * np.pi * 440 * at), 0)[None]
            piece = av.AudioFrame.from_ndarray((wave * 32767).astype(np.int16) if form.startswith("s16")
                                               else wave.astype(np.float32), format=form, layout="mono")
            piece.sample_rate, piece.pts = rate, first
            container.mux(sound.encode(piece))
        container.mux(video.encode())
        container.mux(sound.encode())
    return path


@pytest.mark.parametrize("name, codec, rate, written_rate", [("camera.mp4", "aac", 48000, 48000),
                                                              ("camera.mov", "pcm_alaw", 8000, 8000),
                                                              ("odd.mov", "pcm_alaw", 37800, 48000)])
def test_annotated_and_explained_videos_keep_the_sound_on_the_pictures_clock(untrained, tmp_path, name, codec, rate,
                                                                            written_rate):
    """AAC goes into the MP4 as it is; G.711 A-law (a security camera's), which MP4 does not hold, is encoded
    again as AAC (at a rate AAC has). Either way the sound starts where the picture does: 1 s into the frames,
    as in the source."""
    video = str(sound_video(tmp_path / name, codec, rate))
    with av.open(video) as container:  # the pictures start half a second after the sound
        stream = container.streams.video[0]
        assert float(stream.start_time * stream.time_base) == pytest.approx(0.5)
    assert main(["predict", str(untrained), video, "--annotate", str(tmp_path / "out"), "--format", "segments",
                 "--quiet"]) == 0
    result = explain_video(residual.load_model(untrained), video, tmp_path / "cams", fps=5)
    for written in (tmp_path / "out" / f"{name}.annotated.mp4", result.path):
        frames = list(video_frames(written))
        white = next(frame.time for frame in frames if np.asarray(frame.image)[20:].mean() > 128)
        assert white == pytest.approx(1.0, abs=0.01)
        with av.open(str(written)) as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.name == "aac" and stream.rate == written_rate
            samples = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(stream)])
        onset = np.flatnonzero(np.abs(samples) > 0.1)[0] / written_rate
        assert onset == pytest.approx(1.0, abs=0.03)
        assert len(samples) / written_rate == pytest.approx(2.0, abs=0.1)  # from the frames' start to the sound's end
