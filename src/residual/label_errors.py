"""Images that are probably labelled wrong, found by models that never trained on them.

Every labelled image of the dataset gets class probabilities from a model trained on the other folds
(k-fold cross-validation, stratified by class, with exact and near-identical copies of an image, and the frames
of a video clip `residual unpack` wrote, in one fold):
out-of-fold answers, so a model cannot simply have memorised a wrong label. Suspects are then the
off-diagonal of the confident joint (Northcutt et al. 2021, "Confident learning"): each class's threshold
t_j is the mean probability that images labelled j give j; an image belongs to the class whose probability
reaches its threshold (to its most probable class when several do), and is a suspect when that class is not
its label and the model does not rank its label first: cleanlab's confident-learning filter, exactly.
Suspects are ranked by the probability of their given label, lowest first (cleanlab's "self-confidence"
ranking).

Multi-label data (any number of classes per image) is judged class by class, as cleanlab's multi-label
issues are: each class is a two-way question (present or absent) with its own confident joint, and an
image is a suspect when any of its answers is put off the given one: a label probably missing, or one
probably wrong. Its folds are a seeded deal of the images, not stratified (an image has several classes).

Each fold is an ordinary training run (its CSV of image,label,split rows, its run directory under OUT/runs),
so every training option applies. Or the probabilities come from a CSV (`judge_probabilities`,
`--probabilities`): an earlier audit's probabilities.csv, or out-of-fold probabilities made elsewhere.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_path
from .data.clips import clip_of
from .data.datasets import Dataset, open_dataset
from .data.decode import BadImageError, decode_bytes
from .data.fingerprint import connected_groups, fingerprint, near_duplicate_pairs
from .errors import ConfigError
from .evaluate import evaluate
from .figures import new_figure, save_png
from .progress import progress_bar
from .train import TrainConfig, train
from .weights import load_model


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, 0 to folds-1: every class dealt round-robin over the folds in a seeded order.
    Multi-label rows (N x classes) are dealt as one group: an image of several classes has no one class."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    groups = np.zeros(len(labels), dtype=np.int64) if labels.ndim == 2 else labels
    for label in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == label))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


def copies_together(fold_of: np.ndarray, files: list[Path], progress: bool = False) -> tuple[np.ndarray, int]:
    """`fold_of` with every copy of an image, byte-identical or near-identical (re-encoded or resized,
    data/fingerprint.py), and every frame of one video clip (as `residual unpack` names them), moved into the fold
    of the group's first image, and how many moved: a copy, or a frame a moment from it, left in another fold's
    training set would teach that model the label it is to judge."""
    first_frame: dict[str, int] = {}  # a clip -> its first frame
    pairs = [(first_frame.setdefault(clip, index), index) for index, clip in enumerate(map(clip_of, files)) if clip]
    first_of: dict[str, int] = {}  # a content hash -> its first image
    readable, fingerprints = [], []
    with progress_bar("finding copies", progress) as bar:
        for index, file in enumerate(bar.track(files)):
            try:
                content = Path(file).read_bytes()  # read once: hashed, then decoded
                image = decode_bytes(content, str(file))
            except (BadImageError, OSError):
                continue  # unreadable: training names it
            pairs.append((first_of.setdefault(hashlib.sha256(content).hexdigest(), index), index))
            readable.append(index)
            fingerprints.append(fingerprint(image))
    pairs += [(readable[a], readable[b]) for a, b in near_duplicate_pairs(fingerprints)]
    together = fold_of.copy()
    for group in connected_groups(len(files), pairs):
        together[group] = fold_of[group[0]]
    return together, int((together != fold_of).sum())


def class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the mean probability the images labelled with it give it (NaN for a class without images)."""
    return np.array([probs[labels == j, j].mean() if (labels == j).any() else np.nan
                     for j in range(probs.shape[1])])


def suspects(probs: np.ndarray, labels: np.ndarray) -> list[tuple[int, int]]:
    """(image, suggested class) of each image the confident joint puts off its given label, lowest
    probability of the given label first, as cleanlab 2.9.0's filter_by="confident_learning" flags them: a class
    is confident for an image when its probability reaches the class's threshold (within 1e-6); the image
    belongs to its one confident class or, when several are, to its most probable class; it is a suspect when
    that is not its label (no class confident: not counted), unless its label is its most probable class
    (within 1e-6), so a weak model that still ranks the label first does not flag it."""
    thresholds = np.nan_to_num(class_thresholds(probs, labels), nan=np.inf)
    confident = probs >= thresholds[None, :] - 1e-6
    several = confident.sum(1) > 1
    belongs = np.where(several, probs.argmax(1), confident.argmax(1))
    rows = np.arange(len(labels))
    label_lifted = probs.copy()
    label_lifted[rows, labels] += 1e-6
    agrees = label_lifted.argmax(1) == labels
    flagged = np.flatnonzero(confident.any(1) & (belongs != labels) & ~agrees)
    order = np.argsort(probs[flagged, labels[flagged]], kind="stable")
    return [(int(flagged[i]), int(belongs[flagged[i]])) for i in order]


def label_suspects(probs: np.ndarray, targets: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Multi-label: (image, the classes whose given answer the per-class confident joint puts off) of each
    suspect, worst first: by the lowest probability the model gives to one of those answers as given."""
    targets = np.asarray(targets, dtype=np.int64)
    flagged = np.zeros(targets.shape, dtype=bool)
    for c in range(probs.shape[1]):  # present or absent: suspects() on two classes, 0 absent and 1 present
        two_way = np.stack([1 - probs[:, c], probs[:, c]], 1)
        flagged[[image for image, _ in suspects(two_way, targets[:, c])], c] = True
    given_probability = np.where(targets == 1, probs, 1 - probs)
    worst = np.where(flagged, given_probability, np.inf).min(1)
    images = np.flatnonzero(flagged.any(1))
    return [(int(image), flagged[image]) for image in images[np.argsort(worst[images], kind="stable")]]


@dataclass
class LabelIssue:
    image: str
    given: str  # its class; multi-label: its classes, separated by spaces
    suggested: str
    p_given: float  # multi-label: the lowest probability of a flagged answer as given (present or absent)
    p_suggested: float  # multi-label: of that answer flipped (1 - p_given)
    missing: list[str] = dataclasses.field(default_factory=list)  # multi-label: probably present, not given
    wrong: list[str] = dataclasses.field(default_factory=list)  # multi-label: given, probably absent

    @property
    def change(self) -> str:
        """A multi-label suspect's suggested edit: "+star -square"."""
        return " ".join([f"+{name}" for name in self.missing] + [f"-{name}" for name in self.wrong])


@dataclass
class LabelErrorResult:
    images: int  # judged
    issues: list[LabelIssue]  # worst first
    out: Path
    fold_scores: list[float]  # each fold model's top-1 (multi-label: mAP) on its held-out fold
    unreadable: list[str]  # one line per image that could not be read, so was not judged
    multi_label: bool = False

    @property
    def files(self) -> dict[str, Path]:
        return {"table": self.out / "label_issues.csv", "picture": self.out / "label_issues.png",
                "probabilities": self.out / "probabilities.csv"}


def find_label_errors(data: str | Path, out: str | Path, folds: int = 3, config: TrainConfig | None = None,
                      console=None, show: int = 24) -> LabelErrorResult:
    """Train `folds` models, each on all but one fold of `data`'s labelled images (train, val and test splits
    together); flag the images the model that did not train on them disagrees with. `config`: the training
    recipe for every fold (its data, name, out and report are set here); default: train's defaults."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2 (each image is judged by a model trained on the others), "
                          f"got {folds}")
    dataset, files, labels = _labelled_images(data)
    counts = labels.sum(0) if dataset.multi_label else np.bincount(labels, minlength=len(dataset.classes))
    too_few = [name for name, count in zip(dataset.classes, counts) if count < folds]
    if too_few:
        raise ConfigError(f"{data}: {', '.join(too_few[:5])} {'has' if len(too_few) == 1 else 'have'} fewer images "
                          f"than --folds {folds}; every fold needs an image of every class")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or TrainConfig(data=str(data))
    fold_of, moved = copies_together(stratified_folds(labels, folds, config.seed), files, progress=bool(console))
    if console and moved:
        console.print(f"{moved} copies of other images (exact or near-identical) moved into their fold, so no model "
                      f"trains on a copy of an image it judges")
    probs = np.zeros((len(files), len(dataset.classes)))
    judged = np.zeros(len(files), dtype=bool)
    fold_scores, unreadable = [], []
    for fold in range(folds):
        listing = _write_listing(out / "folds", f"fold-{fold + 1}", files, labels,
                                 ["val" if this == fold else "train" for this in fold_of], dataset)
        if console:
            console.print(f"fold {fold + 1}/{folds}: training on {int((fold_of != fold).sum())} images, judging "
                          f"{int((fold_of == fold).sum())}")
        run = train(dataclasses.replace(config, data=str(listing), name=f"fold-{fold + 1}", out=str(out / "runs"),
                                        report=False), console=console)
        model = load_model(run.model_path)
        result = evaluate(model, listing, "val", gallery_size=0, workers=config.workers)
        index_of = {str(files[index]): index for index in np.flatnonzero(fold_of == fold)}
        judged_now = [index_of[str(Path(source).resolve())] for source in result.sources]
        probs[judged_now] = result.probs[:, [list(model.class_names).index(name) for name in dataset.classes]]
        judged[judged_now] = True
        unreadable += result.failed
        fold_scores.append(result.score())
    # an unreadable image has no answer to judge it by; it is reported instead
    return _judge(dataset, files, labels, probs, judged, out, show, fold_scores, unreadable)


def judge_probabilities(data: str | Path, probabilities: str | Path, out: str | Path,
                        show: int = 24) -> LabelErrorResult:
    """Flag `data`'s labelled images by probabilities given in a CSV (`--probabilities`) instead of fold models
    trained here: a probabilities.csv of an earlier audit (judged again, say, after the rule changed), or
    out-of-fold probabilities from anywhere, as an `image` column and one column per class of `data`, named
    as its classes. The labels are `data`'s; an image of `data` the file lacks is not judged (counted in
    `LabelErrorResult.images`), and rows for images `data` does not label are refused."""
    dataset, files, labels = _labelled_images(data)
    probs, judged = _read_probabilities(Path(probabilities), files, dataset.classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return _judge(dataset, files, labels, probs, judged, out, show, [], [])


def _labelled_images(data: str | Path) -> tuple[Dataset, list[Path], np.ndarray]:
    """`data`'s labelled images (train, val and test splits together) and their labels (multi-label: N x C)."""
    dataset = open_dataset(data)
    if dataset.kind == "cifar":
        raise ConfigError(f"{data}: CIFAR's batches hold no image files to list per fold; audit a folder or a CSV")
    splits = [split for split in (dataset.train, dataset.val, dataset.test) if split is not None]
    files = [Path(file).resolve() for split in splits for file in split.files]
    labels = np.concatenate([np.asarray(split.labels, dtype=np.int64).reshape(len(split.labels), len(dataset.classes))
                             if dataset.multi_label else np.asarray(split.labels, dtype=np.int64) for split in splits])
    return dataset, files, labels


def _read_probabilities(path: Path, files: list[Path], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N x C probabilities in `files`' order and `classes`' columns, which of `files` the CSV gives) from a CSV
    with an image column and a column per class; anything else in it is a one-line ConfigError."""
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            columns, rows = reader.fieldnames or [], list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"--probabilities {path}: cannot read it as a CSV ({error})") from None
    missing = [name for name in ["image", *classes] if name not in columns]
    if missing:
        raise ConfigError(f"--probabilities {path}: no column {', '.join(repr(name) for name in missing[:5])}; it "
                          f"needs an image column and one per class of the data, as label-errors' probabilities.csv")
    index_of = {str(file): index for index, file in enumerate(files)}
    probs = np.zeros((len(files), len(classes)))
    judged = np.zeros(len(files), dtype=bool)
    for line, row in enumerate(rows, start=2):
        index = index_of.get(str(Path(row["image"]).resolve()))
        if index is None:
            raise ConfigError(f"--probabilities {path}, line {line}: {row['image']} is not a labelled image of the "
                              f"data; give the data the probabilities were made for")
        try:
            values = [float(row[name]) for name in classes]
        except (TypeError, ValueError):
            raise ConfigError(f"--probabilities {path}, line {line}: a probability that is not a number") from None
        if not all(0.0 <= value <= 1.0 for value in values):
            raise ConfigError(f"--probabilities {path}, line {line}: a probability outside 0..1")
        probs[index], judged[index] = values, True
    if not judged.any():
        raise ConfigError(f"--probabilities {path}: no rows; it needs a row of probabilities per image to judge")
    return probs, judged


def _judge(dataset: Dataset, files: list[Path], labels: np.ndarray, probs: np.ndarray, judged: np.ndarray,
           out: Path, show: int, fold_scores: list[float], unreadable: list[str]) -> LabelErrorResult:
    """The suspects among the judged images, written as label_issues.csv, probabilities.csv and a picture."""
    kept = np.flatnonzero(judged)
    find_issues = _multi_label_issues if dataset.multi_label else _issues
    issues = find_issues(probs[kept], labels[kept], [files[index] for index in kept], dataset.classes)
    result = LabelErrorResult(len(kept), issues, out, fold_scores, unreadable, dataset.multi_label)
    _write_table(issues, result.files["table"], dataset.multi_label)
    _write_probabilities([files[index] for index in kept], [_label_text(label, dataset) for label in labels[kept]],
                         probs[kept], dataset.classes, result.files["probabilities"])
    _draw(issues[:show], len(issues), result.files["picture"], len(kept), dataset.multi_label)
    return result


def _label_text(label: np.ndarray, dataset: Dataset) -> str:
    """An image's class, or its classes (multi-label) separated by spaces."""
    if dataset.multi_label:
        return " ".join(dataset.classes[c] for c in np.flatnonzero(label))
    return dataset.classes[label]


def _write_listing(folder: Path, name: str, files: list[Path], labels: np.ndarray, splits: list[str],
                   dataset: Dataset) -> Path:
    """A fold's data: a CSV of image,label,split rows; multi-label, a 1/0 column per class and a dataset file
    naming them (class names may hold spaces, which a list of labels in one cell could not)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        if not dataset.multi_label:
            writer.writerow(["image", "label", "split"])
            writer.writerows([file, dataset.classes[label], split] for file, label, split in zip(files, labels, splits))
            return folder / f"{name}.csv"
        writer.writerow(["image", "split", *dataset.classes])
        writer.writerows([file, split, *row] for file, row, split in zip(files, labels.tolist(), splits))
    with atomic_path(folder / f"{name}.yaml") as tmp:  # JSON is YAML: the class names quoted whatever they hold
        Path(tmp).write_text(json.dumps({"csv": f"{name}.csv", "image_column": "image", "split_column": "split",
                                         "label_columns": list(dataset.classes)}), encoding="utf-8")
    return folder / f"{name}.yaml"


def _issues(probs: np.ndarray, labels: np.ndarray, files: list[Path], classes: list[str]) -> list[LabelIssue]:
    return [LabelIssue(str(files[index]), classes[labels[index]], classes[suggested],
                       float(probs[index, labels[index]]), float(probs[index, suggested]))
            for index, suggested in suspects(probs, labels)]


def _multi_label_issues(probs: np.ndarray, labels: np.ndarray, files: list[Path],
                        classes: list[str]) -> list[LabelIssue]:
    issues = []
    for index, flagged in label_suspects(probs, labels):
        suggested = np.where(flagged, 1 - labels[index], labels[index])
        p_given = float(np.where(labels[index] == 1, probs[index], 1 - probs[index])[flagged].min())
        issues.append(LabelIssue(str(files[index]), " ".join(classes[c] for c in np.flatnonzero(labels[index])),
                                 " ".join(classes[c] for c in np.flatnonzero(suggested)), p_given, 1 - p_given,
                                 [classes[c] for c in np.flatnonzero(flagged & (labels[index] == 0))],
                                 [classes[c] for c in np.flatnonzero(flagged & (labels[index] == 1))]))
    return issues


def _write_table(issues: list[LabelIssue], path: Path, multi_label: bool) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        if multi_label:  # what to add and remove, and how sure the model is of the surest of those edits
            writer.writerow(["image", "given", "suggested", "missing", "wrong", "p_given"])
            writer.writerows([issue.image, issue.given, issue.suggested, " ".join(issue.missing),
                              " ".join(issue.wrong), f"{issue.p_given:.4f}"] for issue in issues)
            return
        writer.writerow(["image", "given", "suggested", "p_given", "p_suggested"])
        writer.writerows([issue.image, issue.given, issue.suggested, f"{issue.p_given:.4f}", f"{issue.p_suggested:.4f}"]
                         for issue in issues)


def _write_probabilities(files: list[Path], given: list[str], probs: np.ndarray, classes: list[str],
                         path: Path) -> None:
    """Every judged image's out-of-fold probabilities: what the rule saw, for another rule or a closer look."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "given", *classes])
        writer.writerows([file, label, *(f"{p:.6g}" for p in row)] for file, label, row in zip(files, given, probs))


def _draw(issues: list[LabelIssue], total: int, path: Path, audited: int, multi_label: bool = False) -> None:
    """The worst suspects as a grid of thumbnails, each titled with its given and suggested class (multi-label:
    its given classes and the edit suggested)."""
    columns = 6
    rows = max(1, -(-len(issues) // columns))
    figure = new_figure(figsize=(2.2 * columns, 2.5 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, issue in zip(axes.flat, issues):
        with Image.open(issue.image) as image:
            ax.imshow(image.convert("RGB"))
        title = (f"{issue.given or '(none)'}\n{issue.change} ({issue.p_suggested:.2f})" if multi_label else
                 f"{issue.given} ({issue.p_given:.2f})\n-> {issue.suggested} ({issue.p_suggested:.2f})")
        ax.set_title(title, fontsize=8)
    shown = ("given labels, then + a label probably missing, - one probably wrong, with the out-of-fold "
             "probability of the surest edit" if multi_label else "given label -> suggested, out-of-fold probabilities")
    figure.suptitle(f"Probably mislabelled: the worst {len(issues)} of {total} suspects among {audited} images\n"
                    f"({shown})")
    figure.tight_layout()
    save_png(figure, path, dpi=100)
