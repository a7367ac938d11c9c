"""A run in Weights & Biases (`--wandb [PROJECT]`): what the run directory holds, also in a team's W&B project.

W&B's own client (`pip install wandb`, or residual[wandb]) sends it to PROJECT (or WANDB_PROJECT's, default
"residual"), under WANDB_ENTITY where set, as a run named after the run directory, in the group `--group` names
(a tune search's trials: the search's). Its local files go to RUN/wandb/; with WANDB_MODE=offline the run is
kept there, for `wandb sync RUN/wandb/offline-run-*` later.
- the recipe's settings as the run's config, nested as in config.yaml (W&B shows `optim.lr`), unset ones left
  out;
- each optimizer step's loss and learning rate as `step/train_loss` and `step/lr` at W&B's step = the optimizer
  step, and each epoch's row of metrics.csv under its column names (`val_top1`, `lr` ...) with `epoch` as their
  x axis;
- at the end the best epoch's validation numbers in the run's summary (`best/val_top1`, `best/epoch`), the
  run's pictures as images (`pictures/confusion_matrix` ...), the model file with its config.yaml as a
  versioned model artifact (aliases `best`, `latest`), and config.yaml, metrics.csv, summary.json, curves.png
  and report.html as the run's files;
- how it ended: finished (exit code 0); failed (1); stopped by a signal (130, as the command exits), marked as
  preempting, which W&B keeps resumable.

RUN/wandb.json keeps the run's id, so `residual train --resume` goes on in the same W&B run; steps W&B already
has (a run killed mid-epoch resumes from its last checkpoint) are not sent again, since W&B keeps a run's steps
increasing. W&B's client sends in the background and retries a lost server itself; a call that fails anyway
is said once and the training goes on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_path
from ..errors import TrackingError
from .remote_log import RemoteLog, first_line

RUN_RECORD = "wandb.json"
DEFAULT_PROJECT = "residual"
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "curves.png", "report.html")
KILLED_EXIT_CODE = 130  # what `residual train` exits with when a signal stops it


class WandbLog(RemoteLog):
    def __init__(self, run_dir: Path, project: str, group: str | None, config: dict, warn: Callable[[str], None]):
        try:
            import wandb
        except ImportError:
            raise TrackingError("--wandb: runs are sent to Weights & Biases by its client, which is not installed: "
                                "pip install wandb (or residual[wandb])") from None
        super().__init__("--wandb", run_dir, warn)
        self.wandb = wandb
        record = run_dir / RUN_RECORD
        resumed = json.loads(record.read_text()) if record.is_file() else {}
        project = resumed.get("project") or project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        settings = unset_left_out(config)
        try:
            self.run = wandb.init(
                project=project, entity=resumed.get("entity") or None, id=resumed.get("run_id"),
                resume="allow" if resumed else None, name=run_dir.name, group=group, dir=run_dir, job_type="train",
                config=None if resumed else settings, reinit="create_new",  # a run of its own, in any process
                # W&B's console capture would wrap the progress bar's terminal; its own banners are left out.
                settings=wandb.Settings(console="off", quiet=True))
            if resumed:  # the recipe a resumed run goes on with (--epochs may have grown)
                self.run.config.update(settings, allow_val_change=True)
        except Exception as error:  # not logged in, a server it could not reach, a project it may not write to
            if getattr(self, "run", None) is not None:  # begun, then failed: not left running
                self.run.finish(exit_code=1)
            raise TrackingError(f"--wandb: {first_line(error).rstrip('.')}; log in (`wandb login`, or WANDB_API_KEY), "
                                f"keep the run on this machine with WANDB_MODE=offline, or leave --wandb out") from None
        url = None if self.run.offline else self.run.url  # W&B says itself where an offline run is kept
        self.where = url or f"{run_dir / 'wandb'} (offline: `wandb sync` sends it)"
        # W&B's step only grows: a resumed run's steps up to its last one are there already.
        self.step = self.run.step
        self.epoch_keys: set[str] = set()
        self.run.define_metric("epoch", hidden=True)
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps({"project": self.run.project, "entity": self.run.entity,
                                       "run_id": self.run.id, "url": url}, indent=2))
        if url:
            warn(f"W&B run: {url}")

    def add_epoch(self, row: dict) -> None:
        """One epoch's numbers (a metrics.csv row), at the last optimizer step sent, with `epoch` as x axis."""
        values = {key: value for key, value in row.items() if isinstance(value, (int, float))}
        for key in values.keys() - self.epoch_keys - {"epoch"}:
            self._call(lambda: self.run.define_metric(key, step_metric="epoch"), key)
        self.epoch_keys |= values.keys()
        self._call(lambda: self.run.log(values, step=self.step), f"epoch {row['epoch']}")

    def add_steps(self, steps: list[tuple[int, float, float]]) -> None:
        """Optimizer steps' (number, loss, learning rate) as step/train_loss and step/lr at W&B's step."""
        for number, loss, lr in steps:
            if number >= self.step:
                self._call(lambda: self.run.log({"step/train_loss": loss, "step/lr": lr}, step=number), "steps")
                self.step = number

    def finish(self, config: dict, best: dict, best_epoch: int, pictures: list[Path], step: int) -> None:
        """The best epoch's numbers, the pictures, the model and the run's files."""
        numbers = {f"best/{key}": value for key, value in best.items()
                   if key.startswith("val_") and isinstance(value, (int, float))}
        if best:
            self._call(lambda: self.run.summary.update({**numbers, "best/epoch": best_epoch}), "the best epoch")
        if pictures:
            images = {f"pictures/{path.stem}": self.wandb.Image(str(path)) for path in pictures}
            self._call(lambda: self.run.log(images, step=self.step), "the pictures")
        model = self.run_dir / "model.safetensors"
        if model.is_file():
            artifact = self.wandb.Artifact(artifact_name(self.run_dir.name), type="model",
                                           metadata={"best_epoch": best_epoch, **numbers})
            for path in (model, self.run_dir / "config.yaml"):
                if path.is_file():
                    artifact.add_file(str(path))
            self._call(lambda: self.run.log_artifact(artifact, aliases=["best", "latest"]), "the model")
        for path in [self.run_dir / name for name in RUN_FILES]:
            if path.is_file():  # W&B sends what its run folder holds when the run ends
                self._call(lambda: shutil.copy2(path, Path(self.run.dir) / path.name), path.name)

    def close(self, status: str = "FINISHED") -> None:
        """End the W&B run: finished, failed, or preempting where a signal stopped it (to be resumed)."""
        if status == "KILLED":
            self._call(self.run.mark_preempting, "the run's end")
        exit_code = {"FINISHED": 0, "KILLED": KILLED_EXIT_CODE}.get(status, 1)
        self._call(lambda: self.run.finish(exit_code=exit_code), "the run's end")
        self._say_lost()


def unset_left_out(config: dict) -> dict:
    """The recipe without its unset (None) settings, at every level."""
    return {key: unset_left_out(value) if isinstance(value, dict) else value
            for key, value in config.items() if value is not None}


def artifact_name(run_name: str) -> str:
    """A W&B artifact's name: letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^\w.-]", "-", run_name) + "-model"
