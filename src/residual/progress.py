"""The one progress bar: what is running, a bar, done/total, items per second, time left."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} {self.unit}" if task.speed else "", style="progress.data.speed")


def progress_bar(label: str, enabled: bool = True, unit: str = "img/s", console: Console | None = None) -> Progress:
    """A transient bar labelled `label`, on stderr unless `console` says otherwise, so results written
    to stdout stay clean; use as a context manager (`add_task`, `advance`, `track`)."""
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), RateColumn(unit), TimeRemainingColumn(),
                    console=console or Console(stderr=True), disable=not enabled, transient=True)
