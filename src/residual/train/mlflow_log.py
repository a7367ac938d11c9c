"""A run in MLflow (`--mlflow [URI]`): what the run directory holds, also in a team's tracking server.

MLflow's own client (`pip install mlflow-skinny`, or residual[mlflow]) sends it to the tracking URI given, or
where MLFLOW_TRACKING_URI says, into the experiment MLFLOW_EXPERIMENT_NAME names (default "residual"), as a run
named after the run directory (tagged residual.group with `--group`'s name; a tune search's trials, the search's):
- the recipe's settings as parameters, one level deep (`optim.lr`), unset ones left out;
- each epoch's row of metrics.csv as metrics at step = the epoch (`train_loss`, `val_top1`, `lr` ...), and each
  optimizer step's loss and learning rate as `step/train_loss` and `step/lr` at step = the optimizer step;
- at the end the best epoch's validation numbers as `best/val_top1` ..., and the run's files as artifacts: the
  model file, config.yaml, metrics.csv, summary.json, the pictures and report.html;
- the run's status: FINISHED, KILLED where a signal stopped it (it can be resumed), FAILED where an error did.

RUN/mlflow.json keeps the run's id, so `residual train --resume` goes on in the same MLflow run. The tracking
server is asked once before training starts, and a server that cannot be reached then is a one-line error;
one lost in the middle of a run does not stop the training: the failure is said once, the run's own files
hold every number, and what could not be sent is counted at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_path
from ..errors import ConfigError
from .config import flatten
from .remote_log import RemoteLog, first_line

RUN_RECORD = "mlflow.json"
DEFAULT_EXPERIMENT = "residual"
ARTIFACTS = ("model.safetensors", "config.yaml", "metrics.csv", "summary.json", "curves.png", "report.html")


class MlflowLog(RemoteLog):
    def __init__(self, run_dir: Path, uri: str, group: str | None, config: dict, warn: Callable[[str], None]):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("--mlflow: runs are sent to MLflow by its client, which is not installed: pip install "
                              "mlflow-skinny (or residual[mlflow])") from None
        super().__init__("--mlflow", run_dir, warn)
        self.metric = Metric
        self.client = MlflowClient(uri or None)  # None: MLFLOW_TRACKING_URI, or MLflow's default
        self.where = self.client.tracking_uri
        record = run_dir / RUN_RECORD
        try:
            if record.is_file():  # a resumed run goes on in its MLflow run
                self.run_id = json.loads(record.read_text())["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
            tags = {"residual.run_dir": str(run_dir.resolve()), **({"residual.group": group} if group else {})}
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name, tags=tags).info.run_id
            params = [Param(key, str(value)) for key, value in flatten(config).items() if value is not None]
            self.client.log_batch(self.run_id, params=params)
        except Exception as error:  # MLflow's own errors, and requests' for a server it could not reach
            raise ConfigError(f"--mlflow {self.client.tracking_uri}: {first_line(error)}; check the tracking URI "
                              f"(or MLFLOW_TRACKING_URI), or leave --mlflow out") from None
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps({"tracking_uri": self.client.tracking_uri, "experiment": name,
                                       "run_id": self.run_id}, indent=2))

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
        for path in [self.run_dir / name for name in ARTIFACTS] + pictures:
            if path.is_file():
                self._call(lambda: self.client.log_artifact(self.run_id, str(path)), path.name)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run as FINISHED, KILLED (stopped by a signal, to be resumed) or FAILED."""
        self._call(lambda: self.client.set_terminated(self.run_id, status), "the run's end")
        self._say_lost()

    def _log(self, values: list[tuple[str, float, int]], what: str) -> None:
        if values:
            now = int(time.time() * 1000)
            metrics = [self.metric(key, float(value), now, step) for key, value, step in values]
            self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics), what)
