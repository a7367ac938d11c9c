"""Pictures written to PNG files: every plot the toolkit draws is made here and saved through here.

They are matplotlib's object-oriented `Figure`s, never pyplot's: pyplot keeps process-wide state (a
backend, a registry of open figures) that a library must leave to its user (importing residual used to
switch a notebook's inline backend to Agg) and that threads would share. matplotlib is imported when the
first figure is made, not with the package: its import takes about 0.4 s, which commands that draw nothing
(predict, info, serve) should not pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLOURS = tuple(f"C{index}" for index in range(10))  # matplotlib's default colour cycle, by name


def new_figure(**options) -> Figure:
    """A figure on no backend and in no registry (`options` as matplotlib's Figure: figsize, layout ...)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def save_png(figure: Figure, path: Path, dpi: int = 110) -> None:
    """Write `figure` to `path` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def colour_map(name: str):
    """matplotlib's colour map `name` (a function from values in [0, 1] to RGBA rows)."""
    from matplotlib import colormaps

    return colormaps[name]
