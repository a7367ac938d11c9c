"""Errors a user can act on. Their message names the file or option and what to do;
the command line prints it as one line and exits non-zero, with no traceback."""


class ResidualError(Exception):
    """Base of every error meant for the user rather than for a developer."""


class ConfigError(ResidualError, ValueError):
    """An option has a value the model or task cannot use."""


class TrackingError(ConfigError):
    """A run tracker (--mlflow, --wandb) whose client is missing or whose service would not start the run: not a
    fault of the recipe, so a search stops on it rather than count the trial's settings as refused."""


class NoSpaceError(ResidualError):
    """A file could not be written for want of disk space (or quota); the file it replaces is untouched."""
