"""Class folders of video clips unpacked into class folders of their frames, split by clip.

`residual unpack clips/ OUT --fps 1` reads clips/<class>/*.mp4 (or clips/{train,val,test}/<class>/*.mp4) and
writes OUT/{train,val,test}/<class>/<clip>.t=SECONDS.jpg: the image folder every command reads, from footage
sorted by what it shows (a camera trap's clips by animal, a line's recordings by defect).

The frames of one clip are near copies of each other. Split one by one, validation would score frames whose
neighbours a moment apart were trained on, and promise an accuracy new footage never gets. So the split is by
clip: `val_split` of each class's clips (seeded; at least one of a class's two or more) go to val/ whole, and
a source's own val/ and test/ folders stay as they are.

- Frames: at most `fps` a second (data.frames: upright, each timed by its own timestamp), saved as JPEG at
  quality 95 (the video was compressed already), their shorter side shrunk to `frame_size` where given.
- A clip FFmpeg cannot open, damage within one, and a file in the class folders that is no video are reported
  (`result.skipped`); the rest is unpacked.
- OUT appears whole or not at all, as with every unpack (unpack.staged_folder).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from PIL import Image

from ..errors import ConfigError
from ..progress import progress_bar
from .datasets import DatasetError, open_class_folders
from .decode import BadImageError
from .frames import is_video_file, video_frames
from .unpack import REPORTED_SKIPS, UnpackError, UnpackResult, check_new_folder, staged_folder

CLIP_FPS = 1.0  # frames a second apart still differ; closer ones add disk more than they add new pictures
JPEG_QUALITY = 95
FRAME_NAME = re.compile(r"(.+)\.t=\d+\.\d{3}\.jpg")  # <clip>.t=SECONDS.jpg, as unpack_clips names frames


def clip_of(path: Path) -> str | None:
    """The clip an unpacked frame came from (its folder and clip name), or None for a file not named as one."""
    found = FRAME_NAME.fullmatch(Path(path).name)
    return None if found is None else str(Path(path).parent / found[1])


def is_clip_folder(source: Path) -> bool:
    """Whether `source` is a folder holding video files (and so, for unpack, class folders of clips)."""
    return source.is_dir() and any(is_video_file(path) for path in source.rglob("*"))


def unpack_clips(source: str | Path, out: str | Path, fps: float = CLIP_FPS, val_split: float | None = None,
                 seed: int = 0, frame_size: int | None = None, progress: bool = True) -> UnpackResult:
    """Write the frames of the clips in the class folders of `source` to the image folder `out` (new, or empty),
    at most `fps` a second, each clip's into the split it was given or drawn for whole."""
    source, out = Path(source), Path(out)
    if not fps > 0:
        raise ConfigError(f"--fps must be above 0, got {fps}")
    if frame_size is not None and frame_size < 1:
        raise ConfigError(f"--frame-size must be at least 1 pixel, got {frame_size}")
    check_new_folder(out)
    try:
        clips = open_class_folders(source, val_split, seed, is_video_file, "video clips (.mp4, .mov, .mkv ...)")
    except DatasetError as error:
        raise UnpackError(str(error)) from None
    splits = {name: split for name, split in (("train", clips.train), ("val", clips.val), ("test", clips.test))
              if split is not None and len(split)}
    result = UnpackResult(out, [], out)
    for path in clips.ignored:  # named, never dropped unseen: an image among clips is not unpacked
        _skipped(result, f"{path}: not a video clip")
    with staged_folder(out, result) as staging, progress_bar("unpacking clips", progress, unit="clips/s") as bar:
        task = bar.add_task("clips", total=sum(len(split) for split in splits.values()))
        for name, split in splits.items():
            for clip, label in zip(split.files, split.labels):
                class_name = clips.classes[label]
                folder = staging / name / class_name
                written = _write_frames(clip, folder, _frame_name(clip, source), fps, frame_size, result)
                if written:
                    result.clips[name] += 1
                    result.images[name] += written
                    result.counts.setdefault(name, Counter())[class_name] += written
                bar.advance(task)
        if not result.images:
            raise UnpackError(f"{source}: no frame could be read from any clip" +
                              (f" ({result.skipped[0]})" if result.skipped else ""))
    result.classes = sorted({name for counts in result.counts.values() for name in counts})
    return result


def _frame_name(clip: Path, source: Path) -> str:
    """A clip's frames are named after it: its file name, with the folders between its class folder and it
    (`day2-clip.mp4`), so two clips of one name in a class stay apart."""
    below_classes = 2 if (source / "train").is_dir() else 1  # SOURCE/train/<class>/..., or SOURCE/<class>/...
    return "-".join(clip.relative_to(source).parts[below_classes:])


def _write_frames(clip: Path, folder: Path, name: str, fps: float, frame_size: int | None,
                  result: UnpackResult) -> int:
    """Save `clip`'s frames in `folder` as NAME.t=SECONDS.jpg; how many. What cannot be read goes to skipped."""
    failed: list[str] = []
    written = 0
    try:
        for frame in video_frames(clip, fps, failed):
            image = frame.image
            if frame_size is not None and min(image.size) > frame_size:
                scale = frame_size / min(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.LANCZOS, reducing_gap=3.0)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{name}.t={frame.time:.3f}.jpg", quality=JPEG_QUALITY)
            written += 1
    except BadImageError as error:
        failed.append(str(error))
    for line in failed:
        _skipped(result, line)
    return written


def _skipped(result: UnpackResult, line: str) -> None:
    """Count what was not unpacked, and name the first REPORTED_SKIPS."""
    result.skipped_count += 1
    if len(result.skipped) < REPORTED_SKIPS:
        result.skipped.append(line)
