"""The training configuration: one dataclass, saved whole as the run's config.yaml.

Fields left as None ("auto") are resolved from the data before training, and
the resolved values are what config.yaml records, with a record of which were
chosen automatically: `residual train --config RUN/config.yaml` repeats the run
exactly, and with a flag changed it chooses those again for the new flags.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..atomic import atomic_path
from ..data.datasets import Dataset
from ..data.decode import BadImageError, read_image
from ..data.device_decode import DECODERS, check_decoder
from ..data.transforms import AugmentConfig
from ..errors import ConfigError
from ..models import model_config
from ..runs import compile_repays, pick_device
from ..weights import pretrained_source
from .optim import OptimConfig
from .progressive import check_ramp, default_ramp

MONITORS = ("val_top1", "val_loss", "val_map")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOSSES = ("ce", "bce")
# The automatic learning rate per 128 images (small images) or 256 (large), by optimizer: SGD's is Goyal et
# al.'s; the adaptive optimizers divide each step by a gradient scale, so theirs is the usual 1e-3 (at 0.1
# a resnet20 on shapes stayed at chance with Adam, AdamW and RMSprop).
BASE_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}
# LAMB's rate is relative to each layer's size (the trust ratio), and is not scaled with the batch: RSB's A3
# uses it at 2048 images, and on shapes at 128 it did best between 5e-3 and 2e-2 (docs/training.md).
LAMB_LR = 8e-3
# The automatic batch: 128 images, halved down to 32 while an epoch would be fewer optimizer steps than this.
# On a few thousand images 128-image batches make an epoch a few dozen steps, and the default epochs underfit;
# at the same epochs (the same images seen, about the same time) smaller batches learned more, and more again
# at 128's rate (auto_lr_batch; docs/training.md).
AUTO_BATCH, SMALLEST_AUTO_BATCH, AUTO_BATCH_STEPS_PER_EPOCH = 128, 32, 64
# The automatic warm-up of a from-scratch cosine run: 5 epochs (timm's default, as Goyal et al. 2017), at most a
# sixth of the run. On 3,000 images it took 30 epochs from 52.5% to 71.2% validation top-1, and at 4x the rate
# from 37.5% to 90.2% (docs/training.md).
AUTO_WARMUP_EPOCHS, AUTO_WARMUP_SHARE = 5.0, 1 / 6
# Training sets under this many images are few: a from-scratch run on images over 64 px gets resnet18 rather than
# resnet50, and random-resized crops of at least 0.35 of the image (auto_gentle_crops).
FEW_IMAGES = 50_000
STRATEGIES = ("full", "linear-probe", "two-stage")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    model: str | None = None  # a registry name; auto: by image size and dataset size
    model_options: dict = field(default_factory=dict)  # any ResNetConfig field, e.g. {"drop_rate": 0.2}
    pretrained: str | None = None  # fine-tune from a pretrained name, a model file or a checkpoint (--from)
    strategy: str = "full"  # 'full', 'linear-probe' (frozen backbone and BN statistics), 'two-stage'
    freeze_stages: int = 0  # keep the stem and the first K stages frozen throughout
    head_epochs: int = 3  # two-stage: epochs that train the new head alone
    unfreeze_stages: int | None = None  # two-stage: stages (from the top) trained after that; None = all
    layer_lr_decay: float | None = None  # lr factor per layer group toward the input; auto: 0.5 two-stage, else 1
    image_size: int | None = None  # auto: from the images
    eval_image_size: int | None = None  # what validation and the saved model take; None: image_size (FixRes: more)
    # Above 64 px: the share of the resized image the centre crop keeps (eval_image_size / resize); None: a
    # pretrained source's own, else 0.875 (256 for 224). RSB tests at 0.95, torchvision's newer weights 224/232.
    crop_pct: float | None = None
    # Progressive resizing (train/progressive.py): the smallest training size, where the run starts.
    progressive_resize: int | None = None
    # (the last epoch at that size, the first at image_size); auto: the last two eighths of the epochs ramp up
    progressive_ramp: tuple[int, int] | None = None
    epochs: int | None = None  # auto: 30
    # The global batch: split among distributed workers, and what the lr is scaled by. Auto: 128, or less on a
    # small training set (auto_batch_size)
    batch_size: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)  # lr and weight decay auto unless given
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # preset auto unless given
    label_smoothing: float = 0.0
    # 'ce' (softmax cross-entropy) or 'bce' (one sigmoid per class, as "ResNet strikes back"); auto: ce, and bce
    # for multi-label data (which it must be)
    loss: str | None = None
    bce_target_threshold: float | None = None  # with bce: mixed targets above it become 1, the rest 0 (RSB: 0.2)
    class_weights: str | None = None  # 'auto': loss weights inversely proportional to class frequency
    balanced_sampler: bool = False  # draw each epoch with replacement so every class is equally likely
    aug_repeats: int = 1  # repeated augmentation: each drawn image this many times per epoch, augmented anew
    augmix_jsd: float | None = None  # AugMix's consistency loss: the Jensen-Shannon term's weight (the paper: 12)
    grad_clip: float | None = None  # max gradient norm
    accumulate: int = 1  # micro-batches per optimizer step
    ema: float | None = None  # decay of an exponential moving average of the weights, e.g. 0.999
    sam: float | None = None  # sharpness-aware minimisation: the radius rho of the weights' worst-case step
    sam_adaptive: bool = False  # ASAM: that step scaled by each weight's size (rho about 10x SAM's)
    teacher: str | None = None  # knowledge distillation: a trained model file whose softened predictions it learns
    distill_weight: float = 0.5  # with a teacher: the distillation term's share of the loss (the labels' the rest)
    distill_temperature: float = 4.0  # with a teacher: how much both models' probabilities are softened
    early_stopping: int | None = None  # patience in epochs without improvement of `monitor`
    keep_best: int = 0  # also keep the K best epochs' model files, RUN/epoch-NNN.safetensors (for residual soup)
    monitor: str | None = None  # what picks the best epoch; auto: val_top1, and val_map for multi-label data
    val_split: float | None = None  # fraction of train held out when the data has no val/ folder
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool | None = None  # auto: bf16 (or fp16 + scaler) on CUDA, off elsewhere
    channels_last: bool = True
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass: less memory
    compile: bool | None = None  # auto: on CUDA for runs long enough to repay compilation (auto_compile)
    compile_mode: str | None = None  # torch.compile's mode; auto: CUDA graphs for small inputs (auto_compile_mode)
    sync_bn: bool = False  # distributed on CUDA: batch norm statistics over the global batch (SyncBatchNorm)
    workers: int | None = None  # decoding processes; auto: this machine's cores less one, shared by its workers
    in_memory: bool | None = None  # auto: when the decoded split fits in 2 GiB
    decoder: str = "pillow"  # files streamed from disk: 'pillow' in the workers, 'torchvision' on the device
    checkpoint_every: int = 0  # also save last.pt every N optimizer steps (0: at epoch ends only)
    max_bad_streak: int = 20  # unreadable images in a row before training stops
    out: str = "runs/train"
    name: str | None = None
    quiet: bool = False
    report: bool = True  # at the end, evaluate the best model on val: metrics.json, pictures, report.html
    tensorboard: bool = False  # each epoch's numbers also as TensorBoard scalars in RUN/tensorboard/
    mlflow: str | None = None  # also an MLflow run at this tracking URI ("": MLFLOW_TRACKING_URI's); None: none
    wandb: str | None = None  # also a Weights & Biases run in this project ("": WANDB_PROJECT's); None: none
    group: str | None = None  # the runs this one belongs with (a search's trials): W&B's group, MLflow's tag

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy != "full" and not self.pretrained:
            raise ConfigError(f"--strategy {self.strategy} freezes a pretrained backbone: give --from")
        if self.freeze_stages < 0 or (self.unfreeze_stages is not None and self.unfreeze_stages < 0):
            raise ConfigError("--freeze-stages and --unfreeze-stages count stages: 0 or more")
        if self.freeze_stages and not self.pretrained:
            raise ConfigError("--freeze-stages keeps pretrained stages fixed: give --from (frozen random weights "
                              "would stay random)")
        if self.unfreeze_stages is not None and self.strategy != "two-stage":
            raise ConfigError("--unfreeze-stages chooses what --strategy two-stage trains after its head epochs: "
                              "give --strategy two-stage, or --freeze-stages to keep the first stages fixed")
        if self.class_weights not in (None, "auto"):
            raise ConfigError(f"--class-weights takes 'auto', got {self.class_weights!r}")
        if self.monitor not in (None, *MONITORS):
            raise ConfigError(f"--monitor must be one of {MONITORS}, got {self.monitor!r}")
        if self.progressive_ramp is not None:
            if self.progressive_resize is None:
                raise ConfigError("--progressive-ramp times progressive resizing: give --progressive-resize MIN too")
            if len(self.progressive_ramp) != 2:
                raise ConfigError(f"--progressive-ramp takes two epochs, START,END; got {self.progressive_ramp}")
            object.__setattr__(self, "progressive_ramp", tuple(int(epoch) for epoch in self.progressive_ramp))
        for flag, value, least in [("--epochs", self.epochs, 1), ("--image-size", self.image_size, 1),
                                   ("--eval-image-size", self.eval_image_size, 1),
                                   ("--progressive-resize", self.progressive_resize, 1),
                                   ("--batch-size", self.batch_size, 1), ("--accumulate", self.accumulate, 1),
                                   ("--early-stopping", self.early_stopping, 1), ("--head-epochs", self.head_epochs, 0),
                                   ("--keep-best", self.keep_best, 0),
                                   ("--workers", self.workers, 0), ("--checkpoint-every", self.checkpoint_every, 0),
                                   ("--max-bad-streak", self.max_bad_streak, 0),
                                   ("--aug-repeats", self.aug_repeats, 1)]:
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"--grad-clip is the largest gradient norm let through: positive, got {self.grad_clip}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"--decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.compile_mode not in (None, *COMPILE_MODES):
            raise ConfigError(f"--compile-mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"--crop-pct is the share of the resized image the centre crop keeps: in (0, 1], got "
                              f"{self.crop_pct}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.loss not in (None, *LOSSES):
            raise ConfigError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.bce_target_threshold is not None and (self.loss not in (None, "bce")  # None: bce if multi-label
                                                      or not 0.0 <= self.bce_target_threshold < 1):
            raise ConfigError(f"--bce-target-threshold goes with --loss bce and is in [0, 1), got "
                              f"{self.bce_target_threshold} with --loss {self.loss}")
        if self.layer_lr_decay is not None and not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"--layer-lr-decay is the lr's factor per layer group toward the input: in (0, 1], got "
                              f"{self.layer_lr_decay}")
        if not 0.0 < self.distill_weight <= 1.0:
            raise ConfigError(f"--distill-weight is the distillation term's share of the loss: in (0, 1], got "
                              f"{self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.augmix_jsd is not None:
            self._check_augmix_jsd()
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"--ema is the average's decay per step, between 0 and 1 (e.g. 0.999), got {self.ema}")
        if self.sam is not None and self.sam <= 0:
            raise ConfigError(f"--sam is the radius of SAM's step: positive (the paper: 0.05; with --sam-adaptive "
                              f"0.5), got {self.sam}")
        if self.sam_adaptive and not self.sam:
            raise ConfigError("--sam-adaptive scales SAM's step: give --sam RHO too (0.5 is ASAM's usual)")
        if self.sam and self.accumulate > 1:
            raise ConfigError(f"--sam takes its step from the whole batch's gradient, which --accumulate "
                              f"{self.accumulate} only has after the last micro-batch: drop one of them")

    def _check_augmix_jsd(self) -> None:
        """The consistency loss compares AugMix views of unmixed images through softmax, with no teacher."""
        if self.augmix_jsd <= 0:
            raise ConfigError(f"--augmix-jsd is the consistency term's weight: positive (the paper: 12), got "
                              f"{self.augmix_jsd}")
        if self.augment.auto_augment != "augmix":
            raise ConfigError("--augmix-jsd compares AugMix views of each image: give --auto-augment augmix with it")
        clashes = [flag for flag, on in [("--mixup", self.augment.mixup), ("--cutmix", self.augment.cutmix),
                                         ("--teacher", self.teacher), ("--loss bce", self.loss == "bce")] if on]
        if clashes:
            raise ConfigError(f"--augmix-jsd compares the softmax of AugMix views of unmixed images, with no "
                              f"teacher: drop {', '.join(clashes)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        for key, part in (("optim", OptimConfig), ("augment", AugmentConfig)):
            if isinstance(data.get(key), dict):
                data[key] = part(**_known_options(part, data[key], f"{key} option(s)", f"{key}."))
        if "data" not in data:
            raise ConfigError("give the dataset folder (residual train DATA), or --config with data: in it")
        return cls(**_known_options(cls, data, "training option(s)"))


# The key under which config.yaml records what `resolve` chose for the settings left automatic.
AUTO_RECORD = "auto"


def save_config(config: TrainConfig, path: Path, given: TrainConfig | None = None) -> None:
    """`config` as YAML; with `given` (what was asked, before `resolve`), also a record of what was chosen
    automatically, so that `--config` chooses those again (see `options_as_asked`)."""
    options = plain_yaml(config.to_dict())
    if given is not None:
        options[AUTO_RECORD] = plain_yaml(chosen_automatically(given, config))
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(options, sort_keys=False))


def chosen_automatically(given: TrainConfig, resolved: TrainConfig) -> dict:
    """Every setting `given` left automatic (None) and `resolved` filled in, by dotted name ('optim.lr')."""
    asked, chosen = flatten(given.to_dict()), flatten(resolved.to_dict())
    return {name: value for name, value in chosen.items() if asked.get(name) is None and value is not None}


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested settings as one level: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1} (an empty one sets nothing)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _known_options(cls, options: dict, what: str, prefix: str = "") -> dict:
    """`options` if each names a field of the dataclass `cls` and has a value of its type, else a ConfigError
    naming the others, or the first value of the wrong type (a config file's `epochs: lots` was a TypeError deep in
    the run)."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}")
    hints = typing.get_type_hints(cls)
    for name, value in options.items():
        if (wanted := _type_mismatch(value, hints[name])) is not None:
            raise ConfigError(f"{prefix}{name}: {'null' if value is None else repr(value)} is not {wanted}")
    return options


SIMPLE_TYPES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _type_mismatch(value, hint) -> str | None:
    """What a setting of type `hint` takes, in words, when `value` is not that; None when it is, or when the type is
    not a plain one (a tuple, a mapping, a nested config: those are checked where they are used)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in allowed
    allowed = tuple(kind for kind in allowed if kind is not type(None))
    if not all(kind in SIMPLE_TYPES for kind in allowed):
        return None
    if value is None:
        return None if optional else SIMPLE_TYPES[allowed[0]]
    if isinstance(value, bool):  # a bool is an int to Python, never a count or a rate in a config
        fits = bool in allowed
    else:
        fits = any(isinstance(value, (int, float) if kind is float else kind) for kind in allowed)
    return None if fits else " or ".join(SIMPLE_TYPES[kind] for kind in allowed)


def read_config(path: str | Path) -> dict:
    """The training options of a YAML file (a run's config.yaml, or one written by hand)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        options = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: a config file maps training options to values, as a run's config.yaml does")
    return options


def load_config(path: str | Path) -> TrainConfig:
    """The run as it ran: every setting as resolved."""
    options = read_config(path)
    options.pop(AUTO_RECORD, None)
    return TrainConfig.from_dict(options)


def options_as_asked(path: str | Path) -> dict:
    """A config file's options with the settings that were chosen automatically left automatic again.

    A run's config.yaml holds resolved values: the learning rate for its optimizer and batch, the preset's
    augmentation knobs, compile for its device and length. Given as they stand to a new run that changes a
    flag, they would be stale (`--optimizer adam` at SGD's 0.1, `--augment strong` with the cifar preset's
    knobs). So a setting still at the value its `auto` record says was chosen is chosen again for the new
    run; with the same data and flags that is the same value, so the run repeats. A value edited by hand
    differs from the record and is kept; a file without the record (written by hand, or by residual before
    it kept one) is taken as it stands.
    """
    options = read_config(path)
    record = options.pop(AUTO_RECORD, None) or {}
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: '{AUTO_RECORD}:' records the settings chosen automatically, as a mapping of "
                          f"names to values; delete it to keep every value as it stands")
    for name, value in record.items():
        key, _, nested = name.partition(".")
        part = options.get(key) if nested else options
        field_name = nested or key
        if isinstance(part, dict) and field_name in part and plain_yaml(part[field_name]) == value:
            part[field_name] = None
    return options


def plain_yaml(value):
    """Tuples -> lists, recursively, so safe_dump writes plain YAML."""
    if isinstance(value, dict):
        return {k: plain_yaml(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_yaml(v) for v in value]
    return value


def typical_image_size(dataset: Dataset, sample: int = 64) -> int:
    """The median shorter side of the first `sample` readable training images."""
    if dataset.train.images is not None:
        return int(dataset.train.images.shape[-1])
    sides = []
    for path in dataset.train.files[:sample]:
        try:
            sides.append(min(read_image(path).size))
        except BadImageError:
            continue
    if not sides:
        raise ConfigError(f"{dataset.root}: none of the first {sample} training images could be read")
    return int(sorted(sides)[len(sides) // 2])


COMPILE_FROM_STEPS = 2000  # an estimate, not yet measured on a GPU: compiling a ResNet-50 takes about a minute
# Inputs up to this size make kernels too short to hide their launch cost, which CUDA graphs remove
# (the speed issue's CIFAR figures are launch-bound); an estimate, not yet measured on a GPU.
CUDA_GRAPHS_UP_TO = 64


def auto_batch_size(train_images: int, accumulate: int = 1, processes: int = 1) -> int:
    """The batch `resolve` gives a run that names none: 128, halved (down to 32) while an epoch of
    `train_images` would be fewer than AUTO_BATCH_STEPS_PER_EPOCH optimizer steps; a multiple of `processes`,
    as the global batch divides among the workers."""
    batch = AUTO_BATCH
    while batch > SMALLEST_AUTO_BATCH and train_images / (batch * accumulate) < AUTO_BATCH_STEPS_PER_EPOCH:
        batch //= 2
    return math.ceil(batch / processes) * processes


def auto_warmup_epochs(config: TrainConfig, epochs: int) -> float:
    """The warm-up `resolve` gives a run that names none: a from-scratch run under the cosine schedule warms up
    for AUTO_WARMUP_EPOCHS, at most a sixth of its `epochs`. Fine-tuning starts from weights that already
    learned, one-cycle has a warm-up of its own, and the other schedules are the recipes', run as published."""
    if config.pretrained or config.optim.schedule != "cosine":
        return 0.0
    return min(AUTO_WARMUP_EPOCHS, epochs * AUTO_WARMUP_SHARE)


def auto_lr_batch(config: TrainConfig, batch_size: int, warmup_epochs: float) -> int:
    """The images per optimizer step the automatic rate scales with: the run's own, except where `resolve` halved
    the automatic batch for a from-scratch run whose rate warms up (a warm-up, or one-cycle's climb). Such a run
    keeps the rate of AUTO_BATCH: the halving is for more steps an epoch, not for smaller ones. Without a warm-up
    the higher rate did worse, and fine-tuning starts from weights it should not move far (docs/training.md)."""
    warms_up = warmup_epochs > 0 or config.optim.schedule == "onecycle"
    if config.batch_size is None and batch_size < AUTO_BATCH and not config.pretrained and warms_up:
        return AUTO_BATCH * config.accumulate
    return batch_size * config.accumulate


def auto_gentle_crops(config: TrainConfig, train_images: int) -> bool:
    """Whether the automatic random-resized crops keep at least GENTLE_CROP_SCALE of the image (0.35) instead of
    ImageNet's 0.08: in a from-scratch run on fewer than FEW_IMAGES training images. A crop of 8% often misses the
    object, noise a few thousand images and 30 epochs cannot afford to learn through (docs/training.md).
    Fine-tuning keeps 0.08, its source's training crops (0.35 is not measured there)."""
    return not config.pretrained and train_images < FEW_IMAGES


def optimizer_steps(config: TrainConfig, train_images: int) -> int:
    """Optimizer steps of the whole run."""
    return config.epochs * math.ceil(train_images / (config.batch_size * config.accumulate))


def auto_compile(device_type: str, steps: int) -> tuple[bool, str]:
    """Whether torch.compile pays for its warm-up in a run of `steps` optimizer steps, and why."""
    return compile_repays(device_type, steps, COMPILE_FROM_STEPS, "steps")


def auto_compile_mode(device_type: str, image_size: int, processes: int) -> tuple[str, str]:
    """torch.compile's mode when none is given, and why: CUDA graphs for small inputs in one process."""
    if device_type != "cuda":
        return "default", f"mode default (CUDA graphs exist only on CUDA; this run is on {device_type})"
    if image_size > CUDA_GRAPHS_UP_TO:
        return "default", f"mode default ({image_size} px inputs keep the GPU busy between kernel launches)"
    if processes > 1:  # BN + CUDA graphs + DDP is a known slowdown (pytorch/pytorch#139207)
        return "default", "mode default (CUDA graphs are not combined with distributed workers)"
    return "reduce-overhead", (f"mode reduce-overhead: CUDA graphs, because {image_size} px inputs make kernels "
                               f"too short to hide their launch cost")


def compile_choice(config: TrainConfig, image_size: int, train_images: int,
                   processes: int) -> tuple[bool, str | None, str]:
    """(compile or not, its mode, what the log says about whatever was chosen automatically)."""
    compile_on, reasons, device_type = config.compile, [], pick_device(config.device).type
    if compile_on is None:
        compile_on, why = auto_compile(device_type, optimizer_steps(config, train_images))
        reasons.append(why)
    mode = config.compile_mode
    if compile_on and mode is None:
        mode, why = auto_compile_mode(device_type, image_size, processes)
        reasons.append(why)
    return compile_on, mode if compile_on else None, "; ".join(reasons)


def compile_log(given: TrainConfig, resolved: TrainConfig, train_images: int, processes: int) -> str:
    """The log line saying what `resolve` chose for torch.compile and why ('' when the user chose it all)."""
    asked = dataclasses.replace(resolved, compile=given.compile, compile_mode=given.compile_mode)
    why = compile_choice(asked, resolved.image_size, train_images, processes)[2]
    return f"torch.compile: {why}" if why else ""


def resolve(config: TrainConfig, dataset: Dataset, processes: int = 1) -> TrainConfig:
    """Fill every auto field from the data: the values config.yaml records.

    Small images (up to 64 px) get a CIFAR-style net at their own size with the
    CIFAR recipe (SGD lr 0.1 per 128 images, weight decay 5e-4, pad-crop + flip);
    larger ones an ImageNet-style net at 224 px (128 px under 160 px) with
    random-resized crops, lr 0.1 per 256 images and weight decay 1e-4. Adam, AdamW and
    RMSprop start from 0.001 instead of 0.1 (BASE_LR), LAMB from 0.008 whatever the batch
    (LAMB_LR), and AdamW's and LAMB's decoupled weight decay is 0.01. The batch is 128
    images, fewer on a training set of under 8,192 (auto_batch_size), and the rate scales with it,
    except that a from-scratch run that warms up keeps batch 128's rate (auto_lr_batch).
    A from-scratch cosine run warms the rate up linearly for 5 epochs (auto_warmup_epochs), and on
    fewer than 50,000 images its random-resized crops keep at least 0.35 of the image (auto_gentle_crops).
    Fine-tuning (`pretrained`) keeps the source's architecture and input size; the
    new head trains at the usual rate, and the backbone at half the rate per layer
    group toward the input ('two-stage') or at a tenth of it ('full').
    `processes`: how many distributed workers will train (torch.compile's mode and the batch depend on it).
    """
    model, source_pre = config.model, None
    if config.pretrained:
        source_arch, source_pre = pretrained_source(config.pretrained)
        if model and source_arch and model != source_arch:  # the source's own architecture would be trained
            raise ConfigError(f"--model {model}: --from {config.pretrained} holds a {source_arch}; leave --model out "
                              f"or give {source_arch}")
        model = model or source_arch
        if model is None:
            raise ConfigError(f"--from {config.pretrained}: a foreign checkpoint; name its architecture with --model")
    typical = config.image_size or (source_pre.input_size if source_pre else typical_image_size(dataset))
    small = typical <= 64
    image_size = config.image_size or (typical if small or source_pre else (224 if typical >= 160 else 128))
    count = len(dataset.train)
    batch_size = config.batch_size or auto_batch_size(count, config.accumulate, processes)
    model = model or (("resnet20" if count < 20_000 else "resnet56") if small else
                      ("resnet18" if count < FEW_IMAGES else "resnet50"))
    # A new head learns at the from-scratch rate; the pretrained backbone gets less: per layer group
    # (layer_lr_decay) in 'two-stage', or ten times less overall when 'full' fine-tuning trains it all alike.
    fine_tuning_all = 0.1 if config.pretrained and config.strategy == "full" else 1.0
    epochs = config.epochs or 30
    given_warmup = config.optim.warmup_epochs
    warmup_epochs = given_warmup if given_warmup is not None else auto_warmup_epochs(config, epochs)
    scaled = (LAMB_LR if config.optim.optimizer == "lamb" else BASE_LR[config.optim.optimizer]
              * auto_lr_batch(config, batch_size, warmup_epochs) / (128 if small else 256))
    # Decoupled weight decay (AdamW, LAMB): PyTorch's AdamW default, RSB's A1 LAMB value.
    decay = 0.01 if config.optim.optimizer in ("adamw", "lamb") else 5e-4 if small else 1e-4
    optim = dataclasses.replace(
        config.optim,
        lr=config.optim.lr or scaled * fine_tuning_all,
        weight_decay=config.optim.weight_decay if config.optim.weight_decay is not None else decay,
        warmup_epochs=warmup_epochs)
    augment = config.augment.resolved(image_size, gentle_crops=auto_gentle_crops(config, count))
    layer_lr_decay = config.layer_lr_decay or (0.5 if config.strategy == "two-stage" else 1.0)
    progressive_ramp = None
    if config.progressive_resize is not None:
        if config.progressive_resize >= image_size:
            raise ConfigError(f"--progressive-resize {config.progressive_resize}: the smallest training size must be "
                              f"less than the full one, {image_size} px (--image-size)")
        progressive_ramp = config.progressive_ramp or default_ramp(epochs)
        check_ramp(progressive_ramp, epochs)
        if config.optim.schedule == "plateau":
            raise ConfigError("--schedule plateau cuts the rate when validation stops improving, which it does "
                              "while --progressive-resize trains small (validation is at the full size): use "
                              "another schedule")
    check_decoder(config.decoder, pick_device(config.device))  # before a run directory is written
    stages = len(model_config(model, **config.model_options).layers)  # likewise: an unknown model or option stops here
    for flag, given in [("--freeze-stages", config.freeze_stages), ("--unfreeze-stages", config.unfreeze_stages)]:
        if given is not None and given > stages:
            raise ConfigError(f"{flag} {given}: {model} has {stages} stages; give 0 to {stages}")
    compile_on, compile_mode, _ = compile_choice(dataclasses.replace(config, epochs=epochs, batch_size=batch_size),
                                                 image_size, count, processes)
    if dataset.multi_label:
        check_multi_label(config, dataset)
    elif config.monitor == "val_map":
        raise ConfigError(f"--monitor val_map: {dataset.root} has one class per image, which val_top1 measures; "
                          f"mean average precision is for multi-label data")
    return dataclasses.replace(config, model=model, image_size=image_size, epochs=epochs, batch_size=batch_size,
                               optim=optim, augment=augment, progressive_ramp=progressive_ramp,
                               layer_lr_decay=layer_lr_decay, compile=compile_on, compile_mode=compile_mode,
                               loss=config.loss or ("bce" if dataset.multi_label else "ce"),
                               monitor=config.monitor or ("val_map" if dataset.multi_label else "val_top1"))


def check_multi_label(config: TrainConfig, dataset: Dataset) -> None:
    """What multi-label data (any number of classes per image) cannot train with: the softmax's loss and top-1,
    and the options built on one class per image."""
    single = [flag for flag, on in [
        ("--loss ce (each class is a sigmoid of its own: bce)", config.loss == "ce"),
        ("--monitor val_top1 (use val_map or val_loss)", config.monitor == "val_top1"),
        ("--class-weights", config.class_weights), ("--balanced-sampler", config.balanced_sampler),
        ("--augmix-jsd", config.augmix_jsd), ("--teacher", config.teacher)] if on]
    if single:
        raise ConfigError(f"{dataset.root} is multi-label (any number of classes per image); these options need "
                          f"one class per image: drop {'; '.join(single)}")
