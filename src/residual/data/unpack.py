"""Datasets stored as Hugging Face stores them (Parquet or Arrow files) or as WebDataset shards, unpacked
into an image folder.

A Hub dataset downloaded with `huggingface-cli download NAME --repo-type dataset` is a folder of Parquet
files, `data/train-00000-of-00004.parquet` (or `default/train/0000.parquet` on the Hub's converted
branch); one kept by the `datasets` library is Arrow files (`Dataset.save_to_disk`'s
`train/data-00000-of-00001.arrow`, or its cache's `beans-train.arrow`); timm's ImageNet copies on the Hub
are WebDataset shards (`imagenet1k-train-0000.tar`, or gzipped as .tar.gz: n01440764_10026.jpg beside
n01440764_10026.cls, its class index; `class_names` names the indices). Each row holds an image (its
encoded bytes, or the path of a file) and its label. `unpack_dataset` writes them as the folder of class
folders every command reads, `OUT/{train,val,test}/<class>/<image>`, so training, the reports, Grad-CAM and
check-data work on the same files a user can open and look at.

- The images' bytes are written as they are (no decoding and encoding again: nothing is lost, and it runs
  at disk speed); the extension is the one of the format Pillow finds in them. A row that holds only a
  path (`datasets` keeps images it loaded from local files that way) is read from that file, absolute or
  relative to the dataset file's folder.
- The label column is the one the file's `huggingface` metadata declares a ClassLabel (its names become
  the class folders; with several, as CIFAR-100's fine_label and coarse_label, `label_column` picks one);
  for files written without it, the one (or the list of them) the dataset card (README.md) declares;
  else a column named as a CSV's label column, whose values are the class names.
- A file's split is the last word of its name before any shard numbers (`train-00000-of-00004`,
  `beans-train`), else its first word, else the last word of its folder's name (`train/`,
  `partial-train/`): train; validation, valid, val or dev; test. Files naming another split (SVHN's
  extra, STL-10's unlabeled) are left out and named, unless `splits` says what they become
  ({"extra": "train"}; it can also skip a split or rename one); a dataset whose files name no split at
  all is one pool of training images, of which `residual train` holds out val itself.
- A label column listing several classes per image (a list of ClassLabels, or of names) is multi-label:
  the images go to OUT/images/<split>/, and OUT/labels.csv lists each with its split and a 1/0 column per
  class, which OUT/dataset.yaml describes (`residual train OUT/dataset.yaml`; an image may have none).
- Rows without a label (None, or -1 as the Hub writes a test split's hidden labels) go to
  OUT/unlabelled/<split>/, for `residual predict`. Rows whose bytes are not an image (or one over
  read_image's pixel limit) are skipped and reported with their file and row.
- OUT appears whole or not at all: the images are written into a hidden folder beside it, renamed to OUT
  when the last one is in. What an unpack into OUT that was killed left behind is removed by the next one.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import secrets
import shutil
import socket
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from PIL import Image

from ..errors import ConfigError, ResidualError
from ..progress import progress_bar
from .datasets import CSV_IMAGE_COLUMNS, CSV_LABEL_COLUMNS, CSV_MULTI_LABEL_COLUMNS, VAL_NAMES
from .decode import is_image_file

# The split words of file names, beside the ones a CSV's split column or a folder may use (VAL_NAMES).
SPLIT_NAMES = {"train": "train", "training": "train", **dict.fromkeys(VAL_NAMES + ("dev",), "val"), "test": "test",
               "testing": "test"}
SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # OUT/unlabelled/<split>/: rows whose label is missing
MULTI_LABEL_IMAGES, MULTI_LABEL_CSV, MULTI_LABEL_DATASET = "images", "labels.csv", "dataset.yaml"
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
              "TIFF": ".tif", "AVIF": ".avif", "PPM": ".ppm"}
REPORTED_SKIPS = 20  # rows named one by one; the rest are counted
DATASET_FILE = re.compile(r"\.(parquet|arrow|tar|tar\.gz|tgz)$", re.IGNORECASE)  # shards may be gzipped
WEBDATASET_LABELS = ("cls", "json")  # a sample's label: an index in .cls, or the "label" of its .json
GZIP_MAGIC = b"\x1f\x8b"
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # EOFError: a gzipped shard cut short
MAX_MEMBER_BYTES = 2**30  # a shard's file larger than this is no image (read_image's pixel limit is 179 MP)


class UnpackError(ResidualError):
    """Dataset files that cannot be unpacked as they are; the message says what to change."""


@dataclass
class UnpackResult:
    out: Path
    classes: list[str]
    data: Path  # what to train on: out, or a multi-label dataset's out/dataset.yaml
    multi_label: bool = False
    images: Counter = field(default_factory=Counter)  # split -> labelled images
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> images per class (its folder's name)
    unlabelled: Counter = field(default_factory=Counter)  # split -> rows without a label
    skipped: list[str] = field(default_factory=list)  # "FILE row N: why", the first REPORTED_SKIPS
    skipped_count: int = 0
    left_out: list[tuple[Path, str]] = field(default_factory=list)  # files not unpacked, and their split's word
    label_column: str = ""
    other_label_columns: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # what stopped unpacks into out left behind, removed
    clips: Counter = field(default_factory=Counter)  # split -> video clips whose frames were written (data.clips)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError("residual unpack: Parquet and Arrow files are read by pyarrow, which is not installed: "
                          "pip install pyarrow (or residual[parquet])") from None
    return pyarrow


def file_kind(path: Path) -> str | None:
    """What a dataset file is by its name: parquet, arrow, shard (a WebDataset tar, gzipped or not), or None."""
    found = DATASET_FILE.search(path.name)
    return None if found is None else {"parquet": "parquet", "arrow": "arrow"}.get(found[1].lower(), "shard")


def dataset_files(source: Path) -> list[Path]:
    """The .parquet, .arrow and .tar(.gz) files of `source` (a file, or a folder searched through), in name
    order."""
    if source.is_file() and file_kind(source):
        return [source]
    if source.is_file():
        raise UnpackError(f"{source}: not a .parquet, .arrow or .tar(.gz) file; residual train reads a CSV or a "
                          f"folder of images itself")
    if not source.is_dir():
        raise UnpackError(f"{source}: no such file or folder; give a .parquet, .arrow or .tar(.gz) file or the "
                          f"folder a dataset was downloaded or saved to")
    files = sorted(path for path in source.rglob("*") if file_kind(path) and path.is_file() and
                   not any(part.startswith(".") for part in path.relative_to(source).parts))
    if not files:
        raise UnpackError(f"{source}: no .parquet, .arrow or .tar(.gz) files in it")
    return files


def split_word(path: Path, names: dict[str, str]) -> str:
    """The word that names a file's split: the last word of its name before any shard numbers
    (train-00000-of-00004, beans-train), its first word (train_data) or the last word of its folder's name
    (train/, or partial-train/ on the Hub's converted branch), whichever is one of `names` first, else the
    first word of its name (another split's name, or none)."""
    stem = DATASET_FILE.sub("", path.name.lower())
    words = re.split(r"[-_.]", re.sub(r"[-_]\d+(-of-\d+)?$", "", stem))
    for word in (words[-1], words[0], re.split(r"[-_.]", path.parent.name.lower())[-1]):
        if word in names:
            return word
    return words[0]


def _split_names(overrides: dict[str, str] | None) -> dict[str, str]:
    """Split words and what they become (train, val, test, or skip), with the `--split WORD=SPLIT` given."""
    names = dict(SPLIT_NAMES)
    for word, split in (overrides or {}).items():
        if split not in SPLITS + ("skip",):
            raise ConfigError(f"--split {word}={split}: a split becomes train, val, test or skip")
        names[word.lower()] = split
    return names


class _TableFile:
    """One Parquet or Arrow file of a dataset: its schema, its rows, and its columns read a part at a time
    (a Parquet row group, an Arrow record batch: what the writer made them, 100 images or 100 MB)."""

    def __init__(self, pa, path: Path):
        self.pa, self.path = pa, path
        self.split = ""  # set once every file's split is known
        self.columns: _Columns | None = None  # set once the file is known to be read
        self.row_word = "row"
        try:
            if file_kind(path) == "parquet":
                self.parquet = pa.parquet.ParquetFile(path)
                self.schema, self.count = self.parquet.schema_arrow, self.parquet.metadata.num_rows
            else:
                self.parquet = None
                with self._arrow_reader() as reader:
                    self.schema = reader.schema
                    # memory-mapped: the batches' headers are read, not their data
                    self.count = sum(batch.num_rows for batch in self._batches(reader))
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise UnpackError(self._unreadable(error)) from None

    @staticmethod
    def _batches(reader):
        """An Arrow reader's record batches: a stream reader yields them, a file reader is indexed."""
        if hasattr(reader, "num_record_batches"):
            return (reader.get_batch(index) for index in range(reader.num_record_batches))
        return reader

    def _arrow_reader(self):
        source = self.pa.memory_map(str(self.path))
        try:  # datasets writes Arrow's stream format; other writers its file format
            return self.pa.ipc.open_stream(source)
        except self.pa.ArrowInvalid:
            return self.pa.ipc.open_file(source)

    def _unreadable(self, error: Exception) -> str:
        with open(self.path, "rb") as stream:
            start = stream.read(64)
        if start.startswith(b"version https://git-lfs"):
            return (f"{self.path}: a Git LFS pointer, not the file itself; fetch the files (git lfs pull, or "
                    f"huggingface-cli download NAME --repo-type dataset)")
        kind = "Parquet" if file_kind(self.path) == "parquet" else "Arrow"
        return f"{self.path}: not readable as {kind}, or cut short ({str(error).splitlines()[0]}); download it again"

    @property
    def fields(self) -> list[str]:
        return self.schema.names

    def rows(self):
        """(image cell, label) of each row, in order."""
        found = self.columns
        for part in self.parts([found.image] if found.label is None else [found.image, found.label]):
            labels = [None] * part.num_rows if found.label is None else part.column(found.label).to_pylist()
            yield from zip(part.column(found.image).to_pylist(), labels)

    def parts(self, columns: list[str]):
        """The file's rows a part at a time, as tables of `columns`."""
        part, unit = 0, "row group" if self.parquet is not None else "record batch"
        try:
            if self.parquet is not None:
                # Not iter_batches: it read ahead, holding 300 MB of 145 KB JPEGs after three batches.
                for part in range(self.parquet.num_row_groups):
                    yield self.parquet.read_row_group(part, columns=columns)
            else:
                with self._arrow_reader() as reader:
                    for part, batch in enumerate(self._batches(reader)):
                        yield batch.select(columns)
        except (OSError, ValueError) as error:
            raise UnpackError(f"{self.path}: {unit} {part} cannot be read ({str(error).splitlines()[0]}); download "
                              f"the file again") from None


class _ShardFile:
    """One WebDataset shard, as timm's ImageNet shards (imagenet1k-train-0000.tar; gzipped or not): a tar
    whose files are grouped into samples by their name up to its first dot (n01440764_10026.jpg,
    n01440764_10026.cls); a sample's image is its file with an image extension, its label the index in its
    .cls or the "label" of its .json. Read a file at a time; nothing is extracted by the tar's own paths."""

    def __init__(self, path: Path, class_names: list[str] | None):
        self.path, self.split, self.row_word = path, "", "sample"
        try:
            # Gzipped or not by its first bytes, whatever its name: an error is then one line (tarfile's "r:*"
            # lists one per compression it tried).
            with open(path, "rb") as stream:
                self.mode = "r:gz" if stream.read(2) == GZIP_MAGIC else "r:"
            with tarfile.open(path, self.mode) as archive:
                parts = [_sample_part(member.name) for member in archive.getmembers() if member.isfile()]
        except READ_ERRORS as error:
            raise UnpackError(f"{path}: not readable as a tar file, or cut short ({error}); download it "
                              f"again") from None
        self.count = len({key for key, _ in parts})
        self.fields = sorted({extension for _, extension in parts})
        label = next((extension for extension in WEBDATASET_LABELS if extension in self.fields), None)
        self.columns = _Columns("image", label and f".{label} files", class_names, [], False)

    def rows(self):
        """(image cell, label) of each sample, in the tar's order."""
        key, image, label = None, None, None
        try:
            with tarfile.open(self.path, self.mode) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, extension = _sample_part(member.name)
                    if member_key != key:
                        if key is not None:
                            yield image, label
                        key, image, label = member_key, None, None
                    kind = extension.rsplit(".", 1)[-1]
                    if kind not in WEBDATASET_LABELS and not is_image_file(member.name):
                        continue  # a caption, features ...: not read
                    if member.size > MAX_MEMBER_BYTES:  # read whole into memory: no image is this large
                        raise UnpackError(f"{self.path}: {member.name} is {member.size / 2**30:.1f} GiB, larger "
                                          f"than any image; this is not a WebDataset shard of images")
                    data = archive.extractfile(member).read()
                    if kind == "cls":
                        label = _index_or_text(data)
                    elif kind == "json":
                        label = _json_label(data)
                    else:
                        image = {"bytes": data, "path": member.name}
        except READ_ERRORS as error:
            raise UnpackError(f"{self.path}: cannot be read past sample {key} ({error}); download it again") from None
        if key is not None:
            yield image, label


def _sample_part(name: str) -> tuple[str, str]:
    """A WebDataset file's sample key (its path up to the first dot of its name) and its extension."""
    folder, _, file = name.rpartition("/")
    stem, _, extension = file.partition(".")
    return f"{folder}/{stem}" if folder else stem, extension.lower()


def _index_or_text(data: bytes):
    text = data.decode("utf-8", errors="replace").strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _json_label(data: bytes):
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record.get("label") if isinstance(record, dict) else None


@dataclass(frozen=True)
class _Columns:
    image: str
    label: str | None  # None: the file has no labels
    names: list[str] | None  # a ClassLabel's names (the label column holds indices into them); None: values
    others: list[str]  # other ClassLabel columns the label could have come from
    multi_label: bool  # the label column lists an image's classes


def _features(schema) -> dict:
    metadata = schema.metadata or {}
    try:
        return json.loads(metadata[b"huggingface"])["info"]["features"] if b"huggingface" in metadata else {}
    except (ValueError, KeyError, TypeError):
        return {}


def card_features(source: Path) -> dict:
    """The Image and ClassLabel columns a Hub dataset card declares (the YAML header of README.md in the
    dataset's folder or the one above: `dataset_info: features: [{name: label, dtype: {class_label: {names:
    {'0': cat, ...}}}}]`), as the files' own metadata declares them, for files written without it (pandas'
    to_parquet). A column the card's configurations declare differently is left out: which one is meant is
    not known."""
    base = source if source.is_dir() else source.parent
    readme = next((folder / "README.md" for folder in (base, base.parent) if (folder / "README.md").is_file()), None)
    if readme is None:
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    header = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    try:
        card = yaml.safe_load(header[1]) if header else None
    except yaml.YAMLError:
        return {}
    infos = card.get("dataset_info") if isinstance(card, dict) else None
    declared: dict[str, list] = {}
    for info in infos if isinstance(infos, list) else [infos]:
        for feature in (info.get("features") or []) if isinstance(info, dict) else []:
            parsed = _card_feature(feature) if isinstance(feature, dict) else None
            if parsed is not None:
                declared.setdefault(str(feature.get("name")), []).append(parsed)
    return {name: found[0] for name, found in declared.items() if all(item == found[0] for item in found)}


def _card_feature(feature: dict) -> dict | None:
    """A card's feature as the files' metadata writes it: an Image, a ClassLabel with its names in order, or a
    list of ClassLabels (multi-label: `list: {class_label: ...}`, also `large_list:`, and `sequence:` before
    datasets 4)."""
    listed = next((feature[key] for key in ("list", "large_list", "sequence") if key in feature), None)
    if isinstance(listed, dict):
        labels = _card_dtype(listed)
        return {"_type": "List", "feature": labels} if labels and labels["_type"] == "ClassLabel" else None
    return _card_dtype(feature.get("dtype"))


def _card_dtype(dtype) -> dict | None:
    if dtype == "image":
        return {"_type": "Image"}
    names = dtype.get("class_label", {}).get("names") if isinstance(dtype, dict) and \
        isinstance(dtype.get("class_label"), dict) else None
    if isinstance(names, dict) and all(re.fullmatch(r"\d+", str(key)) for key in names):
        return {"_type": "ClassLabel", "names": [str(names[key]) for key in sorted(names, key=lambda k: int(k))]}
    if isinstance(names, list):
        return {"_type": "ClassLabel", "names": [str(name) for name in names]}
    return None


def _is_list_of_labels(feature) -> bool:
    return isinstance(feature, dict) and feature.get("_type") in ("Sequence", "List", "LargeList") and \
        isinstance(feature.get("feature"), dict) and feature["feature"].get("_type") == "ClassLabel"


def _columns(path: Path, schema, image_column: str | None, label_column: str | None, card: dict) -> _Columns:
    features = _features(schema) or {name: feature for name, feature in card.items() if name in schema.names}
    names = schema.names
    lowered = {name.lower(): name for name in names}

    def pick(asked: str | None, typed: list[str], standard: tuple[str, ...]) -> str | None:
        if asked is not None:
            return asked if asked in names else None
        found = next((name for name in typed if name.lower() in standard), None) or (typed[0] if typed else None)
        return found or next((lowered[name] for name in standard if name in lowered), None)

    images = [name for name, feature in features.items() if isinstance(feature, dict) and
              feature.get("_type") == "Image"]
    image = pick(image_column, images, CSV_IMAGE_COLUMNS + ("img",))
    if image is None:
        raise UnpackError(f"--image-column {image_column}: {path} has no such column (it has {', '.join(names)})"
                           if image_column else f"{path}: no image column found among {', '.join(names)}; name it "
                           f"with --image-column")
    class_labels = [name for name, feature in features.items() if isinstance(feature, dict) and
                    feature.get("_type") == "ClassLabel"]
    multi = [name for name, feature in features.items() if _is_list_of_labels(feature)]
    label = pick(label_column, class_labels + multi, CSV_LABEL_COLUMNS + CSV_MULTI_LABEL_COLUMNS)
    if label is None:  # a split without labels (a competition's test set): its images are unlabelled
        return _Columns(image, None, None, [], False)
    multi_label = label in multi or "list" in str(schema.field(label).type)  # beans' single label is `labels`
    feature = features.get(label)
    feature = feature.get("feature") if multi_label and isinstance(feature, dict) else feature
    class_names = [str(name) for name in feature["names"]] if isinstance(feature, dict) and \
        feature.get("_type") == "ClassLabel" else None
    if multi_label:
        clash = [name for name in class_names or () if name.lower() in ("image", "split")]
        if clash:
            raise UnpackError(f"{path}: a class of {label} is named {clash[0]}, as a column of {MULTI_LABEL_CSV}")
    folders = Counter(_folder_name(name) for name in class_names or ())
    if not multi_label and folders and max(folders.values()) > 1:
        raise UnpackError(f"{path}: classes of {label} would share a folder name ("
                           f"{', '.join(name for name, count in folders.items() if count > 1)})")
    return _Columns(image, label, class_names, [name for name in class_labels + multi if name != label],
                    multi_label)


def _folder_name(class_name: str) -> str:
    """A class name as a folder name: path separators become _, and a name hidden or empty as a folder gets
    a _ in front (a hidden folder would be skipped as a system file)."""
    name = class_name.replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
    return f"_{name}" if not name or name.startswith(".") else name


def _image_bytes(cell, folder: Path) -> tuple[bytes | None, str | None, str | None]:
    """A cell's encoded image, the file name it came with, and why there is no image: the Hub's {bytes, path}
    struct (a path alone names a file, absolute or relative to `folder`), or raw bytes."""
    data, original = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else \
        (cell, None) if isinstance(cell, (bytes, bytearray)) else (None, None)
    if data or not original:
        return data, original, None if data else "no image in it"
    file = Path(original) if Path(original).is_absolute() else folder / original
    try:
        return file.read_bytes(), original, None
    except OSError as error:
        return None, original, f"no image bytes in it, and its path {original} cannot be read ({error.strerror})"


def _extension(data: bytes) -> str:
    """The extension of the format Pillow reads `data` as (the header only); ValueError if none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, as read_image refuses it
            with Image.open(io.BytesIO(data)) as image:
                kind = image.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"not an image Pillow can read ({type(error).__name__})") from None
    if kind not in EXTENSIONS:
        raise ValueError(f"a {kind} image, which residual does not read")
    return EXTENSIONS[kind]


def _file_name(row: int, original: str | None, extension: str) -> str:
    """The image's own name where it came with one (its extension set by its real format), else its row."""
    stem = Path(original.replace("\\", "/")).stem if original else ""
    stem = re.sub(r"[^\w.+=@,-]", "_", stem).lstrip(".")
    return f"{stem or f'{row:07d}'}{extension}"


def unpack_dataset(source: str | Path, out: str | Path, image_column: str | None = None,
                   label_column: str | None = None, splits: dict[str, str] | None = None,
                   class_names: list[str] | None = None, progress: bool = True) -> UnpackResult:
    """Write the images of the dataset at `source` (a Parquet, Arrow or WebDataset .tar(.gz) file, or a folder
    of them) to the image folder `out` (which must not exist yet, or be empty), each split's into
    out/<split>/<class>/. `splits`: what files of a split word become (train, val, test or skip), as
    {"extra": "train"} for SVHN. `class_names`: the names of integer labels whose files name none (a
    WebDataset's .cls indices; the ImageNet names for timm's ImageNet shards)."""
    names = _split_names(splits)
    source, out = Path(source), Path(out)
    check_new_folder(out)
    files = dataset_files(source)
    words = {path: split_word(path, names) for path in files}
    split = {path: names.get(word, "") for path, word in words.items()}
    if not any(word in names for word in words.values()):  # no file names a split: one pool, as a folder
        split = dict.fromkeys(files, "train")  # of class folders is (residual train holds out val itself)
    kept = [path for path in files if split[path] in SPLITS]
    if not kept:
        raise UnpackError(f"{source}: every file's split is left out ({', '.join(sorted(set(words.values())))}); "
                          f"--split WORD=train takes one in")
    shards = {path for path in kept if file_kind(path) == "shard"}
    pa = _pyarrow() if len(shards) < len(kept) else None  # WebDataset shards need no pyarrow
    tables = [_ShardFile(path, class_names) if path in shards else _TableFile(pa, path) for path in kept]
    card = card_features(source)
    for table in tables:
        table.split = split[table.path]
        if isinstance(table, _TableFile):
            table.columns = _columns(table.path, table.schema, image_column, label_column, card)
            if class_names is not None and table.columns.names is None and table.columns.label is not None:
                table.columns = replace(table.columns, names=list(class_names))
    labelled = [table for table in tables if table.columns.label is not None]
    if not labelled:
        fields = ", ".join(tables[0].fields)
        raise UnpackError(f"--label-column {label_column}: no file of {source} has such a column (the first has "
                          f"{fields})" if label_column else f"{source}: no label column found (the first file has "
                          f"{fields}); name it with --label-column")
    first = labelled[0].columns
    for table in labelled:
        if (table.columns.label, table.columns.names) != (first.label, first.names):
            raise UnpackError(f"{table.path}: its labels ({table.columns.label}) differ from {labelled[0].path}'s "
                              f"({first.label}); unpack the files of one dataset together")
    result = UnpackResult(out, [], out / MULTI_LABEL_DATASET if first.multi_label else out, first.multi_label,
                          label_column=first.label, other_label_columns=first.others,
                          left_out=[(path, words[path]) for path in files if split[path] not in SPLITS])
    with staged_folder(out, result) as staging:
        listing = _write_images(tables, staging, result, progress)
        if not result.images:
            raise UnpackError(f"{source}: no labelled images in it" + (f" ({result.skipped[0]})"
                                                                         if result.skipped else ""))
        if first.multi_label:
            _write_listing(listing, first.names, staging)
    seen = {name for counts in result.counts.values() for name in counts}
    result.classes = _listed_classes(first.names, seen) if first.multi_label else sorted(seen)  # residual's order
    return result


def check_new_folder(out: Path) -> None:
    """An unpack writes a new folder, or into an empty one, never over what is there."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnpackError(f"{out}: already exists; give a new folder to unpack into")


@contextlib.contextmanager
def staged_folder(out: Path, result: UnpackResult) -> Iterator[Path]:
    """A hidden folder beside `out` to write into, renamed to `out` when the block ends well and removed when it
    does not: `out` appears whole or not at all. What stopped unpacks into `out` left behind is removed first,
    and named in `result.removed`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result.removed = _remove_stopped_unpacks(out)
    # mkdir: the folder gets the umask's mode. Host and process name it, so a later unpack knows it is stale.
    staging = out.parent / f".{out.name}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        staging.mkdir()
    except OSError as error:  # named as the folder asked for: the hidden one is ours
        raise OSError(error.errno, error.strerror, str(out)) from None
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty, as checked: the rename below replaces it whole
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_stopped_unpacks(out: Path) -> list[Path]:
    """Remove the hidden folders that unpacks into `out` by processes of this host that no longer run left
    behind (killed, or the machine stopped), and name them: ImageNet's would hold 140 GB."""
    host, removed = socket.gethostname(), []
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        made_by = re.fullmatch(rf"\.{re.escape(out.name)}\.(.+)-(\d+)-[0-9a-f]{{8}}\.partial", folder.name)
        if made_by and made_by[1] == host and not _running(int(made_by[2])):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _listed_classes(names: list[str] | None, seen: set[str]) -> list[str]:
    """A multi-label dataset's classes: its ClassLabel's, in their order, or the names its rows list."""
    return list(names) if names is not None else sorted(seen)


def _write_listing(listing: list[tuple[str, str, set[str]]], names: list[str] | None, staging: Path) -> None:
    """labels.csv (image, split, a 1/0 column per class) and the dataset.yaml that says how to read it."""
    classes = _listed_classes(names, {name for _, _, labels in listing for name in labels})
    with open(staging / MULTI_LABEL_CSV, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "split", *classes])
        writer.writerows([image, split, *(int(name in labels) for name in classes)] for image, split, labels in listing)
    (staging / MULTI_LABEL_DATASET).write_text(yaml.safe_dump({"csv": MULTI_LABEL_CSV, "label_columns": "*"}))


def _write_images(tables: list[_TableFile | _ShardFile], staging: Path, result: UnpackResult,
                  progress: bool) -> list[tuple[str, str, set[str]]]:
    """Write every row's image; a multi-label dataset's listing of them (image path, split, classes)."""
    listing: list[tuple[str, str, set[str]]] = []
    rows_seen: Counter = Counter()  # per split: the running row number names images that came without a name
    with progress_bar("unpacking", enabled=progress, unit="img/s") as bar:
        task = bar.add_task("unpack", total=sum(table.count for table in tables))
        for table in tables:
            for row_in_file, (cell, label) in enumerate(table.rows()):
                rows_seen[table.split] += 1
                reason = _write_row(cell, label, table, rows_seen[table.split], staging, result, listing)
                if reason is not None:
                    result.skipped_count += 1
                    if len(result.skipped) < REPORTED_SKIPS:
                        result.skipped.append(f"{table.path} {table.row_word} {row_in_file}: {reason}")
                bar.advance(task)
    return listing


def _class_names(label, found: _Columns) -> list[str] | None:
    """The classes a label cell gives an image (None: it has no label); ValueError for an index out of range."""
    if label is None or (found.names is not None and label == -1):
        return None
    names = []
    for value in label if found.multi_label else [label]:
        if found.names is not None and not (isinstance(value, int) and 0 <= value < len(found.names)):
            raise ValueError(f"label {value!r} is not one of the {len(found.names)} classes' indices")
        names.append(found.names[value] if found.names is not None else str(value))
    return names


def _write_row(cell, label, table: _TableFile | _ShardFile, number: int, staging: Path, result: UnpackResult,
               listing: list) -> str | None:
    """Write one row's image where its split and label say; the reason it was skipped, or None."""
    found, split = table.columns, table.split
    data, original, missing = _image_bytes(cell, table.path.parent)
    if missing:
        return missing
    try:
        extension = _extension(data)
        names = _class_names(label, found)
    except ValueError as error:
        return str(error)
    if names is None:
        folder = staging / UNLABELLED / split
    else:
        folder = staging / MULTI_LABEL_IMAGES / split if found.multi_label else staging / split / _folder_name(names[0])
    target = folder / _file_name(number, original, extension)
    folder.mkdir(parents=True, exist_ok=True)
    if target.exists():  # two images of one name in a folder: the row number tells them apart
        target = folder / f"{number:07d}-{target.name}"
    target.write_bytes(data)
    if names is None:
        result.unlabelled[split] += 1
        return None
    if found.multi_label:
        listing.append((target.relative_to(staging).as_posix(), split, set(names)))
    result.images[split] += 1
    counts = result.counts.setdefault(split, Counter())
    for name in names if found.multi_label else [_folder_name(names[0])]:
        counts[name] += 1
    return None
