"""`residual check-data`: what is wrong with a dataset before training on it.

Reads every image once with the same reader training uses, and reports
unreadable files, non-image files, class counts and imbalance, exact duplicate
images (same bytes, by SHA-256), near-identical copies (re-encoded or resized:
data/fingerprint.py), leakage (the same or a near-identical image in train and in
val or test) and images filed under two classes.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


from PIL import Image

from ..progress import progress_bar
from .datasets import Dataset, Split, open_dataset
from .decode import BadImageError, read_image
from .fingerprint import connected_groups, fingerprint, near_duplicate_pairs


@dataclass
class DataReport:
    dataset: Dataset
    counts: dict[str, list[int]]  # split -> images per class
    bad: list[str] = field(default_factory=list)  # one message per unreadable file
    duplicates: list[list[str]] = field(default_factory=list)  # groups of identical images within a split
    leaks: list[tuple[str, str, str]] = field(default_factory=list)  # (split, item, the same image in train)
    # groups of identical or near-identical images, in any splits, filed under different classes (or, multi-label,
    # different sets of them): "item (class)" each
    conflicts: list[list[str]] = field(default_factory=list)
    near_duplicates: list[list[str]] = field(default_factory=list)  # near-identical, other bytes, within a split
    near_leaks: list[tuple[str, str, str]] = field(default_factory=list)  # (split, item, its near-copy in train)

    @property
    def empty_classes(self) -> list[str]:
        """Classes without a training image: the model cannot learn them."""
        return [name for name, count in zip(self.dataset.classes, self.counts["train"]) if count == 0]

    @property
    def imbalance(self) -> float:
        """Largest over smallest training class count, among the classes that have images."""
        train = [count for count in self.counts["train"] if count]
        return max(train) / min(train) if train else 1.0

    @property
    def ok(self) -> bool:
        return (not (self.bad or self.leaks or self.duplicates or self.conflicts or self.empty_classes
                     or self.near_duplicates or self.near_leaks) and self.imbalance <= 10)

    def to_dict(self) -> dict:
        """The report as plain data (check-data.json)."""
        return {"data": str(self.dataset.root), "kind": self.dataset.kind, "classes": self.dataset.classes,
                "counts": self.counts, "ok": self.ok, "unreadable": self.bad,
                "ignored": [str(path) for path in self.dataset.ignored], "empty_classes": self.empty_classes,
                "imbalance": self.imbalance, "duplicates": self.duplicates, "near_duplicates": self.near_duplicates,
                "leaks": [dict(zip(("split", "image", "train_image"), leak)) for leak in self.leaks],
                "near_leaks": [dict(zip(("split", "image", "train_image"), leak)) for leak in self.near_leaks],
                "conflicts": self.conflicts}

    def image(self, item: str) -> Image.Image:
        """The image a report line names: a file, or SPLIT#N for the N-th of an in-memory split (CIFAR)."""
        split, _, index = item.rpartition("#")
        if split in ("train", "val", "test") and index.isdigit():
            return Image.fromarray(getattr(self.dataset, split).images[int(index)].permute(1, 2, 0).numpy())
        return read_image(item)


@dataclass
class _Checked:
    """An image read by check_data."""
    split: str
    item: str
    label: tuple[int, ...]  # its class, or a multi-label image's classes (maybe none)
    digest: str


def _items(split: Split, name: str) -> list[tuple[str, bytes | None, Image.Image | None]]:
    """(name, content, image) per image; content and image None for files (read later). In-memory images
    are named SPLIT#N (CIFAR's have no file names)."""
    if split.images is not None:
        return [(f"{name}#{i}", image.numpy().tobytes(), Image.fromarray(image.permute(1, 2, 0).numpy()))
                for i, image in enumerate(split.images)]
    return [(str(path), None, None) for path in split.files]


def check_data(root: str | Path, val_split: float | None = None, seed: int = 0, progress: bool = True) -> DataReport:
    dataset = open_dataset(root, val_split, seed)
    splits = {"train": dataset.train, "val": dataset.val}
    if dataset.test is not None:
        splits["test"] = dataset.test
    report = DataReport(dataset, {name: dataset.class_counts(split) for name, split in splits.items()})
    digests: dict[str, dict[str, list[str]]] = {name: defaultdict(list) for name in splits}
    checked, fingerprints = [], []
    total = sum(len(split) for split in splits.values())
    with progress_bar("checking images", progress) as bar:
        task = bar.add_task("check", total=total)
        for name, split in splits.items():
            for (item, content, image), label in zip(_items(split, name), split.labels):
                if content is None:
                    try:
                        image = read_image(item)
                        content = Path(item).read_bytes()
                    except BadImageError as error:
                        report.bad.append(str(error))
                        bar.advance(task)
                        continue
                digest = hashlib.sha256(content).hexdigest()
                digests[name][digest].append(item)
                classes = tuple(i for i, on in enumerate(label) if on) if dataset.multi_label else (int(label),)
                checked.append(_Checked(name, item, classes, digest))
                fingerprints.append(fingerprint(image))
                bar.advance(task)
    for name in splits:
        report.duplicates.extend(group for group in digests[name].values() if len(group) > 1)
        if name != "train":
            for digest, items in digests[name].items():
                if digest in digests["train"]:
                    report.leaks.extend((name, item, digests["train"][digest][0]) for item in items)
    _report_copies(report, checked, fingerprints)
    return report


def _report_copies(report: DataReport, checked: list[_Checked], fingerprints: list) -> None:
    """Near-identical images with other bytes (exact copies within and across splits are reported already),
    and every group of copies, exact or near, filed under different classes: one entry a group, however
    its members are joined."""
    near = [(a, b) for a, b in near_duplicate_pairs(fingerprints) if checked[a].digest != checked[b].digest]
    first_with_digest: dict[str, int] = {}
    exact = [(first_with_digest.setdefault(member.digest, index), index) for index, member in enumerate(checked)]
    classes = report.dataset.classes
    for group in connected_groups(len(checked), near + exact):
        members = [checked[index] for index in group]
        if len({member.label for member in members}) > 1:
            report.conflicts.append([f"{member.item} ({' '.join(classes[c] for c in member.label) or 'no labels'})"
                                     for member in members])
        for split in report.counts:
            inside = [member for member in members if member.split == split]
            if len({member.digest for member in inside}) > 1:
                report.near_duplicates.append([member.item for member in inside])
        train = [member for member in members if member.split == "train"]
        if train:
            train_digests = {member.digest for member in train}
            report.near_leaks.extend((member.split, member.item, train[0].item) for member in members
                                     if member.split != "train" and member.digest not in train_digests)
