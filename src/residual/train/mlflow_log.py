"""A run in MLflow (`--mlflow [URI]`): what the run directory holds, also in a team's tracking server.

MLflow's own client (`pip install mlflow-skinny`, or residual[mlflow]) sends it to the tracking URI given, or
where MLFLOW_TRACKING_URI says, into the experiment MLFLOW_EXPERIMENT_NAME names (default "residual"), as a run
named after the run directory (tagged residual.group with `--group`'s name):
- the recipe's settings as parameters, one level deep (`optim.lr`), unset ones left out;
- each epoch's row of metrics.csv as metrics at step = the epoch (`train_loss`, `val_top1`, `lr` ...), and each
  optimizer step's loss and learning rate as `step/train_loss` and `step/lr` at step = the optimizer step;
- at the end the best epoch's validation numbers as `best/val_top1` ..., and the run's files as artifacts: the
  model file, config.yaml, metrics.csv, summary.json, the pictures and report.html;
- the run's status: FINISHED, KILLED where a signal stopped it (it can be resumed), FAILED where an error did.

A tune search is a run of its own, named after its folder, with its trials' runs nested under it (MLflow's
mlflow.parentRunId, which its UI shows as a tree) and all tagged residual.group with the search's name (or
`--group`'s): the searched ranges and the search's settings as parameters (`search.lr`: `0.01..0.3:log`),
each complete trial's score and the best so far as `trial/val_top1` and `best/val_top1` at step = the trial's
number, its budget as the tag residual.trials (raised by `tune --resume --trials N`), and at the end trials.csv,
best.yaml and search.png, with the best trial's number as the tag residual.best_trial.

RUN/mlflow.json (TUNE/mlflow.json) keeps the run's id, so `residual train --resume` (`residual tune --resume`)
goes on in the same MLflow run. The tracking server is asked once before training starts, and a server that
cannot be reached then is a one-line error (at once where nothing listens at its address, rather than after
MLflow's four minutes of retries); one lost in the middle of a run neither stops nor slows the training, whose
sends go from a thread of their own (remote_log): the failure is said once, the run's own files hold every
number, and what could not be sent is counted at the end.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from ..atomic import atomic_path
from ..errors import TrackingError
from .config import flatten
from .remote_log import RemoteLog, first_line

RUN_RECORD = "mlflow.json"
DEFAULT_EXPERIMENT = "residual"
GROUP_TAG = "residual.group"
SEARCH_TAG = "residual.search"  # on a tune search's run
TRIALS_TAG = "residual.trials"  # on a tune search's run: its budget, raised where a resumed search is given more
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI shows the run under that one
ARTIFACTS = ("model.safetensors", "config.yaml", "metrics.csv", "summary.json", "curves.png", "report.html")
CONNECT_SECONDS = 10.0  # how long a server's address may take to take a connection


class MlflowRun(RemoteLog):
    """An MLflow run kept in a folder's mlflow.json: started, or gone on with where the record says."""

    def __init__(self, folder: Path, uri: str, name: str, tags: dict, params: dict, warn: Callable[[str], None]):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("--mlflow: runs are sent to MLflow by its client, which is not installed: pip install "
                                "mlflow-skinny (or residual[mlflow])") from None
        client = MlflowClient(uri or None)  # None: MLFLOW_TRACKING_URI, or MLflow's default
        if (error := _connect_error(client.tracking_uri)) is not None:
            raise TrackingError(f"--mlflow {client.tracking_uri}: cannot connect ({error}); is the tracking server "
                                f"running there? Check the tracking URI (or MLFLOW_TRACKING_URI), or leave --mlflow "
                                f"out")
        super().__init__("--mlflow", folder, warn, in_background=True,
                         reachable=lambda: _connect_error(client.tracking_uri) is None)
        self.client, self.metric, self.where = client, Metric, client.tracking_uri
        record = folder / RUN_RECORD
        try:
            if record.is_file():  # a resumed run goes on in its MLflow run
                self.run_id = json.loads(record.read_text())["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            found = self.client.get_experiment_by_name(experiment_name)
            experiment = (found.experiment_id if found is not None
                          else self.client.create_experiment(experiment_name))
            tags = {"residual.run_dir": str(folder.resolve()), **tags}
            self.run_id = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()
                                                       if value is not None])
        except Exception as error:  # MLflow's own errors, and requests' for a server it could not reach
            raise TrackingError(f"--mlflow {self.client.tracking_uri}: {first_line(error)}; check the tracking URI "
                                f"(or MLFLOW_TRACKING_URI), or leave --mlflow out") from None
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps({"tracking_uri": self.client.tracking_uri, "experiment": experiment_name,
                                       "run_id": self.run_id}, indent=2))

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run as FINISHED, KILLED (stopped by a signal, to be resumed) or FAILED."""
        self._call(partial(self.client.set_terminated, self.run_id, status), "the run's end")
        self.send_the_rest()
        self._say_lost()

    def _log(self, values: list[tuple[str, float, int]], what: str) -> None:
        if values:
            now = int(time.time() * 1000)
            metrics = [self.metric(key, float(value), now, step) for key, value, step in values]
            self._call(partial(self.client.log_batch, self.run_id, metrics=metrics), what)

    def _send_files(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_file():
                self._call(partial(self.client.log_artifact, self.run_id, str(path)), path.name)


class MlflowLog(MlflowRun):
    """A training run. `parent`: the id of the MLflow run it is nested under (a tune search's)."""

    def __init__(self, run_dir: Path, uri: str, group: str | None, config: dict, warn: Callable[[str], None],
                 parent: str | None = None):
        tags = {**({GROUP_TAG: group} if group else {}), **({PARENT_TAG: parent} if parent else {})}
        super().__init__(run_dir, uri, run_dir.name, tags, flatten(config), warn)

    def add_epoch(self, row: dict) -> None:
        """One epoch's numbers (a metrics.csv row) as metrics at step = the epoch."""
        self._log([(key, value, row["epoch"]) for key, value in row.items()
                   if key != "epoch" and isinstance(value, (int, float))], f"epoch {row['epoch']}")

    def add_steps(self, steps: list[tuple[int, float, float]]) -> None:
        """Optimizer steps' (number, loss, learning rate) as step/train_loss and step/lr."""
        self._log([(name, value, number) for number, loss, lr in steps
                   for name, value in (("step/train_loss", loss), ("step/lr", lr))], "steps")

    def finish(self, config: dict, best: dict, best_epoch: int, pictures: list[Path], step: int) -> None:
        """The best epoch's validation numbers, and the run's files (`config`: sent as parameters at the start)."""
        self._log([(f"best/{key}", value, best_epoch) for key, value in best.items()
                   if key.startswith("val_") and isinstance(value, (int, float))]
                  + ([("best/epoch", best_epoch, step)] if best else []), "the best epoch")
        self._send_files([self.run_dir / name for name in ARTIFACTS] + pictures)


class MlflowSearchLog(MlflowRun):
    """A tune search (TUNE/mlflow.json), its trials' runs nested under it: the search's settings as parameters,
    each complete trial's score and the best so far as metrics at step = the trial's number, and at the end its
    files. Each process of a parallel search sends its own trials' scores to the same run."""

    def __init__(self, tune_dir: Path, uri: str, group: str, settings: dict, warn: Callable[[str], None],
                 trials: int | None = None):
        """`trials`: the search's budget, a tag rather than a parameter, as `tune --resume --trials N` raises it
        (MLflow's parameters cannot change); None in the workers of a parallel search, which leave it as set."""
        super().__init__(tune_dir, uri, tune_dir.name, {GROUP_TAG: group, SEARCH_TAG: "true"}, settings, warn)
        if trials is not None:
            self._call(partial(self.client.set_tag, self.run_id, TRIALS_TAG, str(trials)), "the search's budget")

    def add_trial(self, number: int, monitor: str, score: float, best: float) -> None:
        self._log([(f"trial/{monitor}", score, number), (f"best/{monitor}", best, number)], f"trial {number}")

    def finish(self, best_trial: int | None, files: list[Path]) -> None:
        """The best trial's number (None: no trial completed), and the search's files."""
        if best_trial is not None:
            self._call(partial(self.client.set_tag, self.run_id, "residual.best_trial", str(best_trial)),
                       "the best trial")
        self._send_files(files)


def _connect_error(uri: str) -> str | None:
    """Why the server's address takes no connection (None: it does, or the URI is no address: a folder,
    Databricks). Asked before the run starts, where MLflow's client would retry for about four minutes first, and
    where a send at the end is slow."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=CONNECT_SECONDS).close()
    except OSError as error:
        return error.strerror or (f"no answer in {CONNECT_SECONDS:g} s" if isinstance(error, TimeoutError)
                                  else type(error).__name__)
    return None
