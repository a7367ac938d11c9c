"""One ResNet class for every classic variant, described by a ResNetConfig.

ImageNet-style nets (7x7 stem + max-pool, four stages) use torchvision's
parameter names exactly: conv1, bn1, layer1..layer4, downsample.0/.1, fc.
CIFAR-style nets (He et al. 2015, section 4.2) are the same class with a 3x3
stem, no max-pool and three stages of 16/32/64 channels. Every variant
(v1 stride placement, ResNet-D, pre-activation, ResNeXt, wide, plain twins,
normalisation, head options) is a field of the config, never a copy: the CIFAR
Wide ResNets are pre-activation nets with a narrow stem and dropout in the blocks.

The timm-style interface is here too: forward_features, forward_head,
reset_classifier, num_classes=0 for pooled features, features_only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..errors import ConfigError
from .blocks import BLOCKS, NORMS, SHORTCUTS, conv3x3, make_norm, make_shortcut
from .checkpointing import checkpointed
from .preprocessing import IMAGENET_EVAL, Preprocessing

MULTI_LABEL_THRESHOLD = 0.5  # a multi-label model's default: a label is present where its probability reaches it

STEMS = ("imagenet", "deep", "cifar")
POOLS = ("avg", "max")
INITS = ("he", "xavier")


@dataclass(frozen=True)
class ResNetConfig:
    """Everything that decides a ResNet's layers. Saved whole in every model file."""

    block: str = "basic"  # 'basic' (two 3x3) or 'bottleneck' (1x1-3x3-1x1)
    layers: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # planes per stage; the stem outputs widths[0]
    stem: str = "imagenet"  # 'imagenet' 7x7/2 + max-pool, 'deep' three 3x3 + max-pool, 'cifar' one 3x3/1
    deep_stem_width: int = 32  # inner width of the 'deep' stem
    shortcut: str = "B"  # 'A' zero-pad, 'B' projection, 'D' avg-pool + projection, 'none' = plain net
    stride_in_1x1: bool = False  # bottleneck stride on the first 1x1 ("v1") instead of the 3x3 ("v1.5")
    preact: bool = False  # pre-activation blocks (He et al. 2016)
    groups: int = 1  # ResNeXt cardinality
    width_per_group: int = 64  # 128 gives the wide ResNets
    norm: str | None = "batch"  # 'batch', 'group' or None
    in_chans: int = 3
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    global_pool: str = "avg"
    drop_rate: float = 0.0  # dropout before the classifier
    # Stochastic depth: training skips block l of L's residual branch, per sample, with probability
    # drop_path_rate * l / L (the linear rule of Huang et al. 2016); evaluation runs every block.
    drop_path_rate: float = 0.0
    # Dropout inside each block, before its last convolution (Wide ResNets: 0.3 between the two 3x3s).
    block_drop_rate: float = 0.0
    stem_width: int = 0  # the stem's output channels; 0: widths[0] (Wide ResNets: 16, then 16k in the first stage)
    # Squeeze-and-excitation (Hu et al. 2018): each block's branch rescales its output channels by a gate
    # computed from their means through a bottleneck of channels x se_ratio (1/16 in SE-ResNets); 0: none.
    se_ratio: float = 0.0
    zero_init_residual: bool = False  # zero each block's last layer so it starts as identity
    init: str = "he"  # conv/linear init: 'he' (torchvision: normal, fan-out) or 'xavier' (Glorot; Keras' default)
    features_only: bool = False  # forward returns the stage maps
    # Per block, in order, its inner widths (basic: one, bottleneck: two); () = the standard widths.
    # A channel-pruned net (deploy/prune.py) is a config with these set.
    block_widths: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "widths", tuple(int(n) for n in self.widths))
        object.__setattr__(self, "block_widths", tuple(tuple(int(n) for n in w) for w in self.block_widths))
        checks = [
            (self.block in ("basic", "bottleneck"), f"block must be 'basic' or 'bottleneck', got {self.block!r}"),
            (len(self.layers) >= 1 and all(n >= 1 for n in self.layers),
             f"layers must be positive counts, got {self.layers}"),
            (len(self.widths) == len(self.layers), f"widths {self.widths} and layers {self.layers} differ in length"),
            (self.stem in STEMS, f"stem must be one of {STEMS}, got {self.stem!r}"),
            (self.shortcut in SHORTCUTS, f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.global_pool in POOLS, f"global_pool must be one of {POOLS}, got {self.global_pool!r}"),
            (self.in_chans >= 1 and self.num_classes >= 0, "in_chans must be >= 1 and num_classes >= 0"),
            (0.0 <= self.drop_rate < 1.0, f"drop_rate must be in [0, 1), got {self.drop_rate}"),
            (0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}"),
            (0.0 <= self.block_drop_rate < 1.0, f"block_drop_rate must be in [0, 1), got {self.block_drop_rate}"),
            (self.stem_width >= 0, f"stem_width must be >= 0 (0: widths[0]), got {self.stem_width}"),
            (0.0 <= self.se_ratio <= 1.0, f"se_ratio must be in [0, 1] (0: no squeeze-and-excitation), got "
                                          f"{self.se_ratio}"),
            (not (self.drop_path_rate and self.shortcut == "none"),
             "drop_path_rate needs shortcuts: skipping a plain net's block cuts the signal off"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (not self.block_widths or len(self.block_widths) == sum(self.layers),
             f"block_widths gives {len(self.block_widths)} blocks for a net of {sum(self.layers)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ResNetConfig":
        return cls(**data)


class ResNet(nn.Module):
    """A ResNet built from a ResNetConfig.

    `arch` names the registry entry it came from; `class_names` and
    `preprocessing` describe what it was trained on and how to feed it. `multi_label`: its
    outputs are one sigmoid per class (any number of them present, each where its probability
    reaches `threshold`), not a softmax over classes that exclude each other.
    """

    def __init__(self, config: ResNetConfig, *, arch: str = "resnet",
                 class_names: list[str] | None = None, preprocessing: Preprocessing = IMAGENET_EVAL):
        super().__init__()
        self.config = config
        self.arch = arch
        self.class_names = class_names
        self.preprocessing = preprocessing
        self.multi_label = False
        self.threshold = MULTI_LABEL_THRESHOLD
        self.grad_checkpointing = False  # set_grad_checkpointing: a setting of how it trains, not saved with it
        block = BLOCKS[(config.block, config.preact)]
        stem_ch = config.stem_width or config.widths[0]

        self.conv1 = self._make_stem_conv(config, stem_ch)
        # The authors' pre-activation CIFAR nets go straight from the stem conv into
        # the first block, which normalises its own input.
        plain_stem = config.preact and config.stem == "cifar"
        self.bn1 = nn.Identity() if plain_stem else make_norm(config.norm, stem_ch)
        self.relu = nn.Identity() if plain_stem else nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if config.stem == "cifar" else nn.MaxPool2d(3, stride=2, padding=1)

        in_ch = stem_ch
        reduction = 1 if config.stem == "cifar" else 4
        self.stage_names = []
        self.feature_info = []
        for index, (planes, count) in enumerate(zip(config.widths, config.layers)):
            stride = 1 if index == 0 else 2
            reduction *= stride
            name = f"layer{index + 1}"
            first_block = sum(config.layers[:index])
            inner = config.block_widths[first_block:first_block + count] or ((),) * count
            self.add_module(name, self._make_stage(block, in_ch, planes, count, stride, inner))
            in_ch = planes * block.expansion
            self.stage_names.append(name)
            self.feature_info.append({"num_chs": in_ch, "reduction": reduction, "module": name})
        self.num_features = in_ch

        # Pre-activation nets end with the BN-ReLU that the last block left out.
        self.bn_final = make_norm(config.norm, in_ch) if config.preact else nn.Identity()
        self.act_final = nn.ReLU(inplace=True) if config.preact else nn.Identity()
        self.global_pool = self._make_pool(config.global_pool)
        self.drop = nn.Dropout(config.drop_rate)
        self.fc = self._make_classifier(config)
        blocks = self.blocks()
        for depth, block in enumerate(blocks, start=1):
            block.drop_path_rate = config.drop_path_rate * depth / len(blocks)
            block.dropout_rate = config.block_drop_rate
        self._init_weights()

    @staticmethod
    def _make_stem_conv(config: ResNetConfig, out_ch: int) -> nn.Module:
        if config.stem == "cifar":
            return conv3x3(config.in_chans, out_ch)
        if config.stem == "imagenet":
            return nn.Conv2d(config.in_chans, out_ch, 7, stride=2, padding=3, bias=False)
        # 'deep': three 3x3 convs (ResNet-C/D); indices 0, 3, 6 as in timm.
        width = config.deep_stem_width
        return nn.Sequential(
            conv3x3(config.in_chans, width, stride=2), make_norm(config.norm, width), nn.ReLU(inplace=True),
            conv3x3(width, width), make_norm(config.norm, width), nn.ReLU(inplace=True),
            conv3x3(width, out_ch),
        )

    def _make_stage(self, block: type[nn.Module], in_ch: int, planes: int, count: int, stride: int,
                    inner_widths: tuple[tuple[int, ...], ...]) -> nn.Sequential:
        c = self.config
        out_ch = planes * block.expansion
        blocks = []
        for index in range(count):
            block_stride = stride if index == 0 else 1
            blocks.append(block(
                in_ch, planes, block_stride,
                downsample=make_shortcut(c.shortcut, in_ch, out_ch, block_stride, c.norm, c.preact),
                residual=c.shortcut != "none",
                groups=c.groups, width_per_group=c.width_per_group, norm=c.norm, stride_in_1x1=c.stride_in_1x1,
                inner_widths=inner_widths[index], se_ratio=c.se_ratio,
            ))
            in_ch = out_ch
        return nn.Sequential(*blocks)

    @staticmethod
    def _make_pool(kind: str) -> nn.Module:
        return nn.AdaptiveAvgPool2d(1) if kind == "avg" else nn.AdaptiveMaxPool2d(1)

    def _make_classifier(self, config: ResNetConfig) -> nn.Module:
        if config.num_classes == 0 or config.features_only:
            return nn.Identity()
        return nn.Linear(self.num_features, config.num_classes)

    def _init_weights(self) -> None:
        # 'he': torchvision's He-normal convs (fan-out) and default linear init. 'xavier': Glorot
        # normal for convs and the classifier, the pre-2015 default that deep plain nets cannot train
        # from (the vanishing-gradient experiments use it). Norm layers start at unit scale.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if self.config.init == "he":
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_normal_(module.weight)
            elif isinstance(module, nn.Linear) and self.config.init == "xavier":
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.zero_init_residual:
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """The model from input to output in the groups fine-tuning freezes and gives learning rates:
        the stem, each stage, and the head (final norm of pre-activation nets, classifier)."""
        return ([("stem", [self.conv1, self.bn1])] + [(name, [getattr(self, name)]) for name in self.stage_names]
                + [("head", [self.bn_final, self.fc])])

    def blocks(self) -> list[nn.Module]:
        """Every residual (or plain) block, in order."""
        return [block for name in self.stage_names for block in getattr(self, name)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input for the backward pass, and recompute the rest there (timm's name for it):
        less memory for about one more forward pass per step; see models/checkpointing.py."""
        self.grad_checkpointing = enable

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _forward_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        stage = getattr(self, name)
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            x = checkpointed(block, x)
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (strides per feature_info)."""
        maps = []
        x = self.forward_stem(x)
        for name in self.stage_names:
            x = self._forward_stage(name, x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling."""
        x = self.forward_stem(x)
        for name in self.stage_names:
            x = self._forward_stage(name, x)
        return self.act_final(self.bn_final(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.config.features_only:
            return self.forward_stages(x)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None,
                         class_names: list[str] | None = None) -> None:
        """A fresh classifier for `num_classes` (0 removes it); the backbone is kept."""
        self.config = replace(self.config, num_classes=num_classes, global_pool=global_pool or self.config.global_pool)
        self.global_pool = self._make_pool(self.config.global_pool)
        device = next(self.parameters()).device
        self.fc = self._make_classifier(self.config).to(device)
        self.class_names = class_names
        if isinstance(self.threshold, list):  # per-class thresholds belonged to the old classes
            self.threshold = MULTI_LABEL_THRESHOLD
