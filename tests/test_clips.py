"""residual unpack on class folders of video clips: their frames as an image folder, every clip's frames in one
split, so validation never scores frames whose neighbours were trained on."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from residual.cli import main
from residual.data.clips import unpack_clips
from residual.data.datasets import DatasetError, open_dataset
from residual.data.frames import Frame, write_video
from residual.data.unpack import UnpackError
from residual.evaluate import ClipScores

pytest.importorskip("av")


def clip(path: Path, brightness: int, seconds: float = 2.0, size: tuple[int, int] = (64, 48)) -> Path:
    """A clip of one grey at 10 frames a second, so its frames tell which clip they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", size, (brightness,) * 3)
    write_video(path, (Frame(index / 10, picture) for index in range(round(seconds * 10))))
    return path


def brightness(path: Path) -> int:
    return round(np.asarray(Image.open(path)).mean())


def test_each_clips_frames_go_to_one_split_and_each_class_gives_val_whole_clips(tmp_path):
    """Two classes of four clips, each its own grey: a quarter of each class's clips, drawn by the seed, is
    val; every frame of a clip is in its clip's split, at most 2 a second, named by its clip and time."""
    greys = {"cat": (30, 60, 90, 120), "dog": (150, 180, 210, 240)}
    for name, levels in greys.items():
        for index, level in enumerate(levels):
            clip(tmp_path / "clips" / name / f"clip{index}.mp4", level)
    result = unpack_clips(tmp_path / "clips", tmp_path / "frames", fps=2, val_split=0.25, progress=False)

    assert result.classes == ["cat", "dog"] and not result.skipped
    assert dict(result.clips) == {"train": 6, "val": 2} and dict(result.images) == {"train": 24, "val": 8}
    split_of: dict[str, set[str]] = {}
    for path in (tmp_path / "frames").rglob("*.jpg"):
        split, name = path.parts[-3], path.parent.name
        clip_name, time = path.name.removesuffix(".jpg").split(".t=")
        assert float(time) in (0.0, 0.5, 1.0, 1.5)  # at most 2 a second, at each frame's own time
        level = greys[name][int(clip_name.removeprefix("clip").removesuffix(".mp4"))]
        assert abs(brightness(path) - level) <= 3  # the frame is its clip's
        split_of.setdefault(f"{name}/{clip_name}", set()).add(split)
    assert all(len(splits) == 1 for splits in split_of.values())  # no clip is in two splits
    assert sorted(next(iter(s)) for s in split_of.values()).count("val") == 2
    assert {key.split("/")[0] for key, splits in split_of.items() if splits == {"val"}} == {"cat", "dog"}

    dataset = open_dataset(tmp_path / "frames")  # the image folder residual trains on, its val/ kept
    assert dataset.classes == ["cat", "dog"] and (len(dataset.train), len(dataset.val)) == (24, 8)

    unpack_clips(tmp_path / "clips", tmp_path / "again", fps=2, val_split=0.25, progress=False)
    assert sorted(p.name for p in (tmp_path / "again" / "val").rglob("*.jpg")) == \
        sorted(p.name for p in (tmp_path / "frames" / "val").rglob("*.jpg"))  # the seed draws the same clips


def test_a_source_split_into_train_val_and_test_keeps_its_splits(tmp_path, capsys):
    for split, level in (("train", 40), ("val", 120), ("test", 200)):
        for name in ("cat", "dog"):
            clip(tmp_path / "clips" / split / name / "day1" / "clip.mp4", level, seconds=1.0)
    assert main(["unpack", str(tmp_path / "clips"), str(tmp_path / "frames"), "--frame-size", "24"]) == 0
    printed = capsys.readouterr().out
    assert "wrote " in printed and "frames of 6 clips" in printed and "val/: 2 images, 2 classes" in printed
    for split, level in (("train", 40), ("val", 120), ("test", 200)):
        frames = sorted((tmp_path / "frames" / split).rglob("*.jpg"))
        assert [p.name for p in frames] == ["day1-clip.mp4.t=0.000.jpg"] * 2  # 1 a second; the folder in the name
        assert all(abs(brightness(p) - level) <= 3 and Image.open(p).size == (32, 24) for p in frames)

    assert main(["unpack", str(tmp_path / "clips"), str(tmp_path / "more"), "--val-split", "0.5"]) == 2
    assert "--val-split: " in capsys.readouterr().err and not (tmp_path / "more").exists()


def test_clips_that_cannot_be_read_are_reported_and_the_rest_unpacked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps to the terminal width
    for name, level in (("cat", 50), ("dog", 200)):
        for index in range(2):
            clip(tmp_path / "clips" / name / f"clip{index}.mp4", level)
    (tmp_path / "clips" / "cat" / "notes.mp4").write_text("not a video")
    (tmp_path / "clips" / "cat" / "photo.png").write_bytes(b"an image among clips: named, not unpacked")
    assert main(["unpack", str(tmp_path / "clips"), str(tmp_path / "frames")]) == 0
    printed = capsys.readouterr().out
    assert "frames of 4 clips" in printed and "skipped 2:" in printed
    assert f"{tmp_path / 'clips' / 'cat' / 'notes.mp4'}: not a video FFmpeg can read" in printed
    assert f"{tmp_path / 'clips' / 'cat' / 'photo.png'}: not a video clip" in printed
    assert len(list((tmp_path / "frames").rglob("*.jpg"))) == 8

    (tmp_path / "unreadable" / "cat").mkdir(parents=True)
    (tmp_path / "unreadable" / "dog").mkdir()
    for name in ("cat", "dog"):
        (tmp_path / "unreadable" / name / "a.mp4").write_text("no")
    with pytest.raises(UnpackError, match="no frame could be read from any clip"):
        unpack_clips(tmp_path / "unreadable", tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none.*"))  # nothing half-written


def test_the_unpack_command_refuses_flags_that_do_not_fit_its_source(tmp_path, capsys):
    clip(tmp_path / "clips" / "cat" / "a.mp4", 50, seconds=0.5)
    clip(tmp_path / "clips" / "dog" / "a.mp4", 200, seconds=0.5)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    cases = [([str(tmp_path / "clips"), str(tmp_path / "out"), "--label-column", "x"],
              "--label-column: "),
             ([str(tmp_path / "clips"), str(tmp_path / "out"), "--fps", "0"], "--fps must be above 0"),
             ([str(tmp_path / "clips"), str(tmp_path / "out"), "--frame-size", "0"], "--frame-size must be at least"),
             ([str(tmp_path / "clips"), str(tmp_path / "taken")], "already exists"),
             ([str(tmp_path / "taken"), str(tmp_path / "out"), "--fps", "2"],
              "--fps is for a folder of class folders of video clips")]
    for arguments, message in cases:
        assert main(["unpack", *arguments]) == 2, arguments
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_a_clip_is_answered_by_its_frames_mean_probabilities():
    """Two of a clip's three frames right make the clip right; a clip with one frame is that frame."""
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    sources = ["val/cat/a.mp4.t=0.000.jpg", "val/cat/a.mp4.t=1.000.jpg", "val/cat/a.mp4.t=2.000.jpg",
               "val/cat/b.mp4.t=0.000.jpg"]
    clips = ClipScores.of(sources, probs, np.array([0, 0, 0, 0]))
    assert clips.names == ["val/cat/a.mp4", "val/cat/b.mp4"] and clips.frames.tolist() == [3, 1]
    assert clips.probs == pytest.approx(np.array([[0.7, 0.3], [0.3, 0.7]]))
    metrics = clips.metrics(["cat", "dog"])
    assert (metrics["clips"], metrics["frames"], metrics["top1"]) == (2, 4, 0.5)
    assert metrics["answered_wrong"] == [{"clip": "val/cat/b.mp4", "true": "cat", "predicted": "dog",
                                          "probability": pytest.approx(0.7), "frames": 1}]
    # Not clips: an image not named as a frame among them, or one clip's frames under two labels.
    assert ClipScores.of(sources[:3] + ["val/cat/photo.jpg"], probs, np.array([0, 0, 0, 0])) is None
    assert ClipScores.of(sources, probs, np.array([0, 1, 0, 0])) is None


def test_eval_on_unpacked_frames_scores_each_clip_too(tmp_path, capsys):
    """`residual unpack` then `residual eval`: besides the frames' scores, each clip's, from the mean of its
    frames' probabilities (predictions.csv's rows, averaged by hand here), in clips.csv, the report and the
    summary table."""
    import csv
    import json

    import residual

    for name, levels in {"cat": (20, 90, 160), "dog": (60, 130, 230)}.items():
        for index, level in enumerate(levels):
            clip(tmp_path / "clips" / "val" / name / f"clip{index}.mp4", level, seconds=1.5)
            clip(tmp_path / "clips" / "train" / name / f"clip{index}.mp4", level, seconds=0.5)
    assert main(["unpack", str(tmp_path / "clips"), str(tmp_path / "frames"), "--fps", "2"]) == 0
    model = residual.create_model("resnet20", num_classes=2)
    model.class_names = ["cat", "dog"]
    residual.save_model(model, tmp_path / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "model.safetensors"), str(tmp_path / "frames"), "--split", "val",
                 "--out", str(tmp_path / "report"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "clips (frames' probabilities averaged)" in printed and "6 (18 frames)" in printed

    with open(tmp_path / "report" / "predictions.csv", newline="") as stream:
        frames = list(csv.DictReader(stream))
    by_clip: dict[str, list[float]] = {}
    for row in frames:  # the probability of dog: the predicted class's, or one less the true cat's
        dog = float(row["probability"]) if row["predicted"] == "dog" else 1 - float(row["probability"])
        by_clip.setdefault(row["image"].split(".t=")[0], []).append(dog)
    with open(tmp_path / "report" / "clips.csv", newline="") as stream:
        clips = list(csv.DictReader(stream))
    assert sorted(row["clip"] for row in clips) == sorted(by_clip) and len(clips) == 6
    for row in clips:
        mean_dog = np.mean(by_clip[row["clip"]])
        assert row["predicted"] == ("dog" if mean_dog > 0.5 else "cat") and int(row["frames"]) == 3
        assert float(row["probability"]) == pytest.approx(max(mean_dog, 1 - mean_dog), abs=2e-6)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    right = sum(row["correct"] == "1" for row in clips)
    assert metrics["clips"]["clips"] == 6 and metrics["clips"]["top1"] == pytest.approx(right / 6)
    assert len(metrics["clips"]["answered_wrong"]) == 6 - right
    assert "<h2>Per clip</h2>" in (tmp_path / "report" / "report.html").read_text()


def test_train_and_eval_given_clips_say_to_unpack_them(tmp_path, capsys):
    """Class folders of video clips given where images are wanted: the one-line error says how to make them
    images, rather than only that there are none."""
    for name, level in (("dark", 40), ("light", 200)):
        clip(tmp_path / "clips" / name / "a.mp4", level, seconds=0.4)
    with pytest.raises(DatasetError, match=r"clips: no images .* found; its class folders hold video clips: "
                                           r"`residual unpack .*clips FRAMES` writes their frames"):
        open_dataset(tmp_path / "clips")
    assert main(["train", str(tmp_path / "clips"), "--epochs", "1"]) == 2
    assert "`residual unpack" in capsys.readouterr().err

