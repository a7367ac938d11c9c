"""Images that are probably labelled wrong, found by models that never trained on them.

Every labelled image of the dataset gets class probabilities from a model trained on the other folds
(k-fold cross-validation, stratified by class, with exact and near-identical copies of an image in one fold):
out-of-fold answers, so a model cannot simply have memorised a wrong label. Suspects are then the
off-diagonal of the confident joint (Northcutt et al. 2021, "Confident learning"): each class's threshold
t_j is the mean probability that images labelled j give j; an image belongs to the most probable of the
classes whose probability reaches their threshold, and is a suspect when that class is not its label.
Suspects are ranked by the probability of their given label, lowest first (cleanlab's "self-confidence"
ranking).

Each fold is an ordinary training run (its CSV of image,label,split rows, its run directory under OUT/runs),
so every training option applies.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .data.datasets import open_dataset  # noqa: E402
from .data.decode import BadImageError, decode_bytes  # noqa: E402
from .data.fingerprint import connected_groups, fingerprint, near_duplicate_pairs  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .predict import single_label_only  # noqa: E402
from .progress import progress_bar  # noqa: E402
from .train import TrainConfig, train  # noqa: E402
from .weights import load_model  # noqa: E402


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, 0 to folds-1: every class dealt round-robin over the folds in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


def copies_together(fold_of: np.ndarray, files: list[Path], progress: bool = False) -> tuple[np.ndarray, int]:
    """`fold_of` with every copy of an image, byte-identical or near-identical (re-encoded or resized,
    data/fingerprint.py), moved into the fold of the group's first image, and how many moved: a copy left in
    another fold's training set would teach that model the label it is to judge."""
    first_of: dict[str, int] = {}
    pairs, readable, fingerprints = [], [], []
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
    probability of the given label first: of the classes at or above their threshold, the image belongs to
    the most probable; it is a suspect when that is not its label (no class above: not counted)."""
    thresholds = np.nan_to_num(class_thresholds(probs, labels), nan=np.inf)
    confident = np.where(probs >= thresholds[None, :], probs, -1.0)
    belongs = confident.argmax(1)
    flagged = np.flatnonzero((confident.max(1) >= 0) & (belongs != labels))
    order = np.argsort(probs[flagged, labels[flagged]], kind="stable")
    return [(int(flagged[i]), int(belongs[flagged[i]])) for i in order]


@dataclass
class LabelIssue:
    image: str
    given: str
    suggested: str
    p_given: float
    p_suggested: float


@dataclass
class LabelErrorResult:
    images: int  # judged
    issues: list[LabelIssue]  # worst first
    out: Path
    fold_top1: list[float]  # each fold model's top-1 on its held-out fold
    unreadable: list[str]  # one line per image that could not be read, so was not judged

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
    dataset = open_dataset(data)
    single_label_only("label-errors", dataset=dataset)  # a label error here is a class other than the given one
    if dataset.kind == "cifar":
        raise ConfigError(f"{data}: CIFAR's batches hold no image files to list per fold; audit a folder or a CSV")
    splits = [split for split in (dataset.train, dataset.val, dataset.test) if split is not None]
    files = [Path(file).resolve() for split in splits for file in split.files]
    labels = np.concatenate([np.asarray(split.labels, dtype=np.int64) for split in splits])
    too_few = [name for name, count in zip(dataset.classes, np.bincount(labels, minlength=len(dataset.classes)))
               if count < folds]
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
    fold_top1, unreadable = [], []
    for fold in range(folds):
        listing = out / "folds" / f"fold-{fold + 1}.csv"
        listing.parent.mkdir(exist_ok=True)
        with atomic_path(listing) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["image", "label", "split"])
            writer.writerows([file, dataset.classes[label], "val" if fold_of[index] == fold else "train"]
                             for index, (file, label) in enumerate(zip(files, labels)))
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
        fold_top1.append(float(result.metrics["top1"]))
    kept = np.flatnonzero(judged)  # an unreadable image has no answer to judge it by; it is reported instead
    issues = [LabelIssue(str(files[kept[index]]), dataset.classes[labels[kept[index]]], dataset.classes[suggested],
                         float(probs[kept[index], labels[kept[index]]]), float(probs[kept[index], suggested]))
              for index, suggested in suspects(probs[kept], labels[kept])]
    result = LabelErrorResult(len(kept), issues, out, fold_top1, unreadable)
    _write_table(issues, result.files["table"])
    _write_probabilities([files[index] for index in kept], [dataset.classes[label] for label in labels[kept]],
                         probs[kept], dataset.classes, result.files["probabilities"])
    _draw(issues[:show], len(issues), result.files["picture"], len(kept))
    return result


def _write_table(issues: list[LabelIssue], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "given", "suggested", "p_given", "p_suggested"])
        writer.writerows([issue.image, issue.given, issue.suggested, f"{issue.p_given:.4f}", f"{issue.p_suggested:.4f}"]
                         for issue in issues)


def _write_probabilities(files: list[Path], given: list[str], probs: np.ndarray, classes: list[str],
                         path: Path) -> None:
    """Every judged image's out-of-fold probabilities: what the rule saw, for another rule or a closer look."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "given", *classes])
        writer.writerows([file, label, *(f"{p:.6f}" for p in row)] for file, label, row in zip(files, given, probs))


def _draw(issues: list[LabelIssue], total: int, path: Path, audited: int) -> None:
    """The worst suspects as a grid of thumbnails, each titled with its given and suggested class."""
    columns = 6
    rows = max(1, -(-len(issues) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, issue in zip(axes.flat, issues):
        with Image.open(issue.image) as image:
            ax.imshow(image.convert("RGB"))
        ax.set_title(f"{issue.given} ({issue.p_given:.2f})\n-> {issue.suggested} ({issue.p_suggested:.2f})",
                     fontsize=8)
    figure.suptitle(f"Probably mislabelled: the worst {len(issues)} of {total} suspects among {audited} images "
                    f"(given label -> suggested, out-of-fold probabilities)")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
