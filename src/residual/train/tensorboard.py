"""A run for TensorBoard (`--tensorboard`): RUN/tensorboard/, read by `tensorboard --logdir runs`.

torch.utils.tensorboard writes the event files; it needs the tensorboard package, an optional dependency
(`pip install residual[tensorboard]`). Each epoch's row of metrics.csv becomes scalars at step = the epoch:
train/loss, val/top1 (val/map for multi-label), lr, run/images_per_s and so on. Each optimizer step's loss
and learning rate go to the sub-run tensorboard/steps as step/train_loss and step/lr, at step = the
optimizer step (under torchrun: the main worker's share of each batch), as the trainer reads them back
(twice a second; no extra wait for the device). A resumed run drops what an earlier process wrote from the
first epoch (or step) it writes again (SummaryWriter's purge_step), so an epoch cut short by a kill is not
shown twice.

The recipe (config.yaml) is the text "config" at step 0. At the end the run's pictures (train_batch.png, the
report's confusion matrix and the rest) become images at the last epoch, and the recipe's settings with the
best epoch's validation numbers go to the HParams dashboard (the sub-run tensorboard/hparams, written anew
when a resumed run ends), so runs can be sorted and filtered by any setting.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .config import flatten


class TensorBoardLog:
    def __init__(self, folder: Path, recipe: str = ""):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard: TensorBoard's event files are written by the tensorboard package, "
                              "which is not installed: pip install tensorboard (or residual[tensorboard])") from None
        self.folder, self.recipe, self.writer_class, self.writer = folder, recipe, SummaryWriter, None
        self.step_writer = None  # the sub-run tensorboard/steps: its x axis counts optimizer steps, not epochs

    def add_epoch(self, row: dict) -> None:
        """One epoch's numbers (a metrics.csv row) as scalars, written through at once."""
        if self.writer is None:  # from this process's first epoch on, earlier processes' events are replaced
            self.writer = self.writer_class(str(self.folder), purge_step=row["epoch"])
            if row["epoch"] == 1 and self.recipe:  # a resumed run's recipe is already there, at step 0
                self.writer.add_text("config", "    " + self.recipe.rstrip().replace("\n", "\n    "), 0)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(scalar_tag(key), value, row["epoch"])
        self.writer.flush()
        if self.step_writer is not None:
            self.step_writer.flush()

    def add_steps(self, steps: list[tuple[int, float, float]]) -> None:
        """Optimizer steps' (number, loss, learning rate) as step/train_loss and step/lr, at step = the number.
        A writer of their own, so each purges what an earlier process wrote past its own resume point."""
        if not steps:
            return
        if self.step_writer is None:
            self.step_writer = self.writer_class(str(self.folder / "steps"), purge_step=steps[0][0])
        for number, loss, lr in steps:
            self.step_writer.add_scalar("step/train_loss", loss, number)
            self.step_writer.add_scalar("step/lr", lr, number)

    def finish(self, config: dict, best: dict, best_epoch: int, pictures: list[Path], step: int) -> None:
        """The run's pictures as images at `step`, and its settings (`config`, TrainConfig.to_dict()) beside
        the best epoch's validation numbers for the HParams dashboard."""
        if self.writer is None:  # no epoch ran in this process
            self.writer = self.writer_class(str(self.folder), purge_step=step + 1)
        for picture in pictures:
            with Image.open(picture) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"pictures/{picture.stem}", pixels, step, dataformats="HWC")
        self.writer.flush()
        if best:
            shutil.rmtree(self.folder / "hparams", ignore_errors=True)  # a resumed run's end replaces its own
            metrics = {f"best/{key}": value for key, value in best.items()
                       if key.startswith("val_") and isinstance(value, (int, float))}
            self.writer.add_hparams(hyperparameters(config), {**metrics, "best/epoch": best_epoch},
                                    run_name="hparams")

    def close(self, status: str = "FINISHED") -> None:
        """Write out and close the event files (`status`, how the run ended, is for trackers that keep it)."""
        for writer in (self.writer, self.step_writer):
            if writer is not None:
                writer.close()


def scalar_tag(column: str) -> str:
    """metrics.csv's column -> TensorBoard's tag, grouped: train_loss -> train/loss, val_top1 -> val/top1,
    lr -> lr, images_per_s -> run/images_per_s."""
    if column.startswith(("train_", "val_")):
        return column.replace("_", "/", 1)
    return column if column == "lr" else f"run/{column}"


def hyperparameters(config: dict) -> dict:
    """A recipe's settings as the HParams dashboard takes them: one level ("optim.lr"), lists as text; a
    setting left unset (None) is left out, as the dashboard cannot show None beside the values of other runs."""
    return {key: str(value) if isinstance(value, (list, tuple, dict)) else value
            for key, value in flatten(config).items() if value is not None}
