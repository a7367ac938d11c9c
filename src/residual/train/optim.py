"""Optimizers and learning-rate schedules.

Weight decay applies to convolution and linear weights only: normalisation
scales/shifts and biases (every parameter with fewer than 2 dimensions) are
exempt, the usual practice since Goyal et al. 2017.

LAMB (You et al. 2019), which "ResNet strikes back" trains ResNet-50 with, is not in PyTorch:
`Lamb` below is Adam's step with decoupled weight decay, scaled per tensor by the trust
ratio |weights| / |step|, as timm and NVIDIA's apex compute it.

Every schedule is a pure function `lr_factor(step)` of the optimizer step,
wrapped in a LambdaLR, so its values are testable and its state is one
integer in the checkpoint. Epoch-based schedules (step, multistep,
exponential with staircase) are converted to steps. A linear warmup can
precede any schedule except one-cycle, which has its own. The one schedule
that depends on more than the step, `plateau` (the rate cut when validation
stops improving), multiplies that function by the scale `PlateauDecay` keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "lamb")
SCHEDULES = ("cosine", "step", "multistep", "exponential", "onecycle", "constant", "plateau")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    lr: float | None = None  # auto: set by the training config from the batch size
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # auto: set by the training config from the image size
    schedule: str = "cosine"
    warmup_epochs: float | None = None  # linear from the first step; auto: set by the training config, else none
    min_lr_ratio: float = 0.0  # cosine: the final lr, plateau: the lowest, as a fraction of lr
    step_size: int = 30  # step: epochs between decays
    milestones: tuple[float, ...] = field(default=(30, 60, 80))  # multistep: epochs (may be fractional)
    gamma: float = 0.1  # step/multistep/plateau decay factor
    plateau_patience: int = 10  # plateau: epochs without improvement tolerated before the rate is cut
    decay_rate: float = 0.96  # exponential: factor per decay_epochs (Keras ExponentialDecay)
    decay_epochs: float = 1.0
    staircase: bool = False
    onecycle_pct_start: float = 0.25
    onecycle_div_factor: float = 25.0
    onecycle_final_div_factor: float = 1e4

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ConfigError(f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio is a fraction of --lr, in [0, 1], got {self.min_lr_ratio}")
        if self.step_size < 1 or self.decay_epochs <= 0:
            raise ConfigError(f"--step-size must be at least 1 and --decay-epochs positive, got "
                              f"{self.step_size} and {self.decay_epochs}")
        if self.gamma <= 0 or self.decay_rate <= 0:
            raise ConfigError(f"--gamma and --decay-rate are factors on the lr: positive, got "
                              f"{self.gamma} and {self.decay_rate}")
        if self.schedule == "plateau" and not (self.gamma < 1 and self.plateau_patience >= 0):
            raise ConfigError(f"--schedule plateau cuts the lr by --gamma below 1 after --plateau-patience epochs "
                              f"(0 or more) without improvement, got {self.gamma} and {self.plateau_patience}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))


def param_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """Parameter groups: decay vs no decay, and per layer group a learning-rate scale.

    With layer_lr_decay < 1 (discriminative learning rates, fastai-style) the head
    trains at the full rate and each group closer to the input at `layer_lr_decay`
    times the next one. Every parameter is included, trainable or not: frozen ones get
    no gradient, so no update and no decay, and unfreezing later needs no new optimizer.
    """
    layers = model.layer_groups() if hasattr(model, "layer_groups") else [("all", [model])]
    groups = []
    for depth_from_head, (name, modules) in enumerate(reversed(layers)):
        params = [p for module in modules for p in module.parameters()]
        scale = layer_lr_decay ** depth_from_head
        for decay, members in ((weight_decay, [p for p in params if p.ndim >= 2]),
                               (0.0, [p for p in params if p.ndim < 2])):
            if members:
                groups.append({"params": members, "weight_decay": decay, "lr_scale": scale, "layer_group": name})
    return groups


def build_optimizer(model: nn.Module, config: OptimConfig, layer_lr_decay: float = 1.0,
                    fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: PyTorch's single-kernel update (SGD, Adam, AdamW), the same arithmetic in fewer launches."""
    groups = param_groups(model, config.weight_decay, layer_lr_decay)
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    speed = {"fused": True} if fused else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, **speed)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, **speed)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, **speed)
    if config.optimizer == "lamb":
        return Lamb(groups, lr=config.lr)
    return torch.optim.RMSprop(groups, lr=config.lr, momentum=config.momentum, alpha=0.9, eps=1e-3)


class Lamb(torch.optim.Optimizer):
    """LAMB: per tensor, the bias-corrected Adam direction plus weight decay times the weights, scaled by
    the trust ratio |weights| / |that step| so every layer moves by the same fraction of its size
    (1 where either norm is 0). Tensors without weight decay (norms and biases) take the Adam step
    unscaled, as timm's Lamb does by default."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # the step count is a Python number: reading a tensor's would wait for the GPU
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (state["exp_avg"] / (1 - beta1 ** t)) / (
                    (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                    weight_norm, update_norm = p.norm(), update.norm()
                    trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                    update.mul_(trust)
                p.add_(update, alpha=-group["lr"])
        return loss


def lr_factor(step: int, config: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate at `step` as a fraction of config.lr."""
    if config.schedule == "onecycle":
        return _one_cycle(step, config, total_steps)
    warmup = round((config.warmup_epochs or 0.0) * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    epoch = step / steps_per_epoch
    if config.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return config.gamma ** math.floor(epoch / config.step_size)
    if config.schedule == "multistep":
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    if config.schedule == "exponential":
        exponent = epoch / config.decay_epochs
        return config.decay_rate ** (math.floor(exponent) if config.staircase else exponent)
    return 1.0


def _one_cycle(step: int, config: OptimConfig, total_steps: int) -> float:
    """Smith's one-cycle exactly as torch's OneCycleLR (cosine up, cosine down), as a fraction of the peak."""
    up_end = config.onecycle_pct_start * total_steps - 1  # torch's phase boundaries
    start = 1.0 / config.onecycle_div_factor
    end = start / config.onecycle_final_div_factor
    if step <= up_end:
        low, high, progress = start, 1.0, step / max(up_end, 1e-12)
    else:
        low, high, progress = 1.0, end, min(1.0, (step - up_end) / max(total_steps - 1 - up_end, 1e-12))
    return high + (low - high) * 0.5 * (1 + math.cos(math.pi * progress))


class PlateauDecay:
    """`--schedule plateau`: a scale on the rate, cut by `gamma` when the monitored validation score has not
    improved for more than `patience` epochs, as torch's ReduceLROnPlateau decides (an improvement beats the
    best by more than 1e-4 of it; no cooldown) and never below `min_scale`. Ours keeps a scale rather than
    using ReduceLROnPlateau, which sets the optimizer's rates itself and so cannot follow the LambdaLR that
    runs every other schedule and the warmup."""

    THRESHOLD = 1e-4  # ReduceLROnPlateau's default, relative

    def __init__(self, gamma: float, patience: int, min_scale: float, higher_is_better: bool):
        self.gamma, self.patience, self.min_scale, self.higher_is_better = gamma, patience, min_scale, higher_is_better
        self.scale, self.best, self.bad_epochs = 1.0, -math.inf if higher_is_better else math.inf, 0

    def update(self, value: float) -> bool:
        """One epoch's score; True when it cut the rate. A NaN never improves."""
        improved = (value > self.best * (1 + self.THRESHOLD) if self.higher_is_better else
                    value < self.best * (1 - self.THRESHOLD))
        if improved:
            self.best, self.bad_epochs = value, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs <= self.patience:
            return False
        self.bad_epochs = 0
        scale = max(self.scale * self.gamma, self.min_scale)
        if self.scale - scale <= 1e-8:  # already at the floor
            return False
        self.scale = scale
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad_epochs = state["scale"], state["best"], state["bad_epochs"]


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int,
                    total_steps: int, plateau: PlateauDecay | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # the plateau's scale as it stands when the step is taken
        return lr_factor(step, config, steps_per_epoch, total_steps) * (plateau.scale if plateau else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
