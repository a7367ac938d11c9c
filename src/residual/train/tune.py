"""Hyperparameter search (`residual tune`): training runs whose settings Optuna proposes, the poor ones
stopped early.

Each trial is an ordinary training run (TUNE/trials/trial-NNN) of the recipe given, with the searched
settings drawn by Optuna's TPE sampler (at random for the first trials). After every epoch a trial reports
its `monitor` score, and the pruner ends a trial that falls behind: by default the median rule (a trial
below the median of the earlier trials at the same epoch), or Hyperband. So most of the time goes to the
promising settings. Every trial trains from the same seed: two trials differ in their settings, not in their
luck. The first trial trains with residual train's own choice of the searched settings (where it lies in
the ranges searched), the yardstick the others are measured against. A trial whose loss became NaN counts as
pruned at once, so the sampler learns to avoid its settings.

The study is Optuna's journal, TUNE/study.log: appended to and fsync'd trial event by trial event, so a kill
loses nothing but the epoch in flight. `residual tune --resume TUNE` goes on: a trial cut short continues
from its last.pt, as a new trial with the same settings. After every trial: trials.csv (each trial's
settings, score, epochs and how it ended), best.yaml (the best trial's recipe, which `residual train
--config TUNE/best.yaml` trains again) and search.png (the scores by trial, per epoch and by setting).
A finished trial keeps its model.safetensors and drops last.pt (a ResNet-50's weights and optimizer, about
200 MB a trial), which only a resume would need.

With `jobs` > 1, that many worker processes train trials at once (on the GPUs in turn), all drawing from and
reporting to the one journal.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from rich.console import Console

from ..atomic import atomic_path
from ..data.datasets import data_name, open_dataset
from ..data.loaders import decoding_workers
from ..data.transforms import AugmentConfig
from ..errors import ConfigError, ResidualError, TrackingError
from ..figures import new_figure, save_png
from ..models import ResNetConfig
from ..progress import PrefixedLines, message_console
from ..runs import new_run_dir, pick_device
from .config import AUTO_RECORD, TrainConfig, flatten, plain_yaml, read_config, resolve
from .mlflow_log import MlflowSearchLog
from .optim import OptimConfig
from .trainer import TrainingDiverged, TrainingInterrupted, train

PRUNERS = ("median", "hyperband", "none")
# PED-ANOVA compares the best 10% of trials with all: below this many complete trials it compares one.
IMPORTANCE_FROM = 10
SEARCH_DRAWN_EVERY_S = 30.0  # the least time between two drawings of search.png during a search (as curves.png)
# Settings a search does not vary: where the data and the outputs are, how the run is shown, and what only
# changes speed or the machine's use. The seed is the same for every trial on purpose (see above); the score,
# the validation images and the epochs (what the pruner compares trials at) are the same for all, so that
# scores compare.
NOT_SEARCHED = ("data", "model_options", "optim", "augment", "seed", "deterministic", "device", "amp",
                "channels_last", "compile", "compile_mode", "sync_bn", "workers", "in_memory", "decoder",
                "checkpoint_every", "keep_best", "max_bad_streak", "out", "name", "quiet", "report", "tensorboard",
                "mlflow", "wandb", "group", "monitor", "val_split", "epochs")
# The settings inside model_options a search can vary, and the flags that name settings otherwise.
MODEL_OPTIONS = ("stem", "drop_rate", "drop_path_rate", "block_drop_rate", "zero_init_residual")
FLAG_NAMES = {"pretrained": "from", "preset": "augment", "drop_path_rate": "drop-path"}
# What a worker of a parallel search (--jobs) sets for its trials alone: where they train, and the machine's
# decoding processes shared among the workers. Not part of the recipe: best.yaml has the search's own.
PLACEMENT = ("device", "workers", "quiet")


def searchable_settings() -> dict[str, tuple[str, str]]:
    """Each setting a search can vary, by its flag's name: (its dotted place in TrainConfig, its type)."""
    places = [(f.name, f.name, f.type) for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SEARCHED]
    places += [(f.name, f"optim.{f.name}", f.type) for f in dataclasses.fields(OptimConfig)]
    places += [(f.name, f"augment.{f.name}", f.type) for f in dataclasses.fields(AugmentConfig)]
    places += [(f.name, f"model_options.{f.name}", f.type) for f in dataclasses.fields(ResNetConfig)
               if f.name in MODEL_OPTIONS]
    return {FLAG_NAMES.get(name, name.replace("_", "-")): (place, str(kind)) for name, place, kind in places}


@dataclass(frozen=True)
class Searched:
    """One searched setting: a range of numbers (on a log scale if `log`) or a few choices."""
    name: str  # the flag's name, e.g. "weight-decay"
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()

    @classmethod
    def parse(cls, text: str) -> "Searched":
        """NAME=LOW..HIGH, NAME=LOW..HIGH:log or NAME=A,B,C (--search's syntax)."""
        name, sep, values = text.partition("=")
        name = name.strip().removeprefix("--")
        settings = searchable_settings()
        if not sep or not values.strip():
            raise ConfigError(f"--search {text}: give NAME=LOW..HIGH, NAME=LOW..HIGH:log or NAME=A,B,C, "
                              f"e.g. lr=0.01..0.3:log or optimizer=sgd,adamw")
        if name not in settings:
            raise ConfigError(f"--search {text}: {name!r} is not a setting a search can vary; those are: "
                              f"{', '.join(sorted(settings))}")
        kinds = {part.strip() for part in settings[name][1].split("|")} - {"None"}
        if ".." not in values:
            choices = tuple(_choice(value.strip()) for value in values.split(","))
            if len(set(map(repr, choices))) < 2:
                raise ConfigError(f"--search {text}: give two or more different choices, separated by commas")
            return cls(name, choices=choices)
        span, _, scale = values.partition(":")
        if scale.strip() not in ("", "log"):
            raise ConfigError(f"--search {text}: a range ends with :log (a log scale) or nothing, not :{scale}")
        integer = kinds == {"int"}
        if kinds not in ({"int"}, {"float"}):
            raise ConfigError(f"--search {text}: --{name} is not a number; give its choices: {name}=A,B")
        try:
            low, high = (float(bound) for bound in span.split(".."))
        except ValueError:
            raise ConfigError(f"--search {text}: the range's ends must be numbers, as in {name}=0.01..0.3") from None
        if integer and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"--search {text}: --{name} counts whole numbers; give whole ends")
        log = scale.strip() == "log"
        if not low < high or (log and low <= 0):
            raise ConfigError(f"--search {text}: the range needs LOW < HIGH" + (", both above 0 on a log scale"
                                                                                if log else ""))
        return cls(name, int(low) if integer else low, int(high) if integer else high, log, integer)

    def text(self) -> str:
        """Back to --search's syntax (how tune.yaml records it, so exactly)."""
        if self.choices:
            return f"{self.name}={','.join(yaml.safe_dump(choice).splitlines()[0] for choice in self.choices)}"
        return f"{self.name}={_exact(self.low)}..{_exact(self.high)}" + (":log" if self.log else "")

    def distribution(self, optuna):
        if self.choices:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.integer:
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


def _choice(text: str):
    """A choice as the value it names: a number (1e-3 too, which YAML reads as text), true/false, or text."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _round(number: float) -> float:
    """To 3 significant digits: a range's ends as people write them (0.15, not 0.15000000000000002)."""
    return float(f"{number:.3g}")


def _exact(number: float) -> str:
    """The number as short as it reads back the same: 0.01, not 0.010000000000000002 unless it is that."""
    short = f"{number:g}"
    return short if float(short) == number else repr(number)


def default_search(given: TrainConfig, resolved: TrainConfig) -> list[Searched]:
    """What `residual tune` searches when no --search is given: the learning rate, the weight decay and
    label smoothing around what `residual train` would choose, each unless the recipe fixes it."""
    searched, lr, decay = [], resolved.optim.lr, resolved.optim.weight_decay
    if given.optim.lr is None:
        searched.append(Searched("lr", _round(lr / 10), _round(lr * 3), log=True))
    if given.optim.weight_decay is None:
        searched.append(Searched("weight-decay", _round(decay / 10), _round(decay * 10), log=True))
    if given.label_smoothing == 0 and resolved.loss == "ce":
        searched.append(Searched("label-smoothing", 0.0, 0.2))
    return searched


def own_settings(space: list[Searched], resolved: TrainConfig) -> dict | None:
    """The searched settings' values in `resolved` (what residual train chooses), where all are known and in the
    search's ranges; None otherwise."""
    chosen, places = flatten(resolved.to_dict()), searchable_settings()
    values = {item.name: chosen.get(places[item.name][0]) for item in space}
    inside = all(value in item.choices if item.choices else
                 value is not None and not isinstance(value, bool) and item.low <= value <= item.high
                 for item, value in zip(space, values.values()))
    return values if inside else None


def with_settings(config: TrainConfig, values: dict) -> TrainConfig:
    """`config` with each searched setting (by flag name) set to its value."""
    options, settings = config.to_dict(), searchable_settings()
    for name, value in values.items():
        part, _, key = settings[name][0].rpartition(".")
        (options[part] if part else options)[key] = value
    return TrainConfig.from_dict(options)


@dataclass
class Trial:
    """A trial as trials.csv lists it."""
    number: int
    # complete, pruned, diverged, refused (settings that cannot go together), failed (out of GPU memory), cut short
    # (killed, and continued by another trial), running, waiting (queued to run next)
    state: str
    values: dict  # the searched settings
    score: float | None  # complete: the best epoch's monitor; pruned: the last epoch's
    epochs: int
    seconds: float | None
    run_dir: str
    note: str = ""
    baseline: bool = False  # residual train's own choice of the searched settings


@dataclass
class TuneResult:
    tune_dir: Path
    monitor: str
    best: Trial | None
    trials: list[Trial]
    importance: dict[str, float] = field(default_factory=dict)  # each setting's share in the best trials' scores

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.tune_dir / name for name in ("trials.csv", "best.yaml", "search.png", "study.log")}


def tune(config: TrainConfig | None = None, search: Sequence[str | Searched] = (), *, trials: int | None = None,
         pruner: str = "median", prune_from: int | None = None, time_limit: float | None = None, jobs: int = 1,
         out: str = "runs/tune", resume: str | Path | None = None, console: Console | None = None) -> TuneResult:
    """Search settings of `config` (`search`: --search texts or Searched; none: `default_search`) over
    `trials` training runs (default 20), pruned by `pruner` from epoch `prune_from` on (default: a third of the
    epochs, 2 at least); or go on with the search in folder `resume`. `time_limit`: minutes after which no
    new trial starts. `jobs`: trials trained at once, each in a process of its own (on the GPUs in turn)."""
    console = console or message_console()
    optuna = _optuna()
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if resume is not None:
        tune_dir = Path(resume)
        recorded, config, space = _recorded_search(tune_dir)
        pruner, monitor, epochs, prune_from = (recorded[key] for key in ("pruner", "monitor", "epochs", "prune_from"))
        if trials is not None and trials != recorded["trials"]:  # a new budget, kept for the next resume
            _write_record(tune_dir, {**recorded, "trials": trials})
        trials = trials or recorded["trials"]
        baseline = None  # enqueued when the search began
    else:
        if config is None:
            raise ConfigError("give a TrainConfig to tune, or resume=TUNE_DIR")
        if pruner not in PRUNERS:
            raise ConfigError(f"--pruner must be one of {PRUNERS}, got {pruner!r}")
        dataset = open_dataset(config.data, config.val_split, config.seed)
        resolved = resolve(config, dataset)
        space = [item if isinstance(item, Searched) else Searched.parse(item) for item in search]
        space = space or default_search(config, resolved)
        _check_space(space, config, dataset)
        _check_pruning(space, pruner)
        trials, monitor, epochs = trials or 20, resolved.monitor, resolved.epochs
        # The first epochs' scores sit near chance and say little (docs/tuning.md, Measured).
        prune_from = prune_from or min(epochs, max(2, epochs // 3))
        if not 1 <= prune_from <= epochs:
            raise ConfigError(f"--prune-from is the first epoch a trial can be stopped at: 1 to --epochs "
                              f"({epochs}), got {prune_from}")
        tune_dir = new_run_dir(out, config.name or f"{resolved.model}-{data_name(config.data)}")
        _write_record(tune_dir, {"config": config.to_dict(), "search": [item.text() for item in space],
                                 "trials": trials, "pruner": pruner, "prune_from": prune_from, "monitor": monitor,
                                 "epochs": epochs})
        baseline = own_settings(space, resolved)
    try:  # before the workers start, so that they go on in the one run it records
        search_log = (MlflowSearchLog(tune_dir, config.mlflow, search_group(config, tune_dir),
                                      _search_settings(config, space, pruner, prune_from, monitor, epochs),
                                      console.print, trials) if config.mlflow is not None else None)
    except TrackingError:  # no client, or a server that cannot be reached: a search not begun leaves no folder
        if resume is None:
            (tune_dir / "tune.yaml").unlink()
            tune_dir.rmdir()
        raise
    _drop_torn_line(tune_dir / "study.log")  # here, while no other process writes to it
    study = _open_study(optuna, tune_dir, monitor, pruner, prune_from, config.seed, epochs, trials, jobs > 1)
    if baseline:  # first, what residual train would do: the search's yardstick
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    _continue_cut_trials(study, optuna)
    search = Search(study, optuna, tune_dir, config, space, monitor, epochs, console, mlflow=search_log)
    devices = _worker_devices(config.device, jobs)
    console.print(f"{tune_dir}: up to {trials} trials of {epochs} epochs, searching "
                  f"{', '.join(item.text() for item in space)}; pruner: {pruner}"
                  + (f"; {jobs} trials at a time, on {', '.join(str(pick_device(d)) for d in devices)}"
                     if jobs > 1 else ""))
    try:
        if jobs == 1:
            search.run_trials(trials, time_limit)
        else:
            _run_workers(tune_dir, devices, trials, time_limit)
    except TrainingInterrupted as stop:  # the trials stay running in the study: a resume continues them
        search.write(final=True)
        search.end_log("KILLED")
        raise TrainingInterrupted(f"{stop}; the search goes on with: residual tune --resume {tune_dir}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: the journal still holds the search, to be resumed
        search.end_log("KILLED")
        raise
    except BaseException:
        search.end_log("FAILED")
        raise
    return search.finish()


def search_group(config: TrainConfig, tune_dir: Path) -> str:
    """The group of a search's trials in W&B and MLflow: --group's, or the search's folder's name."""
    return config.group or tune_dir.name


def _search_settings(config: TrainConfig, space: list[Searched], pruner: str, prune_from: int, monitor: str,
                     epochs: int) -> dict:
    """A search's MLflow parameters: each searched range, and how the search runs (each trial's run has its own
    settings; the budget, which a resume may raise, is a tag)."""
    return {**{f"search.{item.name}": item.text().split("=", 1)[1] for item in space}, "model": config.model,
            "data": config.data, "pruner": pruner, "prune_from": prune_from, "monitor": monitor, "epochs": epochs}


def _recorded_search(tune_dir: Path) -> tuple[dict, TrainConfig, list[Searched]]:
    """tune.yaml's record of a search, its recipe and what it searches."""
    recorded = _read_record(tune_dir)
    return recorded, TrainConfig.from_dict(recorded["config"]), [Searched.parse(text) for text in recorded["search"]]


def _worker_devices(device: str, jobs: int) -> list[str]:
    """Each of `jobs` trials-at-once' device: with --device auto or cuda, the GPUs in turn (one trial each when
    --jobs is their number); a device named outright (cpu, cuda:1) is everyone's."""
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    return [f"cuda:{index % gpus}" if gpus else device for index in range(jobs)]


# A worker stopped by a signal: after its trial's checkpoint (130), or by the signal itself while not training.
STOPPED_EXITS = (130, -signal.SIGINT, -signal.SIGTERM)


def _run_workers(tune_dir: Path, devices: list[str], trials: int, time_limit: float | None) -> None:
    """Train the search's trials in one process per device in `devices`, all drawing from and reporting to the
    study's journal, which Optuna's file lock keeps whole; wait for them. Ctrl-C reaches them too: each saves
    its trial's checkpoint, for a resume."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked process
    claim = context.Lock()
    workers = [context.Process(target=_work, name=f"residual tune worker {index}",
                               args=(tune_dir, index, devices, trials, time_limit, claim))
               for index in range(len(devices))]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except KeyboardInterrupt:  # SIGINT to this process alone (a terminal's Ctrl-C also reaches the workers)
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)  # not a second SIGINT, which stops a trainer unsaved
        for worker in workers:
            worker.join()
    codes = [worker.exitcode for worker in workers]
    if failed := [code for code in codes if code not in (0, *STOPPED_EXITS)]:
        raise ResidualError(f"{len(failed)} of {len(workers)} trial workers failed (exit codes "
                            f"{', '.join(map(str, codes))}; their errors are above); the trials so far are in "
                            f"{tune_dir}, and residual tune --resume {tune_dir} goes on")
    if any(code in STOPPED_EXITS for code in codes):
        raise TrainingInterrupted("stopped: the trials in flight saved their checkpoints")


def _work(tune_dir: Path, index: int, devices: list[str], trials: int, time_limit: float | None, claim) -> None:
    """A worker of a parallel search: trials until the budget is claimed, on `devices[index]`, with its share
    of the cores. `claim` makes taking a place in the budget and drawing its trial one step, so the workers
    never train more than `trials`."""
    signal.signal(signal.SIGTERM, _interrupt)  # between trials; a trial's own handler saves its checkpoint
    _stop_with_parent()
    jobs = len(devices)
    try:
        _place_worker(devices[index], jobs)
        recorded, config, space = _recorded_search(tune_dir)
        optuna = _optuna()
        # Each worker's sampler draws its own random first trials; later, the constant liar makes each steer
        # clear of the settings the other workers are training.
        study = _open_study(optuna, tune_dir, recorded["monitor"], recorded["pruner"], recorded["prune_from"],
                            config.seed + index, recorded["epochs"], trials, True)
        placement = {"device": devices[index], "quiet": True,
                     "workers": config.workers if config.workers is not None else decoding_workers(jobs)}
        # The search's MLflow run, recorded by the process that started this one.
        search_log = (MlflowSearchLog(tune_dir, config.mlflow, search_group(config, tune_dir), {}, print)
                      if config.mlflow is not None else None)
        search = Search(study, optuna, tune_dir, config, space, recorded["monitor"], recorded["epochs"],
                        message_console(), placement, jobs, search_log)
        try:
            search.run_trials(trials, time_limit, claim)
        finally:  # this worker's trials' scores, sent from a thread that ends with the process
            if search_log is not None:
                search_log.send_the_rest()
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        print(f"worker {index}: {stop or 'stopped'}", file=sys.stderr)
        sys.exit(STOPPED_EXITS[0])


def _place_worker(device: str, jobs: int) -> None:
    """A worker's share of the machine: its GPU made the current one (else CUDA's own allocations, and any
    library that uses the current device, would land on GPU 0 from every worker), and its share of the cores
    for its threads."""
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_with_parent() -> None:
    """SIGTERM this worker when the process that started it dies, even by SIGKILL: its trial saves a
    checkpoint and stops, rather than train on unwatched."""
    parent = multiprocessing.parent_process()

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


class Search:
    """The trial loop's state: the study, where it writes, and how a trial is scored and reported."""

    def __init__(self, study, optuna, tune_dir: Path, config: TrainConfig, space: list[Searched], monitor: str,
                 epochs: int, console: Console, placement: dict | None = None, jobs: int = 1,
                 mlflow: MlflowSearchLog | None = None):
        self.study, self.optuna, self.tune_dir, self.config, self.space = study, optuna, tune_dir, config, space
        self.monitor, self.epochs, self.console, self.mlflow = monitor, epochs, console, mlflow
        self.placement, self.jobs = placement or {}, jobs  # a parallel search's worker: see PLACEMENT
        self.maximize = monitor != "val_loss"
        self.runs_started = 0  # by this process: the time per trial it measures
        self.drawn_at = time.monotonic()  # when search.png was last drawn (by this process), or it started

    def trials_claimed(self) -> int:
        """Trials that count against the budget: all but those cut short (continued by another) and those queued,
        running ones too (in a parallel search, the other workers')."""
        return sum(1 for trial in self.trials() if trial.state not in ("cut short", "waiting"))

    def run_trials(self, trials: int, time_limit: float | None, claim=contextlib.nullcontext()) -> None:
        """Train trials until `trials` are claimed, or `time_limit` minutes have passed. `claim`: held while a
        trial takes its place in the budget (a lock shared by a parallel search's workers)."""
        distributions = {item.name: item.distribution(self.optuna) for item in self.space}
        started = time.monotonic()
        while True:
            with claim:
                if (claimed := self.trials_claimed()) >= trials:
                    return
                spent = (time.monotonic() - started) / 60
                if time_limit is not None and spent >= time_limit:
                    self.console.print(f"time limit: {spent:.0f} of {time_limit:g} minutes spent; no new trial starts")
                    return
                trial = self.study.ask(distributions)
            self.run_trial(trial, claimed, trials, started)

    def run_trial(self, trial, done: int, total: int, started: float) -> None:
        state = self.optuna.trial.TrialState
        values, continues = trial.params, trial.user_attrs.get("continues")
        run_dir = (Path(trial.user_attrs["run_dir"]) if continues is not None
                   else self.tune_dir / "trials" / f"trial-{trial.number:03d}")
        trial.set_user_attr("run_dir", str(run_dir))
        eta = ""
        if self.runs_started:
            per_trial = (time.monotonic() - started) / self.runs_started
            left = per_trial * math.ceil((total - done) / self.jobs)
            eta = f" ({_minutes(per_trial)} a trial so far; at most {_minutes(left)} left)"
        own = " (residual train's own choice)" if trial.user_attrs.get("baseline") else ""
        self.console.print(f"\ntrial {trial.number} ({done + 1} of {total}): {settings_text(values)}{own}"
                           + (f", continuing trial {continues} in {run_dir}" if continues is not None else "") + eta)
        if (same := self._trained_with(values)) is not None:
            return self._copy_outcome(trial, same)
        if continues is not None:  # the epochs the cut-short trial reported count for the pruner again
            for row in _read_metrics(run_dir / "metrics.csv"):
                trial.report(row[self.monitor], int(row["epoch"]))
        self.runs_started += 1
        try:
            config = dataclasses.replace(with_settings(self.config, values), out=str(run_dir.parent),
                                         name=run_dir.name, report=False,
                                         group=search_group(self.config, self.tune_dir), **self.placement)
            # Trials at once write to one terminal: each line of theirs says which trial it is of.
            console = (self.console if self.jobs == 1 else
                       message_console(file=PrefixedLines(sys.stdout, f"trial {trial.number}: ")))
            result = train(config, run_dir=run_dir, console=console, epoch_end=self._pruning(trial),
                           mlflow_parent=self.mlflow.run_id if self.mlflow else None)
        except TrackingError as error:  # the service, not the settings: every trial would meet it
            raise TrackingError(f"trial {trial.number}: {error}; once it is fixed, the search goes on with: residual "
                                f"tune --resume {self.tune_dir}") from None
        except ConfigError as error:  # e.g. --augmix-jsd drawn without --auto-augment augmix
            return self._end_failed(trial, "refused", f"settings refused: {error}")
        except torch.cuda.OutOfMemoryError:  # a property of the settings (batch size, model), like divergence
            torch.cuda.empty_cache()
            return self._end_failed(trial, "failed", "out of GPU memory")
        except TrainingDiverged as error:
            trial.set_user_attr("diverged", str(error).split(";")[0])
            self.study.tell(trial, state=state.PRUNED)  # the sampler ranks it below every trial that trained
            self.console.print(f"trial {trial.number}: diverged ({trial.user_attrs['diverged']})")
        else:
            if result.stopped_by is not None:
                self.study.tell(trial, state=state.PRUNED)
            elif result.best:
                self.study.tell(trial, result.best[self.monitor])
                best = self.study.best_trial.number == trial.number
                self._send_score(trial.number, result.best[self.monitor])
                self.console.print(f"trial {trial.number}: {_score_text(self.monitor, result.best[self.monitor])}"
                                   + ("  *best so far*" if best else ""))
            else:  # no epoch gave a finite score with finite weights
                trial.set_user_attr("diverged", "no epoch had a finite validation score")
                self.study.tell(trial, state=state.PRUNED)
        (run_dir / "last.pt").unlink(missing_ok=True)  # a finished trial is never resumed
        self.write()

    def _end_failed(self, trial, kind: str, why: str) -> None:
        """A trial whose settings could not train at all: failed, which the sampler leaves out."""
        trial.set_user_attr(kind, why)
        self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        self.console.print(f"trial {trial.number}: {why}")
        self.write()

    def _trained_with(self, values: dict):
        """An earlier finished trial with these very settings (TPE draws a choice again once it looks best)."""
        state = self.optuna.trial.TrialState
        return next((t for t in self.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))
                     if t.params == values and "same_as" not in t.user_attrs), None)

    def _copy_outcome(self, trial, same) -> None:
        """Not trained again: from the same seed, the same settings train the same run (to within the
        nondeterminism of GPU kernels), so the trial takes the earlier one's outcome and costs nothing."""
        for key in ("run_dir", "diverged"):
            if key in same.user_attrs:
                trial.set_user_attr(key, same.user_attrs[key])
        trial.set_user_attr("same_as", same.number)
        for epoch, score in same.intermediate_values.items():
            trial.report(score, epoch)
        complete = same.state == self.optuna.trial.TrialState.COMPLETE  # a pruned trial's value is its last score
        self.study.tell(trial, same.value if complete else None, state=same.state)
        if complete:
            self._send_score(trial.number, same.value)
        self.console.print(f"trial {trial.number}: the settings of trial {same.number}, not trained again")
        self.write()

    def _send_score(self, number: int, score: float) -> None:
        """A complete trial's score, and the best so far, to the search's MLflow run (if any)."""
        if self.mlflow:
            self.mlflow.add_trial(number, self.monitor, score, self.study.best_value)

    def _pruning(self, trial):
        """The trainer's epoch_end: report the epoch's score, and say why the trial ends if the pruner says so
        (never after the last epoch, whose score is the trial's whole result)."""
        def epoch_end(row: dict) -> str | None:
            score = row[self.monitor]
            trial.report(score, row["epoch"])
            if row["epoch"] < self.epochs and trial.should_prune():
                return (f"trial {trial.number} pruned at epoch {row['epoch']}: "
                        f"{_score_text(self.monitor, score)} is behind the other trials at this epoch")
            return None
        return epoch_end

    def trials(self) -> list[Trial]:
        """Every trial of the study, as trials.csv lists it."""
        state = self.optuna.trial.TrialState
        frozen = self.study.get_trials(deepcopy=False)
        continued_by = {t.user_attrs["continues"]: t.number for t in frozen if "continues" in t.user_attrs}
        listed = []
        for t in frozen:
            attrs, steps = t.user_attrs, t.intermediate_values
            last = steps[max(steps)] if steps else None
            if t.number in continued_by:
                kind, score, note = "cut short", last, f"continued by trial {continued_by[t.number]}"
            elif t.state == state.COMPLETE:
                kind, score, note = "complete", t.value, ""
            elif "diverged" in attrs:
                kind, score, note = "diverged", None, attrs["diverged"]
            elif t.state == state.PRUNED:
                kind, score, note = "pruned", last, f"at epoch {max(steps)}"
            elif "refused" in attrs or "failed" in attrs:
                kind = "refused" if "refused" in attrs else "failed"
                score, note = None, attrs[kind]
            elif t.state == state.WAITING:  # queued: residual train's own settings, or a trial to continue
                kind, score, note = "waiting", None, ""
            else:
                kind, score, note = "running", last, ""
            seconds = t.duration.total_seconds() if t.duration is not None else None
            if attrs.get("baseline"):
                note = "; ".join(filter(None, ["residual train's own settings", note]))
            if "same_as" in attrs:
                note = "; ".join(filter(None, [f"the settings of trial {attrs['same_as']}, not trained again", note]))
            listed.append(Trial(t.number, kind, dict(t.params), score, len(steps), seconds,
                                attrs.get("run_dir", ""), note, bool(attrs.get("baseline"))))
        return listed

    def best(self, trials: list[Trial]) -> Trial | None:
        complete = [t for t in trials if t.state == "complete"]
        if not complete:
            return None
        return (max if self.maximize else min)(complete, key=lambda t: t.score)

    def write(self, final: bool = False) -> list[Trial]:
        """trials.csv and best.yaml as the study now stands, and search.png when `final` or SEARCH_DRAWN_EVERY_S
        have passed since it was last drawn: the drawing takes longer than many quick trials. -> its trials."""
        listed = self.trials()
        best = self.best(listed)
        write_trials(listed, self.tune_dir / "trials.csv")
        if best is not None:
            self._write_best(best)
        if final or time.monotonic() - self.drawn_at >= SEARCH_DRAWN_EVERY_S:
            draw_search(listed, self.study, self.space, self.monitor, self.tune_dir / "search.png")
            self.drawn_at = time.monotonic()
        return listed

    def _write_best(self, best: Trial) -> None:
        """The best trial's config.yaml, with the outputs back where a new training run puts them, and the group
        the search was given (not the one it gave its trials)."""
        options = read_config(Path(best.run_dir) / "config.yaml")
        options.update(out="runs/train", name=None, report=self.config.report, group=self.config.group,
                       **{name: getattr(self.config, name) for name in PLACEMENT})
        for name in ("out", "name", "report", "group", *PLACEMENT):
            options.get(AUTO_RECORD, {}).pop(name, None)
        with atomic_path(self.tune_dir / "best.yaml") as tmp:
            tmp.write_text(f"# trial {best.number} of {self.tune_dir}: {_score_text(self.monitor, best.score)}\n"
                           + yaml.safe_dump(options, sort_keys=False))

    def finish(self) -> TuneResult:
        listed = self.write(final=True)
        best, importance = self.best(listed), self._importance(listed)
        if best is None:
            self.console.print(f"\nno trial completed; {self.tune_dir / 'trials.csv'} says how each ended")
        else:
            own = next((t for t in listed if t.baseline and t.state == "complete" and t is not best), None)
            yardstick = (f" (residual train's own settings, trial {own.number}: {_score_text(self.monitor, own.score)})"
                         if own else "")
            self.console.print(f"\nbest: trial {best.number}, {_score_text(self.monitor, best.score)}: "
                               f"{settings_text(best.values)}{yardstick}\n"
                               f"its model: {Path(best.run_dir) / 'model.safetensors'}; train it again: "
                               f"residual train --config {self.tune_dir / 'best.yaml'}")
        if self.mlflow:
            files = ("trials.csv", "best.yaml", "search.png", "tune.yaml")
            self.mlflow.finish(best.number if best else None, [self.tune_dir / name for name in files])
        self.end_log("FINISHED")
        return TuneResult(self.tune_dir, self.monitor, best, listed, importance)

    def end_log(self, status: str) -> None:
        """End the search's MLflow run (if any) as FINISHED, KILLED (to be resumed) or FAILED."""
        if self.mlflow:
            self.mlflow.close(status)

    def _importance(self, trials: list[Trial]) -> dict[str, float]:
        """PED-ANOVA's importance of each searched setting (Optuna's, which needs no scikit-learn), once enough
        trials are complete to tell; {} before that."""
        complete = [t for t in trials if t.state == "complete"]
        if len(complete) < IMPORTANCE_FROM or len(complete[0].values) < 2:
            return {}
        evaluator = self.optuna.importance.PedAnovaImportanceEvaluator()
        return dict(self.optuna.importance.get_param_importances(self.study, evaluator=evaluator))


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("residual tune: the search is Optuna's, which is not installed: pip install optuna "
                          "(or residual[tune])") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials' own lines say what happened
    return optuna


def _open_study(optuna, tune_dir: Path, monitor: str, pruner: str, prune_from: int, seed: int, epochs: int,
                trials: int, parallel: bool):
    """The study in TUNE/study.log: made the first time, loaded on a resume. `parallel`: trials run at once,
    so the sampler counts a running trial's settings as scoring the worst so far (Optuna's constant liar)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # The median rule waits for a quarter of the budget (2 to 5 trials) to finish; both rules judge a trial
    # from epoch `prune_from` on (Hyperband's first rung).
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, trials // 4)),
                                                             n_warmup_steps=prune_from),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=prune_from, max_resource=epochs),
               "none": lambda: optuna.pruners.NopPruner()}
    # TPE proposes from the trials so far once a third of the budget (3 to 10 trials) has been drawn at random.
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=parallel,
                                         n_startup_trials=min(10, max(3, trials // 3)))
    storage = JournalStorage(JournalFileBackend(str(tune_dir / "study.log")))
    return optuna.create_study(storage=storage, study_name="tune", sampler=sampler, pruner=pruners[pruner](),
                               direction="maximize" if monitor != "val_loss" else "minimize", load_if_exists=True)


def _drop_torn_line(journal: Path) -> None:
    """Cut off a last line that a kill (or power loss) left half-written. Optuna skips such a line when it is
    the last, but appends the next event right after it, and the merged line would then stop every later read."""
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    with journal.open("rb+") as file:
        text = file.read()
        if not text.endswith(b"\n"):
            file.truncate(text.rfind(b"\n") + 1)
            os.fsync(file.fileno())


def _continue_cut_trials(study, optuna) -> None:
    """Trials a kill or Ctrl-C left running: each fails, and a new trial with its settings continues its run."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if "run_dir" in trial.user_attrs:  # else it was cut before its run began: nothing to continue
            study.enqueue_trial(trial.params, user_attrs={"continues": trial.number,
                                                          "run_dir": trial.user_attrs["run_dir"]})


def _write_record(tune_dir: Path, record: dict) -> None:
    """tune.yaml: the search as asked, what a resume goes on with."""
    with atomic_path(tune_dir / "tune.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(plain_yaml(record), sort_keys=False))


def _read_record(tune_dir: Path) -> dict:
    if not (tune_dir / "tune.yaml").is_file() or not (tune_dir / "study.log").is_file():
        raise ConfigError(f"{tune_dir}: not a search folder (no tune.yaml and study.log); --resume takes the "
                          f"folder residual tune printed (runs/tune/<name>)")
    return read_config(tune_dir / "tune.yaml")


def _check_space(space: list[Searched], config: TrainConfig, dataset) -> None:
    """Each end of each range and each choice must make a recipe that trains on `dataset`, on its own or with
    one of the other settings' choices (--bce-target-threshold needs --loss bce): so an unknown model name
    stops the search before it begins. Drawn together they may still clash, which refuses that trial alone."""
    names = [item.name for item in space]
    if not space:
        raise ConfigError("nothing to search: the recipe fixes the learning rate, the weight decay and label "
                          "smoothing; give --search NAME=LOW..HIGH or NAME=A,B")
    if len(set(names)) < len(names):
        twice = sorted(name for name in set(names) if names.count(name) > 1)
        raise ConfigError(f"--search names a setting twice: {', '.join(twice)}")
    for item in space:
        partners = [{}] + [{other.name: choice} for other in space if other is not item for choice in other.choices]
        for value in item.choices or (item.low, item.high):
            refusals = []
            for partner in partners:
                try:
                    resolve(with_settings(config, {item.name: value, **partner}), dataset)
                    break
                except ConfigError as error:
                    refusals.append(error)
            else:
                raise refusals[0]


def _check_pruning(space: list[Searched], pruner: str) -> None:
    """The pruner compares trials' validation at the same epoch. Progressive resizing validates at the full size
    while it trains small, so a trial searched with another schedule of sizes would be judged unfairly."""
    resized = [item.name for item in space if item.name.startswith("progressive-")]
    if resized and pruner != "none":
        raise ConfigError(f"--search {resized[0]}: trials training at smaller sizes validate low until their "
                          f"full-size epochs, so --pruner {pruner} would stop them unfairly; give --pruner none")


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(file)]


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def settings_text(values: dict) -> str:
    return ", ".join(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in values.items())


def _score_text(monitor: str, score: float | None) -> str:
    if score is None:
        return "no score"
    return f"val loss {score:.4f}" if monitor == "val_loss" else f"{SCORE_LABELS[monitor]} {score:.2%}"


SCORE_LABELS = {"val_top1": "val top-1", "val_map": "val mAP", "val_loss": "val loss"}


def write_trials(trials: list[Trial], path: Path) -> None:
    names = sorted({name for trial in trials for name in trial.values})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "score", "epochs", "seconds", *names, "run_dir", "note"])
    for t in trials:
        writer.writerow([t.number, t.state, "" if t.score is None else f"{t.score:.6g}", t.epochs,
                         "" if t.seconds is None else f"{t.seconds:.1f}",
                         *(f"{t.values[n]:.6g}" if isinstance(t.values.get(n), float) else t.values.get(n, "")
                           for n in names), t.run_dir, t.note])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def draw_search(trials: list[Trial], study, space: list[Searched], monitor: str, path: Path) -> None:
    """search.png: the score of each trial in order (and the best so far), each trial's score per epoch (the
    pruned ones grey, where they stopped), and the score against each searched setting."""
    scale = 1 if monitor == "val_loss" else 100
    label = SCORE_LABELS[monitor] + ("" if monitor == "val_loss" else " (%)")
    panels = 2 + len(space)
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    from matplotlib.ticker import MaxNLocator, NullFormatter  # with matplotlib itself: see figures.py

    figure = new_figure(figsize=(4.6 * columns, 3.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    scored = [t for t in trials if t.score is not None and t.state in ("complete", "pruned")]
    style = {"complete": dict(color="C0", marker="o"), "pruned": dict(color="0.6", marker="x")}
    by_trial = axes[0]
    for kind in style:
        shown = [t for t in scored if t.state == kind]
        by_trial.scatter([t.number for t in shown], [t.score * scale for t in shown], label=kind, **style[kind])
    complete = [t for t in trials if t.state == "complete"]
    if complete:  # from the first complete trial to the last trial
        numbers, best, line = [], [], None
        for t in trials[trials.index(complete[0]):]:
            if t.state == "complete":
                line = t.score if line is None else (max if monitor != "val_loss" else min)(line, t.score)
            numbers.append(t.number)
            best.append(line * scale)
        by_trial.step(numbers, best, "C3", where="post", label="best so far")
    by_trial.set(title="score by trial", xlabel="trial", ylabel=label)
    by_trial.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_trial.legend(fontsize=8)
    per_epoch = axes[1]
    best_number = study.best_trial.number if complete else None
    complete_numbers = {t.number for t in complete}
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values.items())
        if not steps:
            continue
        color = "C3" if t.number == best_number else "C0" if t.number in complete_numbers else "0.7"
        per_epoch.plot([s for s, _ in steps], [v * scale for _, v in steps], color=color,
                       lw=2.2 if t.number == best_number else 1, alpha=1 if t.number == best_number else 0.7)
    per_epoch.set(title="score per epoch (grey: pruned, red: best)", xlabel="epoch", ylabel=label)
    per_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, item in zip(axes[2:], space):
        name = item.name
        shown = [t for t in scored if name in t.values]
        if item.choices:  # one column each
            xs = [item.choices.index(t.values[name]) for t in shown]
            ax.set_xticks(range(len(item.choices)), [str(choice) for choice in item.choices])
            ax.set_xlim(-0.5, len(item.choices) - 0.5)
        else:
            xs = [t.values[name] for t in shown]
            ax.set_xlim(item.low, item.high)
            if item.log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap
        for kind in style:
            picked = [(x, t.score * scale) for x, t in zip(xs, shown) if t.state == kind]
            if picked:
                ax.scatter(*zip(*picked), **style[kind])
        ax.set(title=name, xlabel=name, ylabel=label)
    for ax in axes[panels:]:
        ax.axis("off")
    figure.tight_layout()
    save_png(figure, path)
