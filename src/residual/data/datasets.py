"""Finding the images of a dataset and its splits: ImageFolder, a CSV of labels, and CIFAR-10/100.

- ImageFolder: DIR/{train,val,test}/<class>/*.jpg, or DIR/<class>/*.jpg split into
  train/val by a seeded, stratified split. Files without an image extension are
  listed as ignored (reported, never silently dropped).
- A CSV file with a header naming an image column (image, file, filename, filepath or
  path: relative to the CSV's folder, or absolute), a label column (label, class,
  category or target) and, optionally, a split column (train, val, test); without one,
  val is a seeded, stratified share as for a folder of class folders.
- Multi-label: a CSV whose label column is named labels or tags lists any number of labels per
  image, separated by spaces (Kaggle's Planet: `image_name,tags` with "clear primary water"); a
  row may list none. Its val share is seeded but not stratified (an image has several labels).
- A dataset file (.yaml) naming a CSV of another layout: its columns, the folder its image
  names are relative to, a suffix they lack (Kaggle's id,breed with train/<id>.jpg), and for
  multi-label data the separator between labels (label_separator), or a column per class holding
  1 or 0 (-1, as CelebA's attributes, counts as 0): label_columns, a list or "*" for every
  column but the image and split ones.
- CIFAR-10/100 in the python-pickle layout of cifar-{10,100}-python.tar.gz. Those
  files are pickles, so they are read with an unpickler that admits only NumPy
  arrays and plain containers: a tampered file cannot run code.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from ..errors import ResidualError
from .decode import files_under, image_files, is_image_file, is_metadata
from .frames import is_video_file

VAL_NAMES = ("val", "valid", "validation")
# The header names a CSV's columns may have (in any case): the first of each list found is used.
CSV_IMAGE_COLUMNS = ("image", "file", "filename", "filepath", "path")
CSV_LABEL_COLUMNS = ("label", "class", "category", "target")
CSV_MULTI_LABEL_COLUMNS = ("labels", "tags")  # any number of labels per image, separated by spaces
DEFAULT_VAL_SPLIT = 0.1  # held out per class when the data has no val/ folder


class DatasetError(ResidualError):
    """A dataset folder that cannot be used as it is; the message says what to change."""


@dataclass(frozen=True)
class CsvLayout:
    """Where a CSV's images and labels are. A CSV alone has the default: the standard column names
    (None), image names relative to its folder, as they are. A dataset file describes another."""

    csv: Path
    image_column: str | None = None
    label_column: str | None = None
    split_column: str | None = None
    images: Path | None = None  # the folder image names are relative to (None: the CSV's)
    suffix: str = ""  # appended to every image name, e.g. .jpg for ids without an extension
    label_separator: str | None = None  # multi-label: what separates an image's labels (" ": any whitespace)
    label_columns: tuple[str, ...] | str | None = None  # multi-label: a 1/0 column per class, or "*": all others
    described_in: Path | None = None  # the dataset file, named in errors about what it says

    @property
    def folder(self) -> Path:
        return self.csv.parent if self.images is None else self.images


class ListedImage(type(Path())):
    """An image file a CSV lists, with the cell that names it (`listed_as`) and the listing's image and label
    columns: predictions name the image as its listing does (a Kaggle test set's ids), not by the path.

    A Path, so every reader takes it as it takes a file. Its attributes are set by `listed_image` (pathlib's
    classes take no extra constructor arguments before Python 3.12); a path derived from it (its parent, say)
    keeps the class but not them."""

    listed_as: str | None = None
    image_column: str = "image"
    label_column: str | None = None


def listed_image(path: Path, cell: str, image_column: str, label_column: str | None) -> ListedImage:
    image = ListedImage(path)
    image.listed_as, image.image_column, image.label_column = cell, image_column, label_column
    return image


DATASET_FILE_KEYS = ("csv", "image_column", "label_column", "split_column", "images", "suffix", "label_separator",
                     "label_columns")
# A label column's cells (label_columns), in any case: these mean the image has the class; those, that it has not.
PRESENT_CELLS = ("1", "true", "yes", "y")
ABSENT_CELLS = ("0", "-1", "false", "no", "n", "")
DATASET_FILE_SUFFIXES = (".yaml", ".yml")


def read_dataset_file(path: Path) -> CsvLayout:
    """A dataset file: YAML naming a CSV (relative to the file) and how to read it, e.g.
    `csv: labels.csv`, `image_column: id`, `label_column: breed`, `images: train`, `suffix: .jpg`;
    `label_separator: " "` makes it multi-label (each cell lists an image's labels), as does
    `label_columns: [smiling, eyeglasses]` or `label_columns: "*"` (a 1/0 column per class)."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file; give a dataset file (.yaml), a CSV or a folder") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0]
        raise DatasetError(f"{path}: cannot be read as a YAML dataset file ({reason})") from None
    if not isinstance(spec, dict) or "csv" not in spec:
        raise DatasetError(f"{path}: a dataset file needs a csv: key naming the CSV (relative to the file), and "
                           f"may say {', '.join(DATASET_FILE_KEYS[1:])}")
    unknown = sorted(str(key) for key in spec if key not in DATASET_FILE_KEYS)
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {', '.join(unknown)}; a dataset file may say "
                           f"{', '.join(DATASET_FILE_KEYS)}")
    columns = spec.pop("label_columns", None)
    if columns is not None and columns != "*" and not (
            isinstance(columns, list) and columns and all(isinstance(c, str) and c.strip() for c in columns)):
        raise DatasetError(f"{path}: label_columns must list the class columns ([smiling, eyeglasses]) or be \"*\" "
                           f"for every column but the image and split ones, got {columns!r}")
    if columns is not None and ("label_column" in spec or "label_separator" in spec):
        raise DatasetError(f"{path}: label_columns names a column per class; drop label_column and label_separator, "
                           f"which are for one column listing the labels")
    # A separator may be a space, which is not blank here.
    not_text = [key for key, value in spec.items()
                if not isinstance(value, str) or not (value if key == "label_separator" else value.strip())]
    if not_text:
        raise DatasetError(f"{path}: {not_text[0]} must be a name (text), got {spec[not_text[0]]!r}")
    folder = path.parent
    return CsvLayout(folder / spec["csv"], spec.get("image_column"), spec.get("label_column"),
                     spec.get("split_column"), folder / spec["images"] if "images" in spec else None,
                     spec.get("suffix", ""), spec.get("label_separator"),
                     columns if columns in (None, "*") else tuple(columns), described_in=path)


def _is_dataset_file(path: Path) -> bool:
    return path.suffix.lower() in DATASET_FILE_SUFFIXES


@dataclass
class Split:
    """One split: image files with labels, or images already in memory (CIFAR). A label is a class index,
    or in multi-label data a row of 0/1 per class (multi-hot)."""

    files: list[Path] = field(default_factory=list)
    labels: list[int] | list[list[int]] = field(default_factory=list)
    images: torch.Tensor | None = None  # uint8 N x 3 x H x W, for in-memory sources

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    root: Path  # the folder, the CSV file or the dataset file
    kind: str  # "imagefolder", "csv" or "cifar"
    classes: list[str]
    train: Split
    val: Split
    test: Split | None = None
    ignored: list[Path] = field(default_factory=list)  # files without an image extension
    flat: bool = False  # no split of its own: one pool of labelled images, of which val is a seeded share
    files_under: Path | None = None  # the folder the files' names are relative to (None: root)
    multi_label: bool = False  # each image has any number of the classes (labels are multi-hot rows)

    def class_counts(self, split: Split) -> list[int]:
        """Images of each class (in multi-label data: images that have the label)."""
        labels = np.asarray(split.labels, dtype=np.int64)
        if self.multi_label:
            return labels.reshape(-1, len(self.classes)).sum(0).tolist()
        return np.bincount(labels, minlength=len(self.classes)).tolist()

    def fingerprint(self, split: Split) -> str:
        """A digest of what `split` holds: its files (relative to the root, so the folder may move) and
        labels. A resumed run compares it with the one it started with."""
        # The files are root / ...: cutting the root off their names takes 1.8 s for ImageNet's 1.28M,
        # Path.relative_to 6.3 s.
        base = self.root if self.files_under is None else self.files_under
        cut = 0 if str(base) == "." else len(os.path.join(base, ""))
        names = "\n".join(str(path)[cut:] for path in split.files)
        digest = hashlib.sha256(names.encode())
        digest.update(np.asarray(split.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()


def open_dataset(root: str | Path, val_split: float | None = None, seed: int = 0) -> Dataset:
    """The dataset at `root`, whichever layout it has."""
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return _open_csv(root, CsvLayout(root), val_split, seed)
    if _is_dataset_file(root):
        return _open_csv(root, read_dataset_file(root), val_split, seed)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; give a folder of class folders, or of train/ val/ test/, "
                           f"a CSV file of image,label rows, or a dataset file (.yaml)")
    if (root / "batches.meta").is_file() or ((root / "meta").is_file() and (root / "train").is_file()):
        if val_split is not None:
            raise DatasetError(f"--val-split: {root} is CIFAR, whose test batch is the validation set (as in He et "
                               f"al.); drop --val-split")
        return _open_cifar(root)
    return open_class_folders(root, val_split, seed)


def data_name(data: str | Path) -> str:
    """A dataset's short name, for run folders: the folder's name, or the CSV's or dataset file's without
    its suffix."""
    path = Path(data).resolve()
    return path.stem if path.suffix.lower() == ".csv" or _is_dataset_file(path) else path.name


def sample_items(data: str | Path | Dataset, split: str, count: int, seed: int = 0) -> list:
    """Up to `count` images (a seeded random sample, in file order) of a dataset's `split`, for checks
    that need images but no labels; a folder of images that is not a dataset is sampled whole."""
    root = data.root if isinstance(data, Dataset) else Path(data)
    try:
        dataset = data if isinstance(data, Dataset) else open_dataset(root)
    except DatasetError:
        items = image_files([root]) if root.is_dir() else []
    else:
        chosen = getattr(dataset, split) or dataset.val
        items = chosen.files if chosen.images is None else list(chosen.images)
    if not items:
        raise DatasetError(f"{root}: no images found; give a dataset folder or a folder of images")
    if len(items) > count:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), count, replace=False))
        items = [items[i] for i in keep]
    return items


def _classes_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_metadata(Path(p.name)))


def _scan(folder: Path, classes: list[str], ignored: list[Path], wanted=is_image_file) -> Split:
    split = Split()
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in files_under(class_dir):
            if wanted(path) and not is_metadata(path.relative_to(class_dir)):
                split.files.append(path)
                split.labels.append(label)
            else:
                ignored.append(path)
    return split


def open_class_folders(root: Path, val_split: float | None, seed: int, wanted=is_image_file,
                       what: str = "images (extensions: .jpg .jfif .png .bmp .gif .tif .webp .avif ...)") -> Dataset:
    """Files of class folders, `root/<class>/` or `root/{train,val,test}/<class>/`, that are `wanted` (images;
    unpack's video clips), split as they are or, where there is no val/, `val_split` of each class's held out."""
    ignored: list[Path] = []
    if (root / "train").is_dir():
        classes = _classes_in(root / "train")
        train = _scan(root / "train", classes, ignored, wanted)
        val_dir = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
        test = _scan(root / "test", classes, ignored, wanted) if (root / "test").is_dir() else None
        if val_dir is not None:
            if val_split is not None:  # val/ would be left unused
                raise DatasetError(f"--val-split: {val_dir} is the validation set; drop --val-split (it splits a "
                                   f"folder that has no val/)")
            extra = sorted(set(_classes_in(val_dir)) - set(classes))
            if extra:
                raise DatasetError(f"{val_dir}: classes {extra} are not in {root / 'train'}")
            val = _scan(val_dir, classes, ignored, wanted)
        else:
            train, val = _stratified_split(train, val_split, seed)
    else:
        classes = _classes_in(root)
        train, val = _stratified_split(_scan(root, classes, ignored, wanted), val_split, seed)
        test = None
    if len(classes) < 2:
        raise DatasetError(f"{root}: found {len(classes)} class folder(s); need at least 2 "
                           f"(DIR/<class>/image.jpg or DIR/train/<class>/image.jpg)")
    if len(train) == 0:
        clips = wanted is is_image_file and any(is_video_file(path) for path in ignored)
        raise DatasetError(f"{root}: no {what} found" + (
            f"; its class folders hold video clips: `residual unpack {root} FRAMES` writes their frames as an image "
            f"folder, each clip's in one split, which train takes and eval scores per frame and per clip"
            if clips else ""))
    return Dataset(root, "imagefolder", classes, train, val, test, ignored, flat=not (root / "train").is_dir())


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows of a CSV file, each with the number of its (last) line, whose delimiter may
    be a comma, a semicolon (spreadsheets in many locales) or a tab; a UTF-8 byte-order mark (Excel's) is
    dropped, blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file; give a CSV file of image,label rows, or a folder") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot be read as a UTF-8 CSV file ({error})") from None
    if not text.strip():
        raise DatasetError(f"{path}: empty file; the first line must name the columns, e.g. image,label")
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;\t")
    except csv.Error:  # one column, or no delimiter the sniffer trusts: the columns check says what is missing
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    return header, [(reader.line_num, row) for row in reader]


def _csv_column(layout: CsvLayout, header: list[str], names: tuple[str, ...], what: str) -> str:
    """The header's `what` column: the one the dataset file names, else the first of `names` found (any case)."""
    named = getattr(layout, f"{what}_column")
    if named is not None:
        found = next((column for column in header if column.lower() == named.strip().lower()), None)
        if found is None:
            raise DatasetError(f"{layout.described_in}: {what}_column {named!r} is not a column of {layout.csv} "
                               f"(it has: {', '.join(header) or 'nothing'})")
        return found
    found = next((column for name in names for column in header if column.lower() == name), None)
    if found is None:
        raise DatasetError(f"{layout.csv}: no {what} column; the header must name one of {', '.join(names)} "
                           f"(it has: {', '.join(header) or 'nothing'}), or name its {what}_column in a dataset "
                           f"file (.yaml)")
    return found


def _image_path(layout: CsvLayout, cell: str) -> Path:
    """The file a CSV cell names: relative to the layout's folder (an absolute path stays itself)."""
    return layout.folder / (cell + layout.suffix)


def input_images(sources) -> list:
    """The images a user names, in order: images as given (paths as Path), every folder's image files, and
    the files each CSV (a .csv file with an image column, as for training) or dataset file (.yaml) lists."""
    items: list = []
    for source in sources:
        path = Path(source) if isinstance(source, (str, os.PathLike)) else None
        if path is not None and path.suffix.lower() == ".csv" and path.is_file():
            items += listed_images(CsvLayout(path))
        elif path is not None and _is_dataset_file(path) and path.is_file():
            items += listed_images(read_dataset_file(path))
        else:
            items += image_files([source])
    return items


def listed_images(layout: CsvLayout) -> list[ListedImage]:
    """The files a CSV lists in its image column, in its order: a list of images to predict. Other
    columns are ignored; a listed file that is missing or no image is left for the reader to report."""
    header, rows = _read_csv_rows(layout.csv)
    if not rows:
        raise DatasetError(f"{layout.csv}: no rows under the header; list one image per line")
    column = _csv_column(layout, header, CSV_IMAGE_COLUMNS, "image")
    files = []
    for number, row in rows:
        image = (row.get(column) or "").strip()
        if not image:
            raise DatasetError(f"{layout.csv}: line {number} has no {column}; every row needs an image")
        files.append(listed_image(_image_path(layout, image), image, column, layout.label_column))
    return files


def _class_order(labels: set[str]) -> list[str]:
    """Class names sorted, as numbers where they all are (so 2 comes before 10)."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _open_csv(root: Path, layout: CsvLayout, val_split: float | None, seed: int) -> Dataset:
    """The dataset a CSV lists; `root` is what the user named: the CSV, or the dataset file describing it."""
    path = layout.csv
    header, rows = _read_csv_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no rows under the header; list one image,label per line")
    image_column = _csv_column(layout, header, CSV_IMAGE_COLUMNS, "image")
    split_column = (_csv_column(layout, header, (), "split") if layout.split_column is not None
                    else next((column for column in header if column.lower() == "split"), None))
    class_columns = (_class_columns(layout, header, (image_column, split_column))
                     if layout.label_columns is not None else None)
    label_column = None if class_columns else _csv_column(layout, header, CSV_LABEL_COLUMNS + CSV_MULTI_LABEL_COLUMNS,
                                                          "label")
    multi_label = (class_columns is not None or layout.label_separator is not None
                   or label_column.lower() in CSV_MULTI_LABEL_COLUMNS)
    separator = layout.label_separator or " "
    split_names = {"train": "train", "test": "test", **{name: "val" for name in VAL_NAMES}}
    folder = layout.folder
    listed: dict[str, list[tuple[Path, tuple[str, ...]]]] = {"train": [], "val": [], "test": []}
    missing: list[tuple[int, Path]] = []
    ignored: list[Path] = []
    for number, row in rows:
        image, cell = (row.get(image_column) or "").strip(), (row.get(label_column) or "").strip()
        split = (row.get(split_column) or "").strip().lower() if split_column else "train"
        if not image or not (cell or multi_label):  # a multi-label image may have none of the labels
            raise DatasetError(f"{path}: line {number} has no {image_column if not image else label_column}; "
                               f"every row needs an image and a label")
        if split not in split_names:
            raise DatasetError(f"{path}: line {number}: split {split!r} is not train, val or test")
        file = _image_path(layout, image)
        if not is_image_file(file):
            ignored.append(file)
        elif not file.is_file():
            missing.append((number, file))
        else:
            labels = (_flagged(row, class_columns, path, number) if class_columns
                      else split_labels(cell, separator) if multi_label else (cell,))
            listed[split_names[split]].append((file, labels))
    if missing:
        number, file = missing[0]
        raise DatasetError(f"{path}: {len(missing)} listed image(s) do not exist, the first on line {number}: "
                           f"{file} (image paths are relative to " + (
                               f"the CSV's folder, {folder}; a dataset file (.yaml) can name another and a suffix)"
                               if layout.described_in is None else f"{folder}, as {layout.described_in} says)"))
    classes = (list(class_columns) if class_columns  # every column a class, in the file's order
               else _class_order({label for _, labels in listed["train"] for label in labels}))
    if len(classes) < 2:
        raise DatasetError(f"{path}: the training rows name {len(classes)} class(es); need at least 2")
    unknown = sorted({label for split in ("val", "test") for _, labels in listed[split] for label in labels}
                     - set(classes))
    if unknown:
        raise DatasetError(f"{path}: classes {unknown[:5]} of the val or test rows have no training rows")
    index = {name: label for label, name in enumerate(classes)}

    def encoded(labels: tuple[str, ...]) -> int | list[int]:
        if not multi_label:
            return index[labels[0]]
        row = [0] * len(classes)
        for label in labels:
            row[index[label]] = 1
        return row

    train, val, test = (Split([file for file, _ in listed[name]], [encoded(labels) for _, labels in listed[name]])
                        for name in ("train", "val", "test"))
    if len(val) and val_split is not None:
        raise DatasetError(f"--val-split: {path} has val rows, which are the validation set; drop --val-split")
    if not len(val):
        train, val = (_random_split if multi_label else _stratified_split)(train, val_split, seed)
    return Dataset(root, "csv", classes, train, val, test if len(test) else None, ignored, flat=not split_column,
                   files_under=folder, multi_label=multi_label)


def _class_columns(layout: CsvLayout, header: list[str], other: tuple[str | None, ...]) -> list[str]:
    """The header's columns a dataset file's label_columns names (any case), or with "*" every column but the
    image and split ones."""
    if layout.label_columns == "*":
        return [column for column in header if column not in other]
    by_name = {column.lower(): column for column in header}
    unknown = [name for name in layout.label_columns if name.strip().lower() not in by_name]
    if unknown:
        raise DatasetError(f"{layout.described_in}: label_columns {unknown[:5]} are not columns of {layout.csv} "
                           f"(it has: {', '.join(header)})")
    return [by_name[name.strip().lower()] for name in layout.label_columns]


def _flagged(row: dict[str, str], columns: list[str], path: Path, number: int) -> tuple[str, ...]:
    """The class columns whose cell in `row` says the image has the class (1, true, yes; 0, -1, false, no or
    empty say it has not)."""
    present = []
    for column in columns:
        cell = (row.get(column) or "").strip().lower()
        if cell not in PRESENT_CELLS + ABSENT_CELLS:
            raise DatasetError(f"{path}: line {number}: {column} is {row.get(column)!r}; a class column holds 1 if "
                               f"the image has the class and 0 (or -1) if not")
        if cell in PRESENT_CELLS:
            present.append(column)
    return tuple(present)


def split_labels(cell: str, separator: str = " ") -> tuple[str, ...]:
    """The labels a multi-label cell lists, in order, each once; a blank separator splits at any whitespace."""
    parts = cell.split() if not separator.strip() else (part.strip() for part in cell.split(separator))
    return tuple(dict.fromkeys(part for part in parts if part))


def _val_fraction(fraction: float | None) -> float:
    """--val-split as given, or DEFAULT_VAL_SPLIT (0 is an error, not "not given")."""
    fraction = DEFAULT_VAL_SPLIT if fraction is None else fraction
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"--val-split must be between 0 and 1, got {fraction}")
    return fraction


def _split_off(split: Split, val_index) -> tuple[Split, Split]:
    """(the images not in `val_index`, those in it), each in file order."""
    in_val = np.zeros(len(split), dtype=bool)
    in_val[list(val_index)] = True
    labels = np.asarray(split.labels)
    pick = lambda keep: Split([f for f, k in zip(split.files, keep) if k], labels[keep].tolist())  # noqa: E731
    return pick(~in_val), pick(in_val)


def _stratified_split(split: Split, fraction: float | None, seed: int) -> tuple[Split, Split]:
    """Seeded per-class split: each class gives round(fraction * n) images (at least 1) to val."""
    fraction = _val_fraction(fraction)
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    val_index = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue  # a class with one image stays in train
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        val_index.extend(rng.permutation(members)[:count].tolist())
    return _split_off(split, val_index)


def _random_split(split: Split, fraction: float | None, seed: int) -> tuple[Split, Split]:
    """Seeded split of multi-label images: round(fraction * n) of them (at least 1) to val, drawn at random.
    Stratifying by class does not apply where an image has several classes."""
    fraction = _val_fraction(fraction)
    count = min(len(split) - 1, max(1, round(fraction * len(split))))
    return _split_off(split, np.random.default_rng(seed).permutation(len(split))[:count])


# --- CIFAR ---------------------------------------------------------------------------------------

class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits the globals NumPy arrays need and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _load_cifar_pickle(path: Path) -> dict:
    try:
        data = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise DatasetError(f"{path}: refused: not a plain CIFAR batch ({error}); unpickling it could run "
                           f"code") from None
    except (OSError, EOFError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable CIFAR batch ({error})") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}


def _cifar_split(path: Path, label_key: str) -> Split:
    batch = _load_cifar_pickle(path)
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return Split(labels=[int(v) for v in batch[label_key]], images=torch.from_numpy(images.copy()))


def concat_splits(splits: list[Split]) -> Split:
    """One split holding all the given ones (files, or in-memory images)."""
    images = torch.cat([s.images for s in splits]) if splits and splits[0].images is not None else None
    return Split([f for s in splits for f in s.files], [v for s in splits for v in s.labels], images)


def _open_cifar(root: Path) -> Dataset:
    if (root / "batches.meta").is_file():  # CIFAR-10
        labels = _load_cifar_pickle(root / "batches.meta")["label_names"]
        names = [n.decode() if isinstance(n, bytes) else n for n in labels]
        batches = sorted(root.glob("data_batch_*"))
        if not batches or not (root / "test_batch").is_file():
            raise DatasetError(f"{root}: CIFAR-10 layout needs data_batch_1..5 and test_batch")
        train = concat_splits([_cifar_split(p, "labels") for p in batches])
        test = _cifar_split(root / "test_batch", "labels")
    else:  # CIFAR-100
        meta = _load_cifar_pickle(root / "meta")
        names = [n.decode() if isinstance(n, bytes) else n for n in meta["fine_label_names"]]
        train = _cifar_split(root / "train", "fine_labels")
        test = _cifar_split(root / "test", "fine_labels")
    # CIFAR's test set is the standard validation set (as in He et al.).
    return Dataset(root, "cifar", names, train, test, None)
