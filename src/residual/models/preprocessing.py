"""How an image becomes a model input at evaluation time.

It travels with the model (in memory and in the model file) so training,
evaluation, prediction and export all prepare images the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize_size`, center-crop `input_size`, normalise.

    With resize_size == input_size the crop keeps the whole (square) image.
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.input_size < 1 or self.resize_size < self.input_size:
            raise ConfigError(f"need 1 <= input_size <= resize_size, got {self.input_size} and {self.resize_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        # JSON round trips give lists; keep tuples so equality and hashing hold.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def normalisation(self) -> str:
        """The channel statistics to four significant digits, as `residual info` shows them."""
        return " / ".join("(" + ", ".join(f"{v:.4g}" for v in values) + ")" for values in (self.mean, self.std))

    @property
    def crop_pct(self) -> float:
        """timm's name for input_size / resize_size."""
        return self.input_size / self.resize_size

    def at_size(self, input_size: int) -> "Preprocessing":
        """The same preprocessing for another input size: the resize keeps its ratio to the crop
        (224 from 256 becomes 288 from 329), as test-time resolution changes do (Touvron et al. 2019)."""
        return replace(self, input_size=input_size, resize_size=round(input_size / self.crop_pct))


IMAGENET_EVAL = Preprocessing()
CIFAR_EVAL = Preprocessing(input_size=32, resize_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
