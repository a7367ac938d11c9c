"""Published training recipes, shipped as config files: `residual train DATA --recipe rsb-a3`.

Each is a YAML file of training options in src/residual/recipes/ (the layout of a run's config.yaml, without
data), whose first comment line says where it comes from and what it reached, and the second how it differs
from the original. A recipe is a starting point like `--config`: flags override it.
"""

from __future__ import annotations

from importlib.resources import files

from ..errors import ConfigError
from .config import read_config

RECIPES = ("he2015-cifar", "zagoruyko2016-cifar", "xie2017-cifar", "torchvision-v1", "rsb-a1", "rsb-a2", "rsb-a3")


def recipe_file(name: str):
    """The shipped file of recipe `name`."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return files("residual") / "recipes" / f"{name}.yaml"


def recipe_options(name: str) -> dict:
    """Recipe `name`'s training options, as `--config` would read them."""
    return read_config(recipe_file(name))


def recipe_notes(name: str) -> tuple[str, str]:
    """(where the recipe comes from and what it reached, how it differs from the original): its first two
    comment lines."""
    lines = [line.removeprefix("#").strip() for line in recipe_file(name).read_text().splitlines()
             if line.startswith("#")]
    return lines[0], lines[1]
