"""What the logs that send a run to a tracking service (MLflow, Weights & Biases) share: a send that fails is
said the first time and counted, and the training goes on; the run directory holds every number anyway."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class RemoteLog:
    def __init__(self, flag: str, run_dir: Path, warn: Callable[[str], None]):
        self.flag, self.run_dir, self.warn, self.lost = flag, run_dir, warn, 0
        self.where = ""  # the service, as messages name it; set once it is known

    def _call(self, send: Callable[[], object], what: str) -> None:
        """Send, and where it fails say so the first time and go on: the training matters more than its log."""
        try:
            send()
        except Exception as error:  # the service's errors and a lost connection alike
            self.lost += 1
            if self.lost == 1:
                self.warn(f"{self.flag}: sending {what} to {self.where} failed ({first_line(error)}); training goes "
                          f"on, and the run directory keeps every number")

    def _say_lost(self) -> None:
        if self.lost:
            self.warn(f"{self.flag}: {self.lost} of the run's sends to {self.where} failed; the run directory "
                      f"{self.run_dir} holds everything")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
