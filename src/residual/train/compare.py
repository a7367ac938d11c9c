"""`residual compare`: training runs side by side, with what differs between their recipes.

Each run is read from what training left in its folder: config.yaml (the recipe), metrics.csv (the
curves), model.safetensors (whose metadata records the best epoch and its validation scores, so a run
that is still going or was interrupted counts too) and summary.json (whether it finished).

With data to score them on (`score_on_data`), each run's model answers the same images, and each is
set against the best there by McNemar's exact test: whether the gap in top-1 is more than chance.
Multi-label runs are scored by mAP, which is no count of images right: its interval and the test of a gap
are a paired bootstrap (every run's mAP on the same resamples of the images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ResidualError
from ..evaluate import evaluate, split_as_trained
from ..metrics import bootstrap_indices, bootstrap_maps, paired_bootstrap, paired_comparison, percentile_interval
from ..runs import pick_device
from ..weights import load_model, read_metadata
from .config import flatten, load_config
from .history import read_metrics

# Settings that say where a run went or how it talked, not how it trained: never a difference worth naming.
BOOKKEEPING = ("name", "out", "quiet", "report", "checkpoint_every", "tensorboard", "mlflow", "wandb", "group")


@dataclass
class RunRecord:
    path: Path
    config: dict  # config.yaml as a TrainConfig, flattened: {"optim.lr": 0.1, ...}
    history: list[dict]  # metrics.csv's rows
    best: dict | None  # the kept model's epoch and validation scores; None before the first epoch ends
    summary: dict | None  # summary.json, written when the run ended (all its epochs, or early stopping)
    score: str = "val_top1"  # what ranks it: validation top-1, or a multi-label run's mAP ("val_map")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seconds(self) -> float:
        return sum(row.get("epoch_seconds", 0.0) for row in self.history)  # a column older runs may lack

    @property
    def state(self) -> str:
        """How far it got: "12/12", "7/30 stopped early", "2/3 trial 4 pruned at epoch 2" (what ended it before
        its epochs, the part before a colon: residual tune's pruner), or "3/12 unfinished" (interrupted, or still
        going)."""
        done = f"{len(self.history)}/{self.config['epochs']}"
        if self.summary is None:
            return f"{done} unfinished"
        if self.summary.get("stopped_by"):  # summaries from before 2026-12-05 lack it
            return f"{done} {self.summary['stopped_by'].split(':')[0]}"
        return f"{done} stopped early" if self.summary["stopped_early"] else done


def run_folders(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run folder, and the run folders directly inside each path that is not one."""
    found = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(p for p in path.iterdir() if (p / "config.yaml").is_file())
            if not inside:
                raise ResidualError(f"{path}: neither a training run (no config.yaml) nor a folder of runs")
            found += inside
        else:
            raise ResidualError(f"{path}: no such folder; give training run folders (runs/train/NAME) or the "
                                f"folder that holds them")
    return found


def read_run(path: Path) -> RunRecord:
    config = flatten(load_config(path / "config.yaml").to_dict())  # with today's defaults for what it lacks
    history = read_metrics(path / "metrics.csv") if (path / "metrics.csv").is_file() else []
    best = None
    # A multi-label run records mAP where others record top-1: in metrics.csv, and in its model's metadata.
    score = "val_map" if any("val_map" in row for row in history) else "val_top1"
    if (path / "model.safetensors").is_file():
        metadata = read_metadata(path / "model.safetensors")
        score = "val_map" if metadata["multi_label"] else "val_top1"
        best = {key: metadata["extra"][key] for key in ("epoch", score, "val_loss") if key in metadata["extra"]}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    return RunRecord(path, config, history, best, summary, score)


def differing_settings(records: list[RunRecord]) -> list[str]:
    """The settings (flattened names) whose values are not the same in every run, in config order."""
    keys = list(dict.fromkeys(key for record in records for key in record.config))
    return [key for key in keys if key.split(".")[0] not in BOOKKEEPING
            and len({json.dumps(record.config.get(key), sort_keys=True) for record in records}) > 1]


def recipe_differences(record: RunRecord, differing: list[str]) -> str:
    """A run's values of the differing settings, each named by its last part where that is unambiguous:
    "lr=0.2, schedule=onecycle, drop_path_rate=0.1"."""
    short = [key.rsplit(".", 1)[-1] for key in differing]
    names = [name if short.count(name) == 1 else key for key, name in zip(differing, short)]
    return ", ".join(f"{name}={record.config.get(key, '-')}" for key, name in zip(differing, names))


def compare_runs(paths: list[str | Path]) -> tuple[list[RunRecord], list[str]]:
    """The runs at `paths` (run folders, or folders of them), best validation top-1 (multi-label runs: mAP)
    first, and the settings that differ between them."""
    records = [read_run(path) for path in run_folders(paths)]
    if len({record.score for record in records}) > 1:
        multi = [record.name for record in records if record.score == "val_map"]
        raise ResidualError(f"{', '.join(multi)}: multi-label, ranked by validation mAP, and the others by top-1; "
                            f"compare single-label runs and multi-label runs apart")
    records.sort(key=lambda record: -(record.best or {}).get(record.score, -1.0))  # runs without a model last
    return records, differing_settings(records)


@dataclass
class DataScore:
    """A run's kept model on the images runs are compared on."""
    record: RunRecord
    split: str  # the split of the data scored
    metric: str  # what `score` is: "top1", or a multi-label run's "map"
    score: float
    score_ci95: tuple[float, float]  # top-1's Wilson interval; mAP's bootstrap percentile interval
    correct: np.ndarray  # per image, whether its answer was right (multi-label: every one of its labels)
    versus_best: dict | None = None  # against the best run (None for the best): metrics.paired_comparison, and
    # for mAP the paired bootstrap's gap, interval and p-value
    replicates: np.ndarray | None = None  # mAP on each bootstrap resample, paired across the runs

    def to_dict(self) -> dict:
        return {"run": str(self.record.path), "split": self.split, "images": len(self.correct),
                self.metric: self.score, f"{self.metric}_ci95": list(self.score_ci95),
                "versus_best": self.versus_best}


def score_on_data(records: list[RunRecord], data: str | Path, split: str | None = None, device: str = "auto",
                  batch_size: int = 64, workers: int | None = None, progress: bool = False) -> list[DataScore]:
    """Each run's model.safetensors evaluated on the same images of `data` (`split` chosen as eval chooses;
    the flat folder a run trained on is split as it was, so its held-out images are scored), best top-1
    (multi-label: mAP) first, each compared with the best by McNemar's test (mAP: a paired bootstrap). Runs
    without a model yet are left out."""
    scores, sources, resamples = [], None, None
    for record in records:
        model_file = record.path / "model.safetensors"
        if not model_file.is_file():
            continue
        as_trained = split_as_trained(model_file, data)
        model = load_model(model_file).to(pick_device(device))
        result = evaluate(model, as_trained or data, split or ("val" if as_trained else None), batch_size=batch_size,
                          gallery_size=0, workers=workers, progress=progress)
        if sources is not None and result.sources != sources:
            raise ResidualError(f"{data}: {record.name} was scored on other images than {scores[0].record.name}, "
                                f"so their answers cannot be paired (runs trained on this flat folder with another "
                                f"--val-split or seed hold out other images); give data with a test split, or --split")
        sources = result.sources
        if result.score_name == "top1":
            scores.append(DataScore(record, result.split, "top1", result.score(), tuple(result.metrics["top1_ci95"]),
                                    result.right()))
            continue
        if resamples is None:
            resamples = bootstrap_indices(len(result.labels))
        replicates = bootstrap_maps(result.probs, result.labels, resamples)
        scores.append(DataScore(record, result.split, "map", result.score(), percentile_interval(replicates),
                                result.right(), replicates=replicates))
    if not scores:
        raise ResidualError("none of the runs has a model.safetensors yet: nothing to score")
    scores.sort(key=lambda score: -score.score)
    best = scores[0]
    for score in scores[1:]:
        score.versus_best = paired_comparison(best.correct, score.correct)
        if score.metric == "map":  # McNemar counts exact matches; the gap in mAP is the bootstrap's to judge
            score.versus_best |= {"difference": best.score - score.score, "test": "paired bootstrap",
                                  **paired_bootstrap(best.replicates, score.replicates)}
    return scores
