"""`residual compare`: training runs side by side, with what differs between their recipes.

Each run is read from what training left in its folder: config.yaml (the recipe), metrics.csv (the
curves), model.safetensors (whose metadata records the best epoch and its validation scores, so a run
that is still going or was interrupted counts too) and summary.json (whether it finished).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ResidualError
from ..weights import read_metadata
from .config import load_config
from .history import read_metrics

# Settings that say where a run went or how it talked, not how it trained: never a difference worth naming.
BOOKKEEPING = ("name", "out", "quiet", "report", "checkpoint_every")


@dataclass
class RunRecord:
    path: Path
    config: dict  # config.yaml as a TrainConfig, flattened: {"optim.lr": 0.1, ...}
    history: list[dict]  # metrics.csv's rows
    best: dict | None  # the kept model's epoch and validation scores; None before the first epoch ends
    summary: dict | None  # summary.json, written when the run ended (all its epochs, or early stopping)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seconds(self) -> float:
        return sum(row.get("epoch_seconds", 0.0) for row in self.history)  # a column older runs may lack

    @property
    def state(self) -> str:
        """How far it got: "12/12", "7/30 stopped early", or "3/12 unfinished" (interrupted, or still going)."""
        done = f"{len(self.history)}/{self.config['epochs']}"
        if self.summary is None:
            return f"{done} unfinished"
        return f"{done} stopped early" if self.summary["stopped_early"] else done


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested settings as one level: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1} (an empty one sets nothing)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
    if (path / "model.safetensors").is_file():
        extra = read_metadata(path / "model.safetensors")["extra"]
        best = {key: extra[key] for key in ("epoch", "val_top1", "val_loss") if key in extra}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    return RunRecord(path, config, history, best, summary)


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
    """The runs at `paths` (run folders, or folders of them), best validation top-1 first, and the
    settings that differ between them."""
    records = [read_run(path) for path in run_folders(paths)]
    records.sort(key=lambda record: -(record.best or {}).get("val_top1", -1.0))  # runs without a model last
    return records, differing_settings(records)
