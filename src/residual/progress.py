"""What long work shows: the one progress bar (what is running, a bar, done/total, items per second,
time left) and the console its messages go to."""

from __future__ import annotations

import io
import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


# Off a terminal (a log, a pipe) no window sets the width, and rich's 80 columns squeeze the wider tables
# (`residual models`, predict's paths) into folded cells; up to this many they keep their natural width.
LOG_WIDTH = 160


def message_console(**options) -> Console:
    """The console for a task's messages (an epoch's line, a warning): a long line stays one line, for
    logs and grep, where rich would break it at the width; tables fit the terminal, or LOG_WIDTH off one
    (COLUMNS, where set, rules both)."""
    console = Console(soft_wrap=True, **options)
    if not (console.is_terminal or console.is_jupyter or "width" in options or "COLUMNS" in os.environ):
        console.width = LOG_WIDTH
    return console


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} {self.unit}" if task.speed else "", style="progress.data.speed")


def transient_bar(*columns: ProgressColumn | str, enabled: bool = True, console: Console | None = None) -> Progress:
    """A rich Progress of `columns` that disappears when done, on stderr unless `console` says otherwise,
    so results written to stdout stay clean. Off where the output is neither a terminal nor a notebook
    (a log file, a pipe): rich cannot redraw there and would leave one blank line per bar."""
    console = console or Console(stderr=True)
    shown = enabled and (console.is_terminal or console.is_jupyter)
    return Progress(*columns, console=console, disable=not shown, transient=True)


def progress_bar(label: str, enabled: bool = True, unit: str = "img/s", console: Console | None = None) -> Progress:
    """The bar of a long loop: `label`, a bar, done/total, items per second, time left; use as a context
    manager (`add_task`, `advance`, `track`)."""
    return transient_bar(TextColumn(label), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                         TimeRemainingColumn(), enabled=enabled, console=console)


class PrefixedLines(io.TextIOBase):
    """A text stream that writes each whole line to `stream` with `prefix` before it: the lines of several
    processes writing to one terminal at once (residual tune --jobs) stay told apart."""

    def __init__(self, stream: io.TextIOBase, prefix: str):
        super().__init__()
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:  # in one write, so another process's line never lands inside one of these
            self.stream.write("".join(f"{self.prefix}{line}\n" if line else "\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
