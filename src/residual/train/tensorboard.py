"""A run's epochs as TensorBoard scalars (`--tensorboard`): RUN/tensorboard/, read by `tensorboard --logdir runs`.

torch.utils.tensorboard writes the event files; it needs the tensorboard package, an optional dependency
(`pip install residual[tensorboard]`). Each epoch's row of metrics.csv becomes scalars at step = the epoch:
train/loss, val/top1 (val/map for multi-label), lr, run/images_per_s and so on. A resumed run drops what an
earlier process wrote from the first epoch it writes again (SummaryWriter's purge_step), so an epoch cut
short by a kill is not shown twice.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


class TensorBoardLog:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard: TensorBoard's event files are written by the tensorboard package, "
                              "which is not installed: pip install tensorboard (or residual[tensorboard])") from None
        self.folder, self.writer_class, self.writer = folder, SummaryWriter, None

    def add_epoch(self, row: dict) -> None:
        """One epoch's numbers (a metrics.csv row) as scalars, written through at once."""
        if self.writer is None:  # from this process's first epoch on, earlier processes' events are replaced
            self.writer = self.writer_class(str(self.folder), purge_step=row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(scalar_tag(key), value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scalar_tag(column: str) -> str:
    """metrics.csv's column -> TensorBoard's tag, grouped: train_loss -> train/loss, val_top1 -> val/top1,
    lr -> lr, images_per_s -> run/images_per_s."""
    if column.startswith(("train_", "val_")):
        return column.replace("_", "/", 1)
    return column if column == "lr" else f"run/{column}"
