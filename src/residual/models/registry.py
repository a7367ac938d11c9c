"""Model names -> configs, and what each model costs (parameters, MACs).

Every name is a ResNetConfig plus the evaluation preprocessing it expects;
`build_model(name, **options)` overrides any config field, so variants are
options of one builder: build_model("resnet50", stride_in_1x1=True) is the
original "v1" ResNet-50, build_model("resnet18", stem="cifar") the CIFAR-style
ResNet-18 used in many papers.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from .preprocessing import CIFAR_EVAL, IMAGENET_EVAL, Preprocessing
from .resnet import ResNet, ResNetConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: ResNetConfig
    preprocessing: Preprocessing
    description: str
    # The depth as the paper names the net, where its count differs from depth()'s (Wide ResNets: 6n + 4).
    paper_depth: int = 0

    @property
    def family(self) -> str:
        return "cifar" if self.config.stem == "cifar" else "imagenet"


_REGISTRY: dict[str, ModelSpec] = {}


def _register(name: str, description: str, preprocessing: Preprocessing = IMAGENET_EVAL, paper_depth: int = 0,
              **config) -> None:
    _REGISTRY[name] = ModelSpec(name, ResNetConfig(**config), preprocessing, description, paper_depth)


# ImageNet-style: depth -> (block, blocks per stage), He et al. 2015 Table 1.
_IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
for _depth, (_block, _layers) in _IMAGENET_DEPTHS.items():
    _register(f"resnet{_depth}", f"ResNet-{_depth} (torchvision layout)", block=_block, layers=_layers)
for _depth, (_block, _layers) in _IMAGENET_DEPTHS.items():
    _register(f"resnet{_depth}d", f"ResNet-{_depth}-D: deep stem, avg-pool shortcuts (Bag of Tricks)",
              block=_block, layers=_layers, stem="deep", shortcut="D")
for _depth, (_block, _layers) in _IMAGENET_DEPTHS.items():
    _register(f"preact_resnet{_depth}", f"pre-activation ResNet-{_depth} (He et al. 2016)",
              block=_block, layers=_layers, preact=True)
_register("wide_resnet50_2", "Wide ResNet-50-2: bottlenecks twice as wide",
          block="bottleneck", layers=(3, 4, 6, 3), width_per_group=128)
_register("wide_resnet101_2", "Wide ResNet-101-2: bottlenecks twice as wide",
          block="bottleneck", layers=(3, 4, 23, 3), width_per_group=128)
_register("resnext50_32x4d", "ResNeXt-50 32x4d: grouped 3x3, cardinality 32",
          block="bottleneck", layers=(3, 4, 6, 3), groups=32, width_per_group=4)
_register("resnext101_32x8d", "ResNeXt-101 32x8d",
          block="bottleneck", layers=(3, 4, 23, 3), groups=32, width_per_group=8)
_register("resnext101_64x4d", "ResNeXt-101 64x4d",
          block="bottleneck", layers=(3, 4, 23, 3), groups=64, width_per_group=4)
# Squeeze-and-excitation (Hu et al. 2018) in every block, reduction 16, as timm builds its seresnet* and
# seresnext* (stride on the 3x3; parameter names se.fc1, se.fc2), so their weights load.
for _depth, (_block, _layers) in _IMAGENET_DEPTHS.items():
    _register(f"seresnet{_depth}", f"SE-ResNet-{_depth}: squeeze-and-excitation blocks (Hu et al. 2018)",
              block=_block, layers=_layers, se_ratio=1 / 16)
_register("seresnext50_32x4d", "SE-ResNeXt-50 32x4d (Hu et al. 2018)",
          block="bottleneck", layers=(3, 4, 6, 3), groups=32, width_per_group=4, se_ratio=1 / 16)
_register("seresnext101_32x4d", "SE-ResNeXt-101 32x4d (Hu et al. 2018)",
          block="bottleneck", layers=(3, 4, 23, 3), groups=32, width_per_group=4, se_ratio=1 / 16)
for _depth in (18, 34):
    _block, _layers = _IMAGENET_DEPTHS[_depth]
    _register(f"plain{_depth}", f"plain-{_depth}: resnet{_depth} with every shortcut removed",
              block=_block, layers=_layers, shortcut="none")

# CIFAR-style (He et al. 2015 section 4.2): depth 6n+2, option A shortcuts.
_CIFAR_HEAD = dict(stem="cifar", num_classes=10, preprocessing=CIFAR_EVAL)  # every CIFAR net's stem, classes, input
_CIFAR = dict(widths=(16, 32, 64), **_CIFAR_HEAD)
for _n in (3, 5, 7, 9, 18, 200):
    _register(f"resnet{6 * _n + 2}", f"CIFAR ResNet-{6 * _n + 2} (n={_n}, option A shortcuts)",
              block="basic", layers=(_n,) * 3, shortcut="A", **_CIFAR)
for _n in (3, 5, 7, 9, 18):
    _register(f"plain{6 * _n + 2}", f"CIFAR plain-{6 * _n + 2}: resnet{6 * _n + 2} with every shortcut removed",
              block="basic", layers=(_n,) * 3, shortcut="none", **_CIFAR)
# Pre-activation CIFAR nets of He et al. 2016: basic 110, bottleneck 164 and 1001 (depth 9n+2).
_register("preact_resnet110", "CIFAR pre-activation ResNet-110 (He et al. 2016)",
          block="basic", layers=(18,) * 3, preact=True, shortcut="A", **_CIFAR)
for _n in (18, 111):
    _register(f"preact_resnet{9 * _n + 2}", f"CIFAR pre-activation bottleneck ResNet-{9 * _n + 2} (He et al. 2016)",
              block="bottleneck", layers=(_n,) * 3, preact=True, shortcut="B", **_CIFAR)
# Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k has n = (d - 4) / 6 pre-activation basic blocks per
# stage, k times as wide (16k, 32k, 64k) after a 16-channel stem, and projection shortcuts where widths change.
# The paper's d counts two layers more than depth() does. Dropout in the blocks is an option (0.3 in the paper).
for _d, _k in ((16, 8), (16, 10), (22, 8), (28, 2), (28, 10), (40, 2), (40, 4), (40, 8)):
    _register(f"wrn{_d}_{_k}", f"CIFAR Wide ResNet-{_d}-{_k} (Zagoruyko & Komodakis 2016)", paper_depth=_d,
              block="basic", layers=((_d - 4) // 6,) * 3, widths=(16 * _k, 32 * _k, 64 * _k), stem_width=16,
              preact=True, shortcut="B", **_CIFAR_HEAD)
# CIFAR ResNeXt-29 (Xie et al. 2017, section 5.3): three stages of three bottlenecks, 256/512/1024 wide,
# C groups of d = 64 channels in the first stage's 3x3 (doubling per stage), after a 64-channel 3x3 stem.
for _c in (8, 16):
    _register(f"resnext29_{_c}x64d", f"CIFAR ResNeXt-29 {_c}x64d (Xie et al. 2017)",
              block="bottleneck", layers=(3, 3, 3), widths=(64, 128, 256), groups=_c, width_per_group=64,
              shortcut="B", **_CIFAR_HEAD)


class UnknownModelError(ConfigError):
    pass


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, grouped by family as registered."""
    return [name for name in _REGISTRY if fnmatch.fnmatch(name, pattern)]


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " `residual models` lists them."
        raise UnknownModelError(f"unknown model {name!r}.{hint}") from None


def model_config(name: str, **options) -> ResNetConfig:
    """The registry's config for `name` with `options` overriding its fields, checked (nothing is built)."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(ResNetConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {name}; valid options: {sorted(fields)}")
    return dataclasses.replace(spec.config, **options)


def build_model(name: str, **options) -> ResNet:
    """A freshly initialised model; `options` override any ResNetConfig field."""
    spec = get_spec(name)
    config = model_config(name, **options)
    preprocessing = spec.preprocessing
    if config.stem != spec.config.stem:  # e.g. a CIFAR-style resnet18 takes CIFAR-size inputs
        preprocessing = CIFAR_EVAL if config.stem == "cifar" else IMAGENET_EVAL
    return ResNet(config, arch=name, preprocessing=preprocessing)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one image: PyTorch's FLOP counter halved.

    FlopCounterMode counts convolutions and matrix products, two FLOPs per MAC;
    normalisation, activations, pooling and additions are not counted. This is the
    convention of torchvision's published GFLOPS, which are in fact MACs.
    """
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, in_chans, input_size, input_size, device=device))
    return counter.get_total_flops() // 2


def depth(config: ResNetConfig) -> int:
    """The depth in the papers' sense: weighted layers on the main path (stem conv, block convs, fc)."""
    convs_per_block = 2 if config.block == "basic" else 3
    return 1 + convs_per_block * sum(config.layers) + 1


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    block: str
    depth: int
    params: int
    macs: int
    input_size: int
    description: str


def empty_model(name: str, **options) -> ResNet:
    """A registered model in uninitialised CPU memory, in eval mode, for counting: that needs shapes, not
    values. It is laid out on the meta device, which skips initialisation entirely (and a forward pass
    on meta tensors would be several times slower than on empty CPU memory)."""
    with torch.device("meta"):
        model = build_model(name, **options)
    return model.to_empty(device="cpu").eval()


def model_info(name: str, input_size: int | None = None, **options) -> ModelInfo:
    """Parameters and MACs of a registered model."""
    model = empty_model(name, **options)
    size = input_size or model.preprocessing.input_size
    spec = get_spec(name)
    same_layers = model.config.layers == spec.config.layers and model.config.block == spec.config.block
    block = ("pre-act " if model.config.preact else "") + model.config.block
    if model.config.shortcut == "none":
        block += " (plain)"
    if model.config.se_ratio:
        block += " + SE"
    return ModelInfo(name, spec.family, block, spec.paper_depth if spec.paper_depth and same_layers
                     else depth(model.config), count_params(model),
                     count_macs(model, size, model.config.in_chans), size, spec.description)
