"""The training engine: `train(config)` turns a dataset folder into a run directory.

A run directory holds config.yaml (resolved, enough to repeat the run),
metrics.csv (per epoch), curves.png (at most every 30 s), model.safetensors (the best epoch),
last.pt (everything needed to resume), summary.json and, with the report, train_batch.png (the
first batch as the model sees it: preview.py) and report.html.

The loop is plain: for each batch, augment on the device, forward, backward,
step. Around it: mixed precision on CUDA, channels_last, optional
torch.compile, gradient accumulation and clipping, an EMA of the weights
(ema.py), checkpoints at epoch ends (and every N steps if asked), resume with
every RNG and the position inside the epoch, early stopping, SIGINT/SIGTERM
saving a checkpoint before exiting, and a non-finite loss stopping the run
with the last good checkpoint left intact.

Under torchrun (distributed.py) the same loop runs data-parallel: the model is
wrapped in DistributedDataParallel, each worker takes its share of every batch,
metrics are summed over workers, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_path
from ..data.augmix import JSD_VIEWS, augmix_views
from ..data.datasets import VAL_NAMES, Dataset, data_name, open_dataset
from ..data.loaders import (BadFileLog, FileLoader, InMemoryLoader, decoding_workers, load_into_memory,
                            shard_size)
from ..data.transforms import build_augment, mix_batch, normalize
from ..errors import ConfigError, NoSpaceError, ResidualError
from ..evaluate import evaluate
from ..metrics import multi_label_metrics, shows_top5
from ..models import Preprocessing, ResNet, build_model
from ..models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from ..models.resnet import MULTI_LABEL_THRESHOLD
from ..progress import message_console, transient_bar
from ..runs import RUN_LOCK, new_run_dir, pick_device, run_lock
from ..weights import ModelFileError, UnsafeCheckpointError, load_for_finetuning, load_model, save_model
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, compile_log, load_config, resolve, save_config
from .distill import Teacher, distillation_sum
from .distributed import World, per_worker_batch
from .ema import WeightEMA
from .history import plot_curves, write_metrics
from .mlflow_log import RUN_RECORD as MLFLOW_RECORD, MlflowLog
from .tensorboard import TensorBoardLog
from .wandb_log import RUN_RECORD as WANDB_RECORD, WandbLog
from .loss import consistency_sum, label_loss_sum
from .optim import PlateauDecay, build_optimizer, build_scheduler
from .preview import write_batch_preview
from .progressive import describe_sizes, epoch_sizes

IN_MEMORY_BUDGET = 2 * 1024**3  # bytes of decoded uint8 images kept in memory (and on the GPU)
READ_BACK_SECONDS = 0.5  # how often the loop waits for the device to report loss and accuracy (the bar's refresh)
CURVES_EVERY_S = 30.0  # the least time between two drawings of curves.png during a run
TENSORBOARD_DIR = "tensorboard"  # the run's event files, in the run directory
WANDB_DIR = "wandb"  # W&B's client's own files for the run (all of it, offline)


SMALL_VALIDATION = 50  # fewer validation images than this, and training warns that its top-1 is coarse


class TrainingError(ResidualError):
    """Training cannot go on (a non-finite loss, unusable data)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite: the settings (often the learning rate) do not train."""


class TrainingInterrupted(ResidualError):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best: dict
    history: list[dict]
    bad_files: dict[str, str]
    ignored_files: int
    stopped_early: bool
    model_path: Path
    stopped_by: str | None = None  # why `epoch_end` ended the run (a hyperparameter search's pruner)


@dataclass
class PendingStep:
    """A training batch whose loss and hits are still on the device."""
    epoch: int
    index: int  # the batch's position in the epoch
    step: int  # the optimizer step it belongs to, counted from 1
    images: int
    weight: torch.Tensor | int  # what its loss is the mean over (Trainer._loss_weight)
    loss: torch.Tensor
    correct: torch.Tensor
    parts: torch.Tensor | None = None  # with a teacher: the labels' and the distillation term's loss
    lr: float = 0.0  # the rate its optimizer step took (the first parameter group's)


def empty_sums() -> dict:
    """The epoch's running sums: the loss summed over images (times their class weights), its weight,
    the correct predictions and the images seen; with a teacher, the loss's two terms summed alike."""
    return {"loss": 0.0, "weight": 0.0, "correct": 0.0, "seen": 0, "label_loss": 0.0, "distill_loss": 0.0}


@contextlib.contextmanager
def seeded(seed: int, deterministic: bool):
    """Seed every generator, and for the block choose between deterministic kernels and cudnn's
    autotuning; the process's own choice comes back afterwards (a `--deterministic` run in a notebook
    must not leave everything after it on slower, deterministic kernels)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        enabled, warn_only, torch.backends.cudnn.benchmark, workspace = before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def train(config: TrainConfig | None = None, *, resume: str | Path | None = None,
          run_dir: str | Path | None = None, console: Console | None = None,
          epoch_end: Callable[[dict], str | None] | None = None, mlflow_parent: str | None = None) -> TrainResult:
    """Train a ResNet as `config` says, or resume the run in directory `resume`.

    `run_dir`: run in this directory; if it already holds a config.yaml, that is the
    config, and its last.pt (if any) is resumed. This is how torchrun's workers start,
    and how a group restarted after a lost worker picks up where it stopped.
    `epoch_end`: called with each epoch's row of metrics.csv once last.pt holds the epoch; a text it returns
    ends the run there, as the reason (how `residual tune` prunes a trial that falls behind). The decision is
    this call's: last.pt does not keep it, so a resume trains on. Distributed, every worker calls it, and
    they must agree.
    `mlflow_parent`: with config.mlflow, the id of the MLflow run this run's is nested under (a tune search's).
    """
    console = console or message_console()
    if resume is not None:
        run_dir = resumable_run(resume)
    run_dir = Path(run_dir) if run_dir is not None else None
    started = run_dir is not None and (run_dir / "config.yaml").is_file()
    if started:
        config = load_config(run_dir / "config.yaml")
    elif config is None:
        raise TrainingError("give a TrainConfig, or resume=RUN_DIR")
    world = World.from_environment(pick_device(config.device).type)
    try:
        if not world.is_main:
            console = Console(quiet=True)
        with seeded(config.seed, config.deterministic):
            dataset = open_dataset(config.data, config.val_split, config.seed)  # a seeded split: the same on every rank
            given, config = config, resolve(config, dataset, world.size)
            if log := compile_log(given, config, len(dataset.train), world.size):
                console.print(log)
            for warning in validation_warnings(dataset) + schedule_warnings(config):
                console.print(warning)
            if not started:
                run_dir = world.broadcast(prepare_run_dir(config, given, run_dir) if world.is_main else None)
            with run_lock(run_dir) if world.is_main else contextlib.nullcontext():
                try:
                    trainer = Trainer(config, dataset, run_dir, console, world, epoch_end, mlflow_parent)
                except Exception:
                    if not started and world.is_main:
                        discard_run_dir(run_dir)
                    raise
                if (run_dir / "last.pt").is_file():
                    trainer.restore(resume_state(run_dir, config))
                return trainer.fit()
    finally:
        world.shutdown()


def resume_state(run_dir: Path, config: TrainConfig) -> dict:
    """The run's last.pt, or an error saying how to go on without it: it was damaged after training wrote it
    whole (a copy cut short), so training can only start again, from the run's best weights."""
    try:
        return load_checkpoint(run_dir / "last.pt")
    except UnsafeCheckpointError:  # not damaged but replaced: training never writes one
        raise
    except ModelFileError as error:
        best = run_dir / "model.safetensors"
        then = (f"start a new run from its best weights: residual train {config.data} --from {best}" if best.is_file()
                else "start the run again")
        raise TrainingError(f"{error}, so the run cannot go on from it; {then}") from None


def prepare_run_dir(config: TrainConfig, given: TrainConfig, run_dir: Path | None = None) -> Path:
    """The run directory with the resolved config.yaml (and what `given` left automatic): `run_dir`, or a new
    one under config.out."""
    if run_dir is None:
        run_dir = new_run_dir(config.out, config.name or f"{config.model}-{data_name(config.data)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml", given)
    return run_dir


def discard_run_dir(run_dir: Path) -> None:
    """Undo `prepare_run_dir` for a run that failed to set up: no folder is left holding only its config."""
    (run_dir / "config.yaml").unlink(missing_ok=True)
    (run_dir / RUN_LOCK).unlink(missing_ok=True)  # a new run's: no other process can be waiting for it
    # The trackers' records of this attempt: their runs were ended as FAILED, and a run started again in this
    # folder must begin its own, not resume the failed one.
    for record in (MLFLOW_RECORD, WANDB_RECORD):
        (run_dir / record).unlink(missing_ok=True)
    for folder in (TENSORBOARD_DIR, WANDB_DIR):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def schedule_warnings(config: TrainConfig) -> list[str]:
    """Settings that work against each other: early stopping that ends the run before the plateau schedule's cut
    (both count the epochs since `monitor` last improved)."""
    optim = config.optim
    if optim.schedule == "plateau" and config.early_stopping and config.early_stopping <= optim.plateau_patience + 1:
        return [f"warning: --early-stopping {config.early_stopping} ends the run before --schedule plateau could "
                f"train at the rate it cuts after {optim.plateau_patience + 1} epochs without improvement; give "
                f"early stopping the longer patience"]
    return []


def validation_warnings(data: Dataset) -> list[str]:
    """What a training run's validation cannot tell: classes it has no images of, and a top-1 too coarse to
    pick the best epoch by."""
    if not len(data.val):
        return []  # an empty split is an error, raised when the loaders are built
    warnings = []
    unmeasured = [name for name, count in zip(data.classes, data.class_counts(data.val)) if count == 0]
    score = "mAP" if data.multi_label else "top-1"
    if unmeasured:  # e.g. a class of one image: the split holds out only of classes with two or more
        warnings.append(f"warning: {data.root}: no validation images of {', '.join(unmeasured)}; validation {score} "
                        f"does not measure {'them' if len(unmeasured) > 1 else 'it'}")
    if len(data.val) < SMALL_VALIDATION:
        coarse = ("too few for a steady mAP" if data.multi_label
                  else f"so its top-1 moves in steps of {100 / len(data.val):.3g} points")
        warnings.append(f"warning: {data.root}: the validation split has {len(data.val)} image(s), {coarse}; the best "
                        f"epoch and early stopping go by it")
    return warnings


def resumable_run(path: str | Path) -> Path:
    """The run directory `path`, checked to hold what a resume needs: its config.yaml and last.pt."""
    run_dir = Path(path)
    if not run_dir.exists():
        raise TrainingError(f"{run_dir}: no such run directory; --resume takes the folder a training run printed "
                            f"(runs/train/<name>)")
    if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
        raise TrainingError(f"{run_dir} is not a run directory (it has no config.yaml); --resume takes the folder a "
                            f"training run printed (runs/train/<name>)")
    if not (run_dir / "last.pt").is_file():
        raise TrainingError(f"{run_dir}: no last.pt to resume from (the run stopped before its first checkpoint); "
                            f"start it again with residual train")
    return run_dir


def prepare_run(config: TrainConfig, processes: int, console: Console) -> Path:
    """Resolve `config` against its data for `processes` workers and write its run directory: what `--nproc`
    workers start from."""
    dataset = open_dataset(config.data, config.val_split, config.seed)
    resolved = resolve(config, dataset, processes)
    if log := compile_log(config, resolved, len(dataset.train), processes):
        console.print(log)
    return prepare_run_dir(resolved, config)


class Trainer:
    def __init__(self, config: TrainConfig, dataset: Dataset, run_dir: Path, console: Console,
                 world: World = World(), epoch_end: Callable[[dict], str | None] | None = None,
                 mlflow_parent: str | None = None):
        self.config, self.dataset, self.run_dir, self.console = config, dataset, run_dir, console
        self.world, self.epoch_end, self.mlflow_parent = world, epoch_end, mlflow_parent
        self.trackers: list[TensorBoardLog | MlflowLog | WandbLog] = []
        try:
            # First: without the tensorboard, mlflow or wandb package, or its server, the flag stops here, before
            # the data is loaded.
            if world.is_main:
                self._open_trackers()
            self._set_up()
        except BaseException:  # a tracking run begun is ended as FAILED, not left running
            self._close_trackers("FAILED")
            raise

    def _set_up(self) -> None:
        """The device, data, model, optimizer and the run's state, from the config."""
        config, dataset, world = self.config, self.dataset, self.world
        self.device = world.device(pick_device(config.device))
        self.worker_batch = per_worker_batch(config.batch_size, world)
        self.bad = BadFileLog(config.max_bad_streak)
        self.model = self._build_model()
        self.train_sizes = self._training_sizes()
        self._build_loaders()
        # After the loaders: they give the model its normalisation (the data's statistics), which the teacher's
        # input is converted from.
        self.teacher = (Teacher(config.teacher, dataset.classes, self.model.preprocessing, self.device)
                        if config.teacher else None)
        c = config
        self.steps_per_epoch = math.ceil(len(self.train_loader) / c.accumulate)
        # One fused kernel for the whole update on CUDA, where small nets are launch-bound.
        self.optimizer = build_optimizer(self.model, c.optim, c.layer_lr_decay or 1.0,
                                         fused=self.device.type == "cuda")
        self.plateau = (PlateauDecay(c.optim.gamma, c.optim.plateau_patience, c.optim.min_lr_ratio,
                                     higher_is_better=c.monitor != "val_loss")
                        if c.optim.schedule == "plateau" else None)
        self.scheduler = build_scheduler(self.optimizer, c.optim, self.steps_per_epoch, self.steps_per_epoch * c.epochs,
                                         self.plateau)
        use_amp = c.amp if c.amp is not None else self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if self.device.type != "cuda" or torch.cuda.is_bf16_supported()
                          else torch.float16) if use_amp else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if c.sam and self.scaler.is_enabled():
            raise ConfigError(f"--sam: mixed precision on {self.device} is float16, whose loss scaling cannot serve "
                              f"SAM's two gradients per step; train in float32 (--no-amp) or on a GPU with bfloat16")
        self.ema = WeightEMA(self.model, c.ema) if c.ema else None
        self.forward = self._compiled(self.model) if c.compile else self.model
        self.eager_forward: nn.Module = self.model  # for batches that unreadable images shortened (_train_step)
        self.full_batch = min(self.worker_batch, shard_size(len(self.train_loader.labels), world.rank, world.size,
                                                            pad=True))
        # CUDA graphs replay into the same output buffers: each step must say where it begins.
        self.cuda_graphs = bool(c.compile) and self.device.type == "cuda" and c.compile_mode in (
            "reduce-overhead", "max-autotune")
        self.wrapped_for: int | None = None  # the frozen layer groups the DDP wrapper was built for
        # Where training stands; all of it goes into last.pt.
        self.epoch, self.batch, self.step = 0, 0, 0
        self.running = empty_sums()
        self.history: list[dict] = []
        # Epochs in curves.png, and when it was drawn: the first drawing, too, waits CURVES_EVERY_S from the start.
        self.curves_drawn, self.curves_drawn_at = 0, time.monotonic()
        # The kept epoch, and the epochs since `monitor` last improved (what early stopping counts).
        self.best, self.best_epoch, self.epochs_since_best = None, -1, 0
        self.kept: list[tuple] = []  # --keep-best: the best epochs' (monitor, val loss, epoch), best first
        self.stopped_early = False
        self.stopped_by: str | None = None  # what epoch_end said when it ended the run
        self.stop_signal: str | None = None
        self.frozen: int | None = None  # layer groups frozen in the current epoch
        self.resumes: list[dict] = []  # each resume from last.pt (after a kill, or torchrun's restarts)

    # --- setup -------------------------------------------------------------------------------

    def _build_model(self) -> ResNet:
        c = self.config
        if c.pretrained:
            model = load_for_finetuning(c.pretrained, c.model, len(self.dataset.classes),
                                        **c.model_options).to(self.device)
        else:
            model = build_model(c.model, num_classes=len(self.dataset.classes), **c.model_options).to(self.device)
        if c.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.set_grad_checkpointing(c.grad_checkpointing)
        if c.sync_bn and self.world.distributed:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn needs CUDA workers (PyTorch's SyncBatchNorm has no CPU kernel); on "
                                  "the CPU each worker normalises with its own batch statistics")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.class_names = list(self.dataset.classes)
        # Thresholds fitted to the weights it starts from (residual thresholds) do not fit the weights it ends with.
        model.multi_label, model.threshold = self.dataset.multi_label, MULTI_LABEL_THRESHOLD
        return model

    def _training_sizes(self) -> list[int]:
        """Each epoch's training image size: the image size, or progressive resizing's schedule."""
        c = self.config
        reduction = self.model.feature_info[-1]["reduction"]
        sizes = (epoch_sizes(c.epochs, c.image_size, c.progressive_resize, c.progressive_ramp, reduction)
                 if c.progressive_resize else [c.image_size] * c.epochs)
        if c.progressive_resize and self.world.is_main:
            self.console.print(f"progressive resizing: {describe_sizes(sizes)}")
        if min(sizes) < 2 * reduction:  # global pooling then averages a single position: little left to learn from
            self.console.print(f"warning: {c.model} shrinks its input {reduction}x, so {min(sizes)} px images reach "
                               f"the classifier as 1x1 maps; use a CIFAR-size net (resnet20, resnet56), --stem cifar, "
                               f"or a larger " + ("--progressive-resize" if c.progressive_resize else "--image-size"))
        return sizes

    def _build_loaders(self) -> None:
        c, data = self.config, self.dataset
        if len(data.val) == 0:
            has_val_folder = any((data.root / name).is_dir() for name in VAL_NAMES)
            raise TrainingError(f"{data.root}: the validation split is empty; " + (
                "put images in its val/ folder, or remove the folder so --val-split holds some of train out"
                if has_val_folder else "--val-split holds images out only of classes with 2 or more"))
        untaught = [name for name, count in zip(data.classes, data.class_counts(data.train)) if count == 0]
        if untaught:
            self.console.print(f"warning: {data.root}: no training images of {', '.join(untaught)}; the model cannot "
                               f"learn {'them' if len(untaught) > 1 else 'it'} (add images, or remove the folder)")
        small = c.image_size <= 64
        source = self.model.preprocessing if c.pretrained else None  # a pretrained model keeps its own
        crop_pct = c.crop_pct or (source.crop_pct if source else 0.875)
        resize = c.image_size if small else round(c.image_size / crop_pct)
        # Validation, and the model saved, may take larger images than training's random crops (Touvron et al.
        # 2019): its resize keeps the crop's ratio to it, as Preprocessing.at_size does.
        eval_size = c.eval_image_size or c.image_size
        eval_resize = eval_size if small else round(eval_size / crop_pct)
        interpolation = source.interpolation if source else "bilinear"
        fits = len(data.train) * 3 * resize * resize <= IN_MEMORY_BUDGET
        in_memory = c.in_memory if c.in_memory is not None else fits
        progress = not c.quiet and self.world.is_main
        shard = {"rank": self.world.rank, "world": self.world.size}
        # A compiled model is compiled for one batch shape: the epoch's shorter last batch would compile it
        # again, for any batch size, and Dynamo would then run that dynamic graph for every later batch.
        # Compiled runs leave it out (other images each epoch, as they are shuffled), as timm does.
        drop_last = bool(c.compile)
        if in_memory:
            train_images, train_labels = load_into_memory(data.train, resize, resize, interpolation, self.bad,
                                                          "loading train", progress)
            val_images, val_labels = load_into_memory(data.val, eval_resize, eval_size, interpolation, self.bad,
                                                      "loading val", progress)
            mean, std = (channel_stats(train_images) if small else (IMAGENET_MEAN, IMAGENET_STD))
            if source:
                mean, std = source.mean, source.std
            self.train_loader = InMemoryLoader(train_images, train_labels, self.worker_batch, True, c.seed, self.device,
                                               drop_last, balanced=c.balanced_sampler, repeats=c.aug_repeats, **shard)
            self.val_loader = InMemoryLoader(val_images, val_labels, 2 * self.worker_batch, False, c.seed,
                                             self.device, **shard)
        else:
            workers = c.workers if c.workers is not None else decoding_workers(self.world.local_size)
            self.train_loader = FileLoader(data.train, self.worker_batch, True, c.seed, self.device, resize, resize,
                                           interpolation, workers, self.bad, drop_last, balanced=c.balanced_sampler,
                                           decoder=c.decoder, repeats=c.aug_repeats, **shard)
            self.val_loader = FileLoader(data.val, 2 * self.worker_batch, False, c.seed, self.device, eval_resize,
                                         eval_size, interpolation, workers, self.bad, decoder=c.decoder, **shard)
            mean, std = (source.mean, source.std) if source else (IMAGENET_MEAN, IMAGENET_STD)
        self.model.preprocessing = Preprocessing(eval_size, eval_resize, mean, std, interpolation)
        # Not moved to the device: kornia would draw its random parameters there, and read some back every
        # step (a wait for the GPU each); on the host it draws them and copies them without waiting.
        # One per training size (progressive resizing: a few; otherwise the image size alone).
        self.augments = {size: build_augment(c.augment, c.image_size, resize, size) for size in set(self.train_sizes)}
        self.augment = self.augments[self.train_sizes[0]]
        self.class_weights = (class_weights(data.class_counts(data.train)).to(self.device)
                              if c.class_weights == "auto" else None)

    # --- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "running": dict(self.running),
            "history": self.history, "best": self.best, "best_epoch": self.best_epoch, "kept": list(self.kept),
            "epochs_since_best": self.epochs_since_best, "stopped_early": self.stopped_early,
            "bad_files": dict(self.bad.files), "rng": rng_state(),
            "resumes": list(self.resumes),
            "data": {"classes": list(self.dataset.classes), "train_images": len(self.dataset.train),
                     "train_fingerprint": self.train_fingerprint},
        }

    def restore(self, state: dict) -> None:
        self._check_same_data(state.get("data"))  # absent from a last.pt written before 2026-12-03
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.plateau and state.get("plateau"):  # absent from a last.pt written before 2026-12-05
            self.plateau.load_state_dict(state["plateau"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        # A last.pt from before the loss's weight was summed: without class weights it is the image count.
        self.running = empty_sums() | {"weight": state["running"]["seen"]} | state["running"]
        self.history = list(state["history"])
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.kept = [tuple(entry) for entry in state.get("kept", [])]  # absent from a last.pt before 2026-12-05
        self.epochs_since_best = state["epochs_since_best"]
        self.stopped_early = state.get("stopped_early", False)  # absent from a last.pt before 2026-12-03
        self.bad.files.update(state["bad_files"])
        set_rng_state(state["rng"])
        if self.world.rank:  # the checkpoint holds global sums (see save_last); rank 0 carries them on
            self.running = empty_sums()
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.resumes = list(state.get("resumes", [])) + [
            {"epoch": self.epoch + 1, "batch": self.batch, "step": self.step, "workers": self.world.size,
             "torchrun_restart": restarts, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        if self.finished():
            self.console.print(f"{self.run_dir} has finished ("
                               + ("stopped early" if self.stopped_early else f"all {self.config.epochs} epochs")
                               + f" at epoch {self.epoch}): nothing is left to train")
        else:
            self.console.print(f"resuming {self.run_dir} at epoch {self.epoch + 1}, batch {self.batch} (step "
                               f"{self.step})" + (f" after torchrun restart {restarts}" if restarts else ""))

    def _check_same_data(self, started_with: dict | None) -> None:
        """Other classes cannot resume (the head has one output per class); another training split can,
        but its epochs are then drawn from the new list, so the log says so."""
        if started_with is None:
            return
        data, classes = self.config.data, list(self.dataset.classes)
        if started_with["classes"] != classes:
            gone = sorted(set(started_with["classes"]) - set(classes))
            new = sorted(set(classes) - set(started_with["classes"]))
            changes = ([f"missing {', '.join(gone)}"] if gone else []) + ([f"new {', '.join(new)}"] if new else [])
            raise TrainingError(
                f"{data}: its classes are not the ones {self.run_dir} started with "
                f"({'; '.join(changes) or 'the same names in another order'}); resume with the data the run started "
                f"with, or fine-tune its model on this data: residual finetune --from "
                f"{self.run_dir / 'model.safetensors'} {data}")
        if started_with["train_fingerprint"] != self.train_fingerprint:
            self.console.print(
                f"warning: {data}: the training split is not the one {self.run_dir} started with "
                f"({started_with['train_images']} images then, {len(self.dataset.train)} now); the rest of the run "
                f"draws its batches from the new one")

    @functools.cached_property
    def train_fingerprint(self) -> str:
        """What a resume checks it still has; made at the first checkpoint or resume, not at start-up
        (1.8 s for ImageNet's file names, which lr-find and bench never need)."""
        return self.dataset.fingerprint(self.dataset.train)

    def save_last(self) -> None:
        """last.pt, written by rank 0 alone; every worker calls it (the running sums are collected first)."""
        state = self.state()
        if self.world.distributed:
            state["running"] = dict(zip(self.running, self.world.sum(list(self.running.values()), self.device)))
        if self.world.is_main:
            save_checkpoint(state, self.run_dir / "last.pt")

    # --- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        # Under torchrun a signal reaches the workers at different steps, so they cannot stop together
        # cleanly; torchrun ends them and the run resumes from its last checkpoint instead.
        try:
            with _stop_on_signals(self) if not self.world.distributed else contextlib.nullcontext():
                self._train_epochs()
            return self._finish()
        except BaseException as error:  # the trackers are told how it ended, and the error goes on
            self._close_trackers("KILLED" if isinstance(error, (TrainingInterrupted, KeyboardInterrupt))
                                 else "FAILED")
            raise

    def _train_epochs(self) -> None:
        try:
            while not self.finished():
                train_stats = self._train_epoch()
                val_stats = self.evaluate()
                self._end_epoch(train_stats, val_stats)
        except NoSpaceError as error:
            if not (self.run_dir / "last.pt").exists():
                raise
            raise NoSpaceError(f"{error}, or go on from the last checkpoint: residual train --resume "
                               f"{self.run_dir}") from None

    def _open_trackers(self) -> None:
        """Where the run's numbers go besides metrics.csv: TensorBoard's event files, an MLflow run, a W&B run.
        Each is kept as soon as it is open, so that one failing to open ends those before it."""
        c = self.config
        if c.tensorboard:
            self.trackers.append(TensorBoardLog(self.run_dir / TENSORBOARD_DIR,
                                                (self.run_dir / "config.yaml").read_text()))
        if c.mlflow is not None:
            self.trackers.append(MlflowLog(self.run_dir, c.mlflow, c.group, c.to_dict(), self.console.print,
                                           self.mlflow_parent))
        if c.wandb is not None:
            self.trackers.append(WandbLog(self.run_dir, c.wandb, c.group, c.to_dict(), self.console.print))

    def _close_trackers(self, status: str) -> None:
        """End the trackers' runs: FINISHED, KILLED (stopped by a signal, to be resumed) or FAILED."""
        trackers, self.trackers = self.trackers, []  # once: an error after closing does not close again
        for tracker in trackers:
            tracker.close(status)

    def finished(self) -> bool:
        return self.epoch >= self.config.epochs or self.stopped_early or self.stopped_by is not None

    def frozen_groups(self) -> int:
        """How many layer groups, counted from the input, are frozen in the current epoch."""
        c = self.config
        backbone = len(self.model.layer_groups()) - 1  # every group but the head
        fixed = min(backbone, 1 + c.freeze_stages) if c.freeze_stages else 0
        if c.strategy == "linear-probe" or (c.strategy == "two-stage" and self.epoch < c.head_epochs):
            return backbone
        if c.strategy == "two-stage" and c.unfreeze_stages is not None:
            return max(fixed, backbone - c.unfreeze_stages)
        return fixed

    def _apply_freezing(self) -> None:
        """Frozen groups get no gradients and keep their BN statistics (eval mode)."""
        frozen = self.frozen_groups()
        groups = self.model.layer_groups()
        for index, (_, modules) in enumerate(groups):
            for module in modules:
                module.requires_grad_(index >= frozen)
                if index < frozen:
                    module.eval()
        self._wrap(frozen)
        if frozen != self.frozen and (frozen or self.frozen):
            training = ", ".join(name for name, _ in groups[frozen:])
            self.console.print(f"epoch {self.epoch + 1}: training {training}; frozen: "
                               f"{', '.join(name for name, _ in groups[:frozen]) or 'nothing'}")
        self.frozen = frozen

    def _wrap(self, frozen: int) -> None:
        """Distributed: the model in DDP (compiled if asked) becomes what the loop trains.

        DDP registers the parameters that need gradients when it is built, so it is built
        again whenever freezing changes which ones do (two-stage fine-tuning).
        """
        if not self.world.distributed or frozen == self.wrapped_for:
            return
        ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                      else None)
        self.forward = self._compiled(ddp) if self.config.compile else ddp
        self.eager_forward = ddp
        self.wrapped_for = frozen

    def _compiled(self, module: nn.Module) -> nn.Module:
        # Progressive resizing feeds a few input sizes. By default Dynamo would compile the second one as a
        # graph for any size and run that slower graph from then on; static, each size gets its own.
        return torch.compile(module, mode=self.config.compile_mode,
                             dynamic=False if self.config.progressive_resize else None)

    def _train_epoch(self) -> dict:
        c, model = self.config, self.model
        model.train()
        self.augment = self.augments[self.train_sizes[self.epoch]]
        self._apply_freezing()
        started, seen_now = time.perf_counter(), 0
        total = len(self.train_loader)
        columns = (TextColumn(f"epoch {self.epoch + 1}/{c.epochs}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  "
                              "{task.fields[rate]:.0f} img/s"),
                   TimeRemainingColumn())
        with transient_bar(*columns, enabled=not c.quiet and self.world.is_main, console=self.console) as bar:
            task = bar.add_task("train", total=total, completed=self.batch, loss=0.0, acc=0.0, rate=0.0)
            pending: list[PendingStep] = []
            read_at, index = started, self.batch
            batches = self.train_loader.epoch(self.epoch, self.batch)
            if self.step == 0 and self.world.is_main and c.report:  # a fresh run: what its first batch looks like
                batches = self._previewed(batches)
            for group in step_groups(batches, c.accumulate):
                lr = self.optimizer.param_groups[0]["lr"]  # what this step takes; the schedule moves it after
                for (_, labels), (loss, correct, parts, weight) in zip(group, self._optimizer_step(group)):
                    pending.append(PendingStep(self.epoch, index, self.step, len(labels), weight, loss, correct,
                                               parts, lr))
                    seen_now += len(labels)
                    index += 1
                self.batch = index
                checkpoint = bool(c.checkpoint_every) and self.step % c.checkpoint_every == 0 and index < total
                stopping = self.stop_signal is not None
                if checkpoint or stopping or time.perf_counter() - read_at >= READ_BACK_SECONDS:
                    self._read_back(pending)  # before anything is saved: a non-finite loss must stop the run first
                    pending, read_at = [], time.perf_counter()
                    bar.update(task, completed=index, loss=self.running["loss"] / (self.running["weight"] or 1),
                               acc=self.running["correct"] / max(1, self.running["seen"]),
                               rate=seen_now / (read_at - started))
                if checkpoint or stopping:
                    self.save_last()
                if stopping:
                    self._draw_curves(final=True)
                    raise TrainingInterrupted(f"stopped by {self.stop_signal} at epoch {self.epoch + 1}, batch "
                                              f"{self.batch}; checkpoint saved. Resume with: residual train "
                                              f"--resume {self.run_dir}")
            self._read_back(pending)
        seconds = time.perf_counter() - started
        sums = self.running
        loss, weight, correct, seen, seen_now, label_loss, distill_loss = self.world.sum(
            [sums["loss"], sums["weight"], sums["correct"], sums["seen"], seen_now, sums["label_loss"],
             sums["distill_loss"]], self.device)
        stats = {"train_loss": loss / (weight or 1), "train_acc": correct / max(1, seen),
                 "images_per_s": seen_now / seconds if seconds > 0 else 0.0, "epoch_seconds": seconds}
        if self.teacher is not None:  # train_loss is their weighted sum, which the step minimises
            stats |= {"train_label_loss": label_loss / (weight or 1),
                      "train_distill_loss": distill_loss / (weight or 1)}
        if c.progressive_resize:
            stats["train_size"] = self.train_sizes[self.epoch]
        self.running = empty_sums()
        return stats

    def _previewed(self, batches: Iterator) -> Iterator:
        """`batches` as they are, with train_batch.png drawn from the first (train/preview.py)."""
        first = next(batches, None)
        if first is None:
            return
        images, labels = first
        if len(labels):  # not a batch whose every image was unreadable
            c = self.config
            write_batch_preview(images, labels, self.augment, c.augment.mixup, c.augment.cutmix,
                                self.model.class_names, self.run_dir / "train_batch.png")
        yield first
        yield from batches

    def _read_back(self, pending: list[PendingStep]) -> None:
        """One wait for the device: the pending steps' losses and hits go into the running sums, in order.

        The step itself never waits, so the host queues the next batches while the device works;
        a non-finite loss is caught here, before any checkpoint could save its weights.
        """
        if not pending:
            return
        on_device = [p.weight for p in pending if torch.is_tensor(p.weight)]  # class weights' sums
        parts = [part for p in pending if p.parts is not None for part in p.parts]
        values = torch.stack([p.loss for p in pending] + [p.correct.float() for p in pending] + on_device
                             + parts).tolist()
        count = len(pending)
        read_weights = iter(values[2 * count:2 * count + len(on_device)])
        read_parts = iter(values[2 * count + len(on_device):])
        steps: dict[int, list] = {}  # optimizer step -> [its loss summed over images, their weight, its lr]
        for p, loss, correct in zip(pending, values[:count], values[count:2 * count]):
            if not math.isfinite(loss):
                raise TrainingDiverged(f"non-finite loss ({loss}) at epoch {p.epoch + 1}, batch {p.index + 1} (step "
                                       f"{p.step}); nothing was saved from this point. The last good checkpoint "
                                       f"is {self.run_dir / 'last.pt'}; lower --lr or add --grad-clip")
            weight = next(read_weights) if torch.is_tensor(p.weight) else p.weight
            self.running["loss"] += loss * weight
            self.running["weight"] += weight
            self.running["correct"] += correct
            self.running["seen"] += p.images
            if p.parts is not None:
                self.running["label_loss"] += next(read_parts) * weight
                self.running["distill_loss"] += next(read_parts) * weight
            step = steps.setdefault(p.step, [0.0, 0.0, p.lr])
            step[0] += loss * weight
            step[1] += weight
        for tracker in self.trackers:  # each step's loss (its micro-batches' together) and rate
            tracker.add_steps([(number, total / weight, lr) for number, (total, weight, lr) in steps.items()
                               if weight])

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision when it is on; no autocast context otherwise (it exists only for some devices)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _optimizer_step(self, group: list) -> list[tuple]:
        """One optimizer step over the (images, labels) batches of `group`, their gradients accumulated -> each batch's
        (loss, correct predictions, loss terms or None, `_loss_weight`), still on the device.

        Every image weighs the same in the step (times its class weight), as in one batch of them all,
        whatever the sizes of the batches (also the epoch's last group, which may be shorter) and of the
        other workers' batches.
        """
        # DDP averages the workers' gradients: each divides by the global batch's weight over the worker
        # count, so the average is the global batch's mean also when the workers' weights differ (class
        # weights, a skipped image).
        weights = [self._loss_weight(labels) for _, labels in group]
        weight = self.world.average(sum(weights), self.device)
        # A group none of whose images could be read has a weight of 0 and a loss of 0: it divides by 1
        # instead, and steps with a zero gradient, so the workers keep stepping together and the schedule
        # keeps its length.
        weight = (weight or 1) if isinstance(weight, int) else torch.where(weight > 0, weight, 1.0)
        return [(*self._train_step(images, labels, weight, stepping=position == len(group) - 1,
                                   batch_weight=batch_weight), batch_weight)
                for position, ((images, labels), batch_weight) in enumerate(zip(group, weights))]

    def _loss_weight(self, labels: torch.Tensor) -> torch.Tensor | int:
        """What the loss of a batch is the mean over: its image count, or the sum of its class weights
        (a device tensor: nothing waits). Mixing images keeps it: each label is still used once."""
        return len(labels) if self.class_weights is None else self.class_weights[labels].sum()

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, step_weight: torch.Tensor | int | None = None,
                    stepping: bool = True, batch_weight: torch.Tensor | int | None = None):
        """Augment, forward, backward and (when `stepping`) the optimizer step on one batch ->
        (loss, correct predictions, with a teacher the labels' and the distillation term's loss, else None) as
        tensors still on the device: nothing here waits for it.

        `step_weight`: the `_loss_weight` of all the batches whose gradients this step accumulates
        (None: this batch alone), so the step's gradient is the mean over all their images.
        `batch_weight`: this batch's `_loss_weight`, when the caller has it already.
        """
        c = self.config
        # The compiled forward is compiled for the full batch. A batch that unreadable images shortened runs
        # eagerly: compiled, it would compile again for any batch size, and Dynamo would then run that slower
        # dynamic graph for every later batch.
        forward = self.forward if len(labels) == self.full_batch else self.eager_forward
        pixels = images.float().div_(255)
        if c.augmix_jsd:  # the consistency loss sees each image three times: clean, and two AugMix views
            x, targets = normalize(augmix_views(self.augment, pixels), self.model.preprocessing), labels
        else:
            x, targets = mix_batch(normalize(self.augment(pixels), self.model.preprocessing), labels,
                                   self.model.num_classes, c.augment.mixup, c.augment.cutmix, c.label_smoothing)
        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        teacher_logits = None if self.teacher is None else self.teacher(x)  # it sees the same augmented, mixed images
        batch_weight = self._loss_weight(labels) if batch_weight is None else batch_weight
        gradient_divisor = batch_weight if step_weight is None else step_weight
        # Accumulating micro-batches need no gradient exchange until the one that steps.
        accumulating = self.world.distributed and not stepping
        with forward.no_sync() if accumulating else contextlib.nullcontext():
            loss_sum, logits, parts = self._backward(forward, x, targets, labels, teacher_logits, gradient_divisor)
        if stepping:
            if c.sam:
                # What the step reports stays the unperturbed weights': copied, as a CUDA graph's next replay
                # would overwrite its outputs.
                loss_sum, logits = loss_sum.detach().clone(), logits.detach().clone()
                parts = None if parts is None else parts.detach().clone()
                self._sharpness_aware_gradient(forward, x, targets, labels, teacher_logits, gradient_divisor)
            if c.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema:
                self.ema.update(self.model)
            self.step += 1
        divisor = batch_weight if len(labels) else 1  # an empty batch's loss is 0 (of weight 0)
        return (loss_sum.detach() / divisor, correct_predictions(logits.detach(), labels),
                None if parts is None else parts.detach() / divisor)

    def _backward(self, forward: nn.Module, x: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                  teacher_logits: torch.Tensor | None, divisor: torch.Tensor | int):
        """Forward, loss and backward of one prepared batch, the loss divided by `divisor` -> (the loss sum,
        logits, with a teacher the labels' and the distillation term's loss sums, else None)."""
        c = self.config
        if self.cuda_graphs and forward is self.forward:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            logits = views = forward(x)
            if c.augmix_jsd:
                logits = views[:len(labels)]  # the clean view: what the labels' term and top-1 see
            loss_sum = label_loss_sum(logits, targets, labels, c.loss, c.label_smoothing, c.bce_target_threshold,
                                      self.class_weights)
            if c.augmix_jsd:
                image_weights = None if self.class_weights is None else self.class_weights[labels]
                loss_sum = loss_sum + c.augmix_jsd * consistency_sum(views, JSD_VIEWS, image_weights)
        parts = None
        if teacher_logits is not None:
            image_weights = None if self.class_weights is None else self.class_weights[labels]
            parts = torch.stack((loss_sum, distillation_sum(logits, teacher_logits, c.distill_temperature,
                                                            image_weights)))
            loss_sum = (1 - c.distill_weight) * parts[0] + c.distill_weight * parts[1]
        self.scaler.scale(loss_sum / divisor).backward()
        return loss_sum, logits, parts

    def _sharpness_aware_gradient(self, forward: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                                  labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                                  divisor: torch.Tensor | int) -> None:
        """Replace the gradient by the one at the nearby weights where the loss rises fastest (SAM, Foret et al.
        2021): a step of length rho along the gradient, or with --sam-adaptive each weight's share of it
        scaled by the weight's size (ASAM, Kwon et al. 2021), so that training seeks minima that stay low
        around them. The weights go back, and batch norm's running statistics keep the first pass's update
        alone."""
        c = self.config
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        gradients = [p.grad for p in parameters]
        if c.sam_adaptive:
            sizes = [p.detach().abs() for p in parameters]
            gradients = torch._foreach_mul(gradients, sizes)  # |w| g, whose norm ASAM's step is measured in
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gradients)))
        steps = torch._foreach_mul(gradients, c.sam / (norm + 1e-12))
        if c.sam_adaptive:
            steps = torch._foreach_mul(steps, sizes)  # rho |w|² g / ‖|w| g‖
        weights = [p.detach().clone() for p in parameters]  # restored exactly, not by subtracting the step again
        buffers = list(self.model.buffers())
        statistics = [buffer.clone() for buffer in buffers]
        with torch.no_grad():
            torch._foreach_add_(parameters, steps)
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(forward, x, targets, labels, teacher_logits, divisor)
        with torch.no_grad():
            torch._foreach_copy_(parameters, weights)
            for buffer, saved in zip(buffers, statistics):  # a net without batch norm has none
                buffer.copy_(saved)

    @torch.inference_mode()
    def evaluate(self) -> dict:
        """The validation split's loss and scores: top-1 and top-5, or for multi-label data mean average
        precision (val_map), micro F1 and exact match at the model's threshold."""
        if self.dataset.multi_label:
            return self._evaluate_multi_label()
        batch_sums, count = [], 0  # per batch: loss, top-1 and top-5 hits, read back once at the end
        k = min(5, len(self.dataset.classes))
        for logits, labels in self._validation_logits():
            ranked = logits.topk(k, dim=1).indices
            batch_sums.append(torch.stack((F.cross_entropy(logits, labels, reduction="sum"),
                                           (ranked[:, 0] == labels).sum().float(),
                                           (ranked == labels[:, None]).any(1).sum().float())))
            count += len(labels)
        rows = torch.stack(batch_sums).tolist() if batch_sums else []
        loss_sum, top1, top5 = (sum(column) for column in zip(*rows)) if rows else (0.0, 0.0, 0.0)
        loss_sum, top1, top5, count = self.world.sum([loss_sum, top1, top5, count], self.device)
        return {"val_loss": loss_sum / count, "val_top1": top1 / count, "val_top5": top5 / count}

    def _evaluate_multi_label(self) -> dict:
        """mAP ranks every validation image by each class, so the probabilities are gathered whole (on the
        host, from every worker) rather than summed batch by batch."""
        probs, targets = [], []
        for logits, labels in self._validation_logits():
            probs.append(logits.sigmoid())
            targets.append(labels)
        classes = len(self.dataset.classes)  # a worker's share may be empty: (0, classes) still joins the others'
        probs_all = self.world.gather(torch.cat(probs).cpu().numpy() if probs else np.zeros((0, classes)))
        targets_all = self.world.gather(torch.cat(targets).cpu().numpy() if targets else np.zeros((0, classes)))
        model = self.ema.module if self.ema else self.model
        scores = multi_label_metrics(probs_all, targets_all, list(self.dataset.classes), model.threshold)
        # mAP is undefined where no class has both positive and negative validation images: 0, not NaN, so that
        # an epoch is still kept (validation_warnings says how little such a split measures).
        return {"val_loss": scores["loss"], "val_map": scores["map"] or 0.0, "val_f1": scores["micro"]["f1"],
                "val_exact_match": scores["exact_match"]}

    def _validation_logits(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 logits, labels) of each validation batch, still on the device, from the EMA weights if any."""
        model = self.ema.module if self.ema else self.model
        model.eval()
        for images, labels in self.val_loader.epoch(0):
            x = normalize(images.float().div_(255), model.preprocessing)
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = model(x).float()
            yield logits, labels

    def _end_epoch(self, train_stats: dict, val_stats: dict) -> None:
        """Record the epoch, keep the best model, ask early stopping, save last.pt."""
        c = self.config
        row = {"epoch": self.epoch + 1, **train_stats, **val_stats, "lr": self.optimizer.param_groups[0]["lr"]}
        self.history.append(row)
        if self.world.is_main:
            write_metrics(self.history, self.run_dir / "metrics.csv")
        for tracker in self.trackers:
            tracker.add_epoch(row)
        self._draw_curves(final=False)
        value = val_stats[c.monitor]
        higher_is_better = c.monitor != "val_loss"
        improved = self.best is None or (value > self.best[c.monitor] if higher_is_better
                                         else value < self.best[c.monitor])
        # A small validation set saturates (100% top-1 from the first epoch): at an equal score the lower
        # val loss is the better model to keep. Only an improvement of `monitor` resets early stopping.
        tie_won = (not improved and higher_is_better and value == self.best[c.monitor]
                   and val_stats["val_loss"] < self.best["val_loss"])
        keep = (improved or tie_won) and math.isfinite(value) and self._weights_finite()
        self.epochs_since_best = 0 if keep and improved else self.epochs_since_best + 1
        if keep:
            self.best, self.best_epoch = dict(row), self.epoch + 1
            self._save_model(self.run_dir / "model.safetensors", val_stats)
        if c.keep_best:
            self._keep_among_best(value, val_stats)
        self.console.print(  # one line per epoch, also in quiet mode (which only drops the bar)
            f"epoch {self.epoch + 1}/{c.epochs}  train loss {row['train_loss']:.4f} "
            + (f"(labels {row['train_label_loss']:.4f}, teacher {row['train_distill_loss']:.4f}) "
               if self.teacher is not None else "")
            + f"acc {row['train_acc']:.2%}  val loss {row['val_loss']:.4f} "
            + (f"mAP {row['val_map']:.2%} F1 {row['val_f1']:.2%} exact {row['val_exact_match']:.2%}  "
               if self.dataset.multi_label else f"top-1 {row['val_top1']:.2%} "
               + (f"top-5 {row['val_top5']:.2%} " if shows_top5(len(self.dataset.classes)) else "") + " ")
            + f"lr {row['lr']:.3g}  {row['images_per_s']:.0f} img/s"
            + (f" at {row['train_size']} px" if "train_size" in row else "") + f"  {row['epoch_seconds']:.1f}s"
            + ("  *best*" if self.best_epoch == self.epoch + 1 else ""))
        if self.plateau is not None and self.epoch + 1 > c.optim.warmup_epochs and self.plateau.update(value):
            self._cut_learning_rate()
        self.epoch, self.batch = self.epoch + 1, 0
        # Progressive resizing's small epochs validate low (at the full size): only a full-size epoch may stop it.
        at_full_size = self.train_sizes[self.epoch - 1] == c.image_size
        self.stopped_early = bool(c.early_stopping) and self.epochs_since_best >= c.early_stopping and at_full_size
        self.save_last()
        if c.keep_best and self.world.is_main:  # once last.pt no longer lists them
            kept = {f"epoch-{epoch:03d}.safetensors" for _, _, epoch in self.kept}
            for path in self.run_dir.glob("epoch-*.safetensors"):
                if path.name not in kept:
                    path.unlink()
        if self.epoch_end is not None and (reason := self.epoch_end(row)):
            self.stopped_by = reason
            self.console.print(f"stopped: {reason}")

    def _save_model(self, path: Path, val_stats: dict) -> None:
        """The model as it is now (its EMA, with --ema) to `path`, with the epoch and its validation numbers."""
        if self.world.is_main:
            save_model(self.ema.module if self.ema else self.model, path,
                       extra={"run": str(self.run_dir), "epoch": self.epoch + 1, **val_stats})

    def _keep_among_best(self, value: float, val_stats: dict) -> None:
        """--keep-best K: this epoch's model file joins the K best epochs' if it ranks among them (by `monitor`,
        then the lower val loss, then the earlier epoch, as the best epoch is chosen); the file of the epoch it
        pushes out is deleted once last.pt is saved."""
        if not math.isfinite(value):
            return
        higher_is_better = self.config.monitor != "val_loss"
        entry = (value, val_stats["val_loss"], self.epoch + 1)
        ranked = sorted(self.kept + [entry], key=lambda e: (-e[0] if higher_is_better else e[0], e[1], e[2]))
        kept = ranked[:self.config.keep_best]
        if entry in kept and self._weights_finite():
            self.kept = kept
            self._save_model(self.run_dir / f"epoch-{self.epoch + 1:03d}.safetensors", val_stats)

    def _cut_learning_rate(self) -> None:
        """--schedule plateau cut the rate: the next step takes it (the scheduler sets rates after each step)."""
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        c = self.config
        self.console.print(f"learning rate cut to {self.optimizer.param_groups[0]['lr']:.3g}: {c.monitor} has not "
                           f"improved for {c.optim.plateau_patience + 1} epochs")

    def _draw_curves(self, final: bool) -> None:
        """curves.png at the end of the epochs that end CURVES_EVERY_S or more after the start or the last drawing,
        and at the end: a drawing takes 0.2-1 s on a 2-core CPU, which epochs of a few seconds would otherwise
        spend mostly on, and a run that ends within the interval is drawn once, whole."""
        if not self.world.is_main or self.curves_drawn == len(self.history):
            return
        if final or time.monotonic() - self.curves_drawn_at >= CURVES_EVERY_S:
            c = self.config
            plot_curves(self.history, self.run_dir / "curves.png", f"{c.model} on {Path(c.data).name}")
            self.curves_drawn, self.curves_drawn_at = len(self.history), time.monotonic()

    def _weights_finite(self) -> bool:
        model = self.ema.module if self.ema else self.model
        return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())

    def _finish(self) -> TrainResult:
        self.bad.files = self.world.merge(self.bad.files)  # each worker read only its share of the files
        self._draw_curves(final=True)
        summary = {"best_epoch": self.best_epoch, "best": self.best, "epochs_run": self.epoch,
                   "stopped_early": self.stopped_early, "stopped_by": self.stopped_by, "workers": self.world.size,
                   "resumes": self.resumes,
                   "bad_files": self.bad.files, "ignored_files": [str(p) for p in self.dataset.ignored]}
        if self.world.is_main:
            with atomic_path(self.run_dir / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
            if self.config.report and self.best is not None:
                self._write_report()
        # The pictures but curves.png, whose numbers the trackers have already.
        pictures = sorted(path for path in self.run_dir.glob("*.png") if path.name != "curves.png")
        for tracker in self.trackers:
            tracker.finish(self.config.to_dict(), self.best or {}, self.best_epoch, pictures, self.epoch)
        self._close_trackers("FINISHED")
        self.world.barrier()  # the other workers wait, so the group ends together
        best = self.best or {}
        score = "val_map" if self.dataset.multi_label else "val_top1"
        self.console.print(
            f"\nbest epoch {self.best_epoch}: {VAL_SCORE_NAMES[score]} {best.get(score, float('nan')):.2%}"
            + (" (stopped early)" if self.stopped_early else "")
            + (f"; {len(self.bad.files)} unreadable image(s) skipped" if self.bad.files else "")
            + (f"; {len(self.dataset.ignored)} non-image file(s) ignored" if self.dataset.ignored else ""))
        self.console.print(f"run directory: {self.run_dir} (model.safetensors, metrics.csv, curves.png, last.pt"
                           + (", train_batch.png, report.html" if self.config.report and self.best is not None
                              else "") + (", tensorboard/" if self.config.tensorboard else "")
                           + (", mlflow.json" if self.config.mlflow is not None else "")
                           + (", wandb.json, wandb/" if self.config.wandb is not None else "")
                           + (f", the {len(self.kept)} best epochs' epoch-NNN.safetensors" if self.kept else "") + ")")
        return TrainResult(self.run_dir, self.best_epoch, best, self.history, dict(self.bad.files),
                           len(self.dataset.ignored), self.stopped_early, self.run_dir / "model.safetensors",
                           self.stopped_by)

    def _write_report(self) -> None:
        """The evaluation report of the best model on the validation split, into the run directory."""
        model = load_model(self.run_dir / "model.safetensors").to(self.device)
        c = self.config
        result = evaluate(model, self.dataset, "val", batch_size=2 * c.batch_size, out_dir=self.run_dir,
                          workers=c.workers, progress=not c.quiet,
                          title=f"{c.model} on {Path(c.data).name}: validation report (best epoch {self.best_epoch})")
        score = "map" if self.dataset.multi_label else "top1"
        seen = self.best[f"val_{score}"]
        # The report computes in float32, as `residual eval` does; under mixed precision the epochs' validation
        # did not, and an image or two near a tie can go the other way: both figures are given.
        precision = (f" in float32; {seen:.2%} in the epoch's {str(self.amp_dtype).removeprefix('torch.')} "
                     f"validation" if self.amp_dtype is not None else "")
        self.console.print(f"validation report: {result.files['report']} ({VAL_SCORE_NAMES['val_' + score]} "
                           f"{result.metrics[score]:.2%}{precision}, ECE {result.metrics['ece']:.3f})")


VAL_SCORE_NAMES = {"val_top1": "val top-1", "val_map": "val mAP"}


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A batch's right answers, on the device: images whose top-1 is their class, or for multi-label
    (multi-hot) labels each image's share of classes called right at probability 0.5 (logit 0)."""
    if labels.dim() == 2:
        return ((logits > 0) == labels.bool()).float().mean(1).sum()
    return (logits.argmax(1) == labels).sum()


def step_groups(batches: Iterable, accumulate: int) -> Iterator[list]:
    """The batches in groups of `accumulate`, each group one optimizer step; the last group takes what is left."""
    batches = iter(batches)
    return iter(lambda: list(itertools.islice(batches, accumulate)), [])


def class_weights(counts: list[int]) -> torch.Tensor:
    """Loss weights inversely proportional to class frequency, averaging 1 over the classes present."""
    counts_t = torch.tensor(counts, dtype=torch.float32)
    weights = torch.where(counts_t > 0, 1.0 / counts_t.clamp_min(1), torch.zeros(()))
    return weights * (counts_t > 0).sum() / weights.sum()


def channel_stats(images: torch.Tensor, sample: int = 5000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of up to `sample` evenly spaced images."""
    step = max(1, len(images) // sample)
    data = images[::step].float().div(255)
    return (tuple(data.mean(dim=(0, 2, 3)).tolist()), tuple(data.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()))


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the loop to save and stop at the next step; a second SIGINT stops at once."""
    def handler(signum, frame):
        if trainer.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = trainer.stop_signal or signal.Signals(signum).name  # a SIGTERM after a SIGINT

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay with whoever owns them
        previous = {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
