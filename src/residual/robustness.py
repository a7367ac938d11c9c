"""How well a model holds up when its images are corrupted: ImageNet-C's protocol on your own test images.

Each of a sample of test images is corrupted on the fly (data/corruptions.py: noise, blur, weather and digital
artefacts, five severities each), as the model sees it after its resize and crop, and top-1 is measured at
every corruption and severity, with the expected calibration error (do the probabilities still match the
accuracy when the images get worse? Ovadia et al. 2019 found they drift). The summary is the mean top-1
over all of them and its share of the clean top-1. Against a baseline model (Hendrycks & Dietterich 2019
use AlexNet): each corruption's error summed over the severities, divided by the baseline's (CE), their
mean (mCE), and the same for the error added by the corruption over each model's clean error (relative CE
and mCE). Below 1 is more robust than the baseline.

A multi-label model (one sigmoid per class) is measured by mAP where others are by top-1, its error being
1 - mAP, and its calibration over every (image, class) probability, as `residual eval` measures it.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path, write_json
from .data.corruptions import CORRUPTIONS, SEVERITIES, check_corruptions, corrupt, protocol_for
from .data.datasets import Dataset, DatasetError, open_dataset
from .data.loaders import inference_batches
from .errors import ConfigError
from .evaluate import model_labels, pick_split
from .figures import new_figure, save_png
from .metrics import (SCORE_NAMES, calibration_bins, expected_calibration_error, mean_average_precision,
                      mean_where_defined)
from .predict import class_probabilities, is_multi_label, model_device
from .progress import progress_bar
from .weights import cache_dir, download

DEFAULT_IMAGES = 1000  # a top-1 over 1,000 images is within about 3 points at 95%
# The sample is decoded once and kept, as uint8 at the model's input size: 150 MB for 1,000 images at 224 px.
MEMORY_BUDGET = 4 * 1024**3

# ImageNet-C's six frost photographs, which frost lays over the images. The `imagecorruptions` package ships
# them in its wheel on PyPI, an address with a published sha256; the wheel is fetched whole (2.1 MB) and the
# photographs read from it.
FROST_PHOTOS = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_WHEEL = ("https://files.pythonhosted.org/packages/3e/40/ff4a79ad7ab6463fe2fde7912b71084a6606e33676078a50b40a"
               "3377112b/imagecorruptions-1.1.2-py3-none-any.whl",
               "d0e4bf529ba6fbb27d8aba1bde7c5db43bf2b969b2c767c11419e939e3e365b8")
FROST_GET = ("`residual download frost` fetches them, or --frost-dir names a folder of frost1.png ... "
             "frost6.jpg (ImageNet-C's create_c folder has them)")


def frost_wheel() -> Path:
    """Where the wheel holding the frost photographs is cached."""
    return cache_dir() / FROST_WHEEL[0].rsplit("/", 1)[1]


def frost_photographs(folder: str | Path | None = None, fetch: bool = False,
                      progress: bool | None = None) -> list[torch.Tensor] | None:
    """ImageNet-C's frost photographs, uint8 3 x H x W each (their alpha dropped, as OpenCV reads them): from
    `folder`, else from the cached wheel, fetched first with `fetch` (sha256-checked); None when `fetch` is
    off and it is not cached."""
    if folder is not None:
        folder = Path(folder)
        missing = [name for name in FROST_PHOTOS if not (folder / name).is_file()]
        if missing:
            raise ConfigError(f"--frost-dir {folder}: no {', '.join(missing)} there; give the folder of "
                              f"ImageNet-C's frost photographs (frost1.png ... frost6.jpg)")
        return [_photo((folder / name).read_bytes()) for name in FROST_PHOTOS]
    wheel = frost_wheel()
    if not fetch and not wheel.is_file():
        return None
    download(FROST_WHEEL[0], wheel, FROST_WHEEL[1], progress)  # a cached wheel is only checked
    with zipfile.ZipFile(wheel) as archive:
        return [_photo(archive.read(f"imagecorruptions/frost/{name}")) for name in FROST_PHOTOS]


def _photo(content: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(content)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


@dataclass
class ModelRobustness:
    name: str
    clean: float  # top-1 (a multi-label model: mAP) on the images uncorrupted
    scores: dict[str, list[float]]  # corruption -> top-1 (mAP) at each severity measured
    clean_ece: float  # expected calibration error (15 bins, as eval's) on the images uncorrupted
    ece: dict[str, list[float]]  # corruption -> ECE at each severity
    metric: str = "top1"  # what `clean` and `scores` are: "top1", or a multi-label model's "map"

    @property
    def mean(self) -> float:
        """Top-1 (mAP) averaged over every corruption and severity measured."""
        return float(np.mean([value for values in self.scores.values() for value in values]))

    @property
    def mean_ece(self) -> float:
        return float(np.mean([value for values in self.ece.values() for value in values]))


@dataclass
class RobustnessResult:
    model: ModelRobustness
    baseline: ModelRobustness | None
    protocol: str  # whose severity parameters: 'imagenet-c' or 'cifar-10-c'
    severities: list[int]
    images: int  # scored (the sample less the unreadable)
    split: str
    failed: list[str]  # one line per unreadable image
    files: dict[str, Path] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # corruption -> why the default set did not run it

    @property
    def metric(self) -> str:
        return self.model.metric

    def corruption_errors(self, relative: bool = False) -> dict[str, float | None]:
        """Per corruption, the model's error (1 - top-1, or 1 - mAP) summed over the severities over the
        baseline's (with `relative`:
        the error each adds to its clean error); None where the baseline's sum is not positive (a corruption
        that did not cost the baseline anything, or even helped it, gives no scale to compare with)."""
        if self.baseline is None:
            return {}
        errors = {}
        for name, scores in self.model.scores.items():
            mine = sum(1 - value - (1 - self.model.clean if relative else 0) for value in scores)
            theirs = sum(1 - value - (1 - self.baseline.clean if relative else 0)
                         for value in self.baseline.scores[name])
            errors[name] = mine / theirs if theirs > 0 else None
        return errors

    def summary(self) -> dict:
        """The figures as JSON; the score keys are named by the metric: clean_top1, mean_corrupted_top1 and
        top1, or for a multi-label model clean_map, mean_corrupted_map and map."""
        def scores(model: ModelRobustness) -> dict:
            return {f"clean_{self.metric}": model.clean, f"mean_corrupted_{self.metric}": model.mean,
                    self.metric: model.scores, "clean_ece": model.clean_ece, "mean_corrupted_ece": model.mean_ece,
                    "ece": model.ece}

        summary = {"protocol": self.protocol, "split": self.split, "images": self.images, "metric": self.metric,
                   "severities": self.severities, "left_out": self.left_out, **scores(self.model),
                   "share_of_clean": self.model.mean / self.model.clean if self.model.clean else None}
        if self.baseline is not None:
            ce, relative = self.corruption_errors(), self.corruption_errors(relative=True)
            summary["baseline"] = {"name": self.baseline.name, **scores(self.baseline)}
            summary |= {"corruption_error": ce, "mce": mean_where_defined(list(ce.values())),
                        "relative_corruption_error": relative,
                        "relative_mce": mean_where_defined(list(relative.values()))}
        return summary


def robustness(model, data: str | Path | Dataset, split: str | None = None, corruptions: list[str] | None = None,
               severities: list[int] | None = None, images: int = DEFAULT_IMAGES, seed: int = 0,
               batch_size: int = 64, workers: int | None = None, baseline=None, out_dir: str | Path | None = None,
               progress: bool = False, names: tuple[str | None, str | None] = (None, None),
               protocol: str | None = None, frost_dir: str | Path | None = None) -> RobustnessResult:
    """Top-1 (a multi-label model: mAP) of `model` (and `baseline`) on up to `images` images of `data`'s split
    (a seeded sample), clean and under each corruption at each severity. The noise and motion angles are
    seeded, so two models on the same images at the same size see the same corrupted pixels. With `out_dir`:
    a CSV, a JSON summary and pictures.
    `names`: what the tables and pictures call the model and the baseline (default: their architectures).
    `protocol`: whose severity parameters, 'imagenet-c' or 'cifar-10-c'; default: by the model's input size
    (data.corruptions.protocol_for), the same for the baseline. Frost needs ImageNet-C's frost photographs
    (`frost_dir`, or the cached download): all corruptions by default leaves it out, saying so, when they
    are not at hand; asked for by name, it fetches them."""
    severities = list(SEVERITIES) if severities is None else sorted(set(severities))
    protocol = protocol or protocol_for(model.preprocessing.input_size)
    check_corruptions(list(CORRUPTIONS) if corruptions is None else corruptions, severities, protocol)
    left_out = {}
    if corruptions is None:
        frost_photos = frost_photographs(frost_dir)
        corruptions = [name for name in CORRUPTIONS if name != "frost" or frost_photos is not None]
        if frost_photos is None:
            left_out["frost"] = f"its photographs are not here; {FROST_GET}"
    else:
        frost_photos = frost_photographs(frost_dir, fetch=True, progress=progress) if "frost" in corruptions else None
    if images < 1:
        raise ConfigError(f"--images must be at least 1, got {images}")
    dataset = data if isinstance(data, Dataset) else open_dataset(data)
    if baseline is not None and is_multi_label(baseline) != is_multi_label(model):
        raise ConfigError(f"--baseline: {'a multi-label' if is_multi_label(baseline) else 'a single-label'} model, "
                          f"and the model is not; a baseline is scored as the model is (top-1 or mAP), so give one "
                          f"of the same kind")
    split_name, chosen = pick_split(dataset, split)
    items = chosen.files if chosen.images is None else list(chosen.images)
    sample = np.arange(len(items))
    if len(items) > images:
        sample = np.sort(np.random.default_rng(seed).choice(len(items), images, replace=False))
    models = [("model", model, names[0])] + ([("baseline", baseline, names[1])] if baseline is not None else [])
    for _, each, _ in models:
        size = each.preprocessing.input_size
        held = len(sample) * 3 * size * size
        if held > MEMORY_BUDGET:
            raise ConfigError(f"--images {len(sample):,} at {size} px would hold {held / 1024**3:.1f} GiB of decoded "
                              f"images; give at most {MEMORY_BUDGET // (3 * size * size):,}")
    scored, decoded = {}, {}  # decoded: per preprocessing, (pixels, positions read, unreadable), read once
    with progress_bar("corrupting and scoring", progress) as bar:
        task = bar.add_task("robustness", total=len(models) * len(sample) * (1 + len(corruptions) * len(severities)))
        for role, each, name in models:
            labels = model_labels(dataset, chosen, each)[sample]
            pre = each.preprocessing
            key = (pre.resize_size, pre.input_size, pre.interpolation)
            if key not in decoded:
                decoded[key] = _decode(pre, [items[i] for i in sample], batch_size, workers)
            pixels, kept, unreadable = decoded[key]
            if not kept:
                raise DatasetError(f"{dataset.root}: none of the {len(sample)} sampled images of the {split_name} "
                                   f"split could be read")
            bar.advance(task, len(unreadable) * (1 + len(corruptions) * len(severities)))
            if role == "model":  # what the report counts and shows; the baseline read the same files
                scored_images, example, failed = len(pixels), pixels[:1], unreadable
            scored[role] = _score(each, name or getattr(each, "arch", type(each).__name__), pixels, labels[kept],
                                  corruptions, severities, protocol, seed, batch_size,
                                  lambda done: bar.advance(task, done), frost_photos)
    result = RobustnessResult(scored["model"], scored.get("baseline"), protocol, severities, scored_images,
                              split_name, failed, left_out=left_out)
    if out_dir is not None:
        result.files = _write(result, Path(out_dir), example, corruptions, seed, frost_photos)
    return result


def _decode(pre, items: list, batch_size: int, workers: int | None) -> tuple[torch.Tensor, list[int], list[str]]:
    """The items as uint8 images at a model's input (its resize and crop, `pre`), on the host; the positions
    of those read, and a line for each that could not be."""
    images, kept, failed = [], [], []
    for batch in inference_batches(items, pre.resize_size, pre.input_size, pre.interpolation, batch_size, workers):
        failed += [message for _, message in batch.failed]
        if batch.images is not None:
            images.append(batch.images)
            kept += batch.indices
    return (torch.cat(images) if images else torch.empty(0)), kept, failed


def _score(model, name: str, pixels: torch.Tensor, labels: np.ndarray, corruptions: list[str],
           severities: list[int], protocol: str, seed: int, batch_size: int, advance,
           frost_photos: list[torch.Tensor] | None) -> ModelRobustness:
    device = model_device(model)
    if isinstance(model, torch.nn.Module):
        model.eval()
    multi_label = is_multi_label(model)

    def scores(corruption: str | None, severity: int) -> tuple[float, float]:
        """(top-1 or mAP, ECE) on the images with `corruption` at `severity` (None: clean)."""
        generator = _generator(seed, corruption, severity, device)
        probs = []
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(device)
            if corruption is not None:
                batch = corrupt(batch, corruption, severity, generator, protocol, frost_photos)
            probs.append(class_probabilities(model, batch, multi_label=multi_label).float().cpu())
            advance(len(batch))
        probs = torch.cat(probs).double().numpy()
        if multi_label:  # labels: 0/1 rows; calibration over every (image, class) probability, as eval's
            rows = calibration_bins(probs.ravel(), labels.ravel().astype(bool))
            return mean_average_precision(probs, labels) or 0.0, expected_calibration_error(rows)
        correct = probs.argmax(1) == labels
        return float(correct.mean()), expected_calibration_error(calibration_bins(probs.max(1), correct))

    clean, clean_ece = scores(None, 0)
    measured = {corruption: [scores(corruption, severity) for severity in severities] for corruption in corruptions}
    return ModelRobustness(name, clean, {corruption: [score for score, _ in pairs] for corruption, pairs in
                                         measured.items()},
                           clean_ece, {corruption: [ece for _, ece in pairs] for corruption, pairs in measured.items()},
                           "map" if multi_label else "top1")


def _generator(seed: int, name: str | None, severity: int, device: torch.device | str = "cpu") -> torch.Generator:
    """One stream of random numbers per corruption and severity, the same for every model and run."""
    index = -1 if name is None else list(CORRUPTIONS).index(name)
    return torch.Generator(device).manual_seed(seed * 1_000 + (index + 1) * 10 + severity)


def _write(result: RobustnessResult, out: Path, example: torch.Tensor, corruptions: list[str],
           seed: int, frost_photos: list[torch.Tensor] | None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"table": out / "robustness.csv", "summary": out / "robustness.json", "picture": out / "robustness.png",
             "examples": out / "corruptions.png"}
    with atomic_path(files["table"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["model", "corruption", "kind", "severity", result.metric, "ece"])
        for role, scores in (("model", result.model), ("baseline", result.baseline)):
            if scores is None:
                continue
            writer.writerow([role, "none", "clean", 0, f"{scores.clean:.4f}", f"{scores.clean_ece:.4f}"])
            writer.writerows([role, name, CORRUPTIONS[name], severity, f"{score:.4f}", f"{ece:.4f}"]
                             for name in scores.scores
                             for severity, score, ece in zip(result.severities, scores.scores[name], scores.ece[name]))
    write_json(files["summary"], result.summary())
    _draw(result, files["picture"])
    _draw_examples(example, corruptions, result.protocol, seed, files["examples"], frost_photos)
    return files


def _draw(result: RobustnessResult, path: Path) -> None:
    """Left: top-1 (mAP) at each corruption and severity; then, by severity (clean at 0), the mean over
    corruptions of top-1 (mAP) and of the calibration error."""
    score_name = SCORE_NAMES[result.metric]
    names = list(result.model.scores)
    grid = np.array([result.model.scores[name] for name in names])
    figure = new_figure(figsize=(16, 0.45 * len(names) + 2.2))
    heat, accuracy, calibration = figure.subplots(1, 3, width_ratios=[1.2, 1, 1])
    heat.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    heat.set_xticks(range(len(result.severities)), [str(s) for s in result.severities])
    heat.set_yticks(range(len(names)), names)
    heat.set_xlabel("severity")
    for (row, column), value in np.ndenumerate(grid):
        heat.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
    heat.set_title(f"{result.model.name}: {score_name} (clean {result.model.clean:.1%})")
    for scores, style in ((result.model, "o-"), (result.baseline, "s--")):
        if scores is None:
            continue
        label = scores.name if scores is result.model else f"baseline: {scores.name}"
        for ax, clean, by_corruption in ((accuracy, scores.clean, scores.scores),
                                         (calibration, scores.clean_ece, scores.ece)):
            means = [np.mean([by_corruption[name][i] for name in names]) for i in range(len(result.severities))]
            ax.plot([0, *result.severities], [clean, *means], style, label=label)
    for ax, what in ((accuracy, score_name), (calibration, "expected calibration error")):
        ax.set_xlabel("severity (0: clean)")
        ax.set_ylabel(f"{what}, mean over corruptions")
        ax.set_ylim(0, 1 if ax is accuracy else max(0.05, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend()
    accuracy.set_title(f"{result.images:,} {result.split} images, {result.protocol}'s severities")
    calibration.set_title("do its probabilities still match how often it is right?")
    figure.tight_layout()
    save_png(figure, path, dpi=100)


def _draw_examples(example: torch.Tensor, corruptions: list[str], protocol: str, seed: int, path: Path,
                   frost_photos: list[torch.Tensor] | None) -> None:
    """One image under each corruption at severities 1, 3 and 5, beside the clean image."""
    shown = (1, 3, 5)
    figure = new_figure(figsize=(1.6 * (1 + len(shown)), 1.6 * len(corruptions)))
    axes = figure.subplots(len(corruptions), 1 + len(shown), squeeze=False)
    for row, name in zip(axes, corruptions):
        views = [example] + [corrupt(example, name, severity, _generator(seed, name, severity), protocol,
                                     frost_photos) for severity in shown]
        for ax, view, title in zip(row, views, ["clean", *(f"severity {s}" for s in shown)]):
            ax.imshow(view[0].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if name == corruptions[0]:
                ax.set_title(title, fontsize=8)
        row[0].set_ylabel(name, fontsize=8)
    figure.tight_layout()
    save_png(figure, path, dpi=100)
