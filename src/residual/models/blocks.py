"""The pieces every ResNet is made of: residual blocks and their shortcuts.

Post-activation blocks (He et al. 2015) keep torchvision's parameter names
(conv1, bn1, conv2, bn2[, conv3, bn3], downsample.0/.1), so checkpoints from
torchvision and timm load as they are. Pre-activation blocks (He et al. 2016)
move BN-ReLU in front of each convolution and leave the sum un-activated.

A block with `residual=False` is the "plain" twin: the same layers, no shortcut.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

NORMS = ("batch", "group", None)
SHORTCUTS = ("A", "B", "D", "none")


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def make_norm(kind: str | None, channels: int) -> nn.Module:
    """BatchNorm, GroupNorm (up to 32 groups that divide `channels`), or nothing."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind is None:
        return nn.Identity()
    raise ConfigError(f"norm must be one of {NORMS}, got {kind!r}")


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2015: subsample by striding, zero-pad the new channels.

    It has no parameters, which is why the CIFAR ResNets match the plain nets'
    parameter counts exactly.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        if out_ch < in_ch:
            raise ConfigError(f"option A shortcuts cannot reduce channels ({in_ch} -> {out_ch}); use shortcut='B'")
        self.stride = stride
        self.extra_channels = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def make_shortcut(kind: str, in_ch: int, out_ch: int, stride: int, norm: str | None, preact: bool) -> nn.Module | None:
    """The shortcut for a block whose input and output shapes may differ.

    Returns None for an identity shortcut (shapes match) and for plain nets
    (kind 'none'; the block is then built with residual=False).
    Pre-activation projections carry no norm: their input is already normalised.
    """
    if kind not in SHORTCUTS:
        raise ConfigError(f"shortcut must be one of {SHORTCUTS}, got {kind!r}")
    if kind == "none" or (stride == 1 and in_ch == out_ch):
        return None
    if kind == "A":
        return ZeroPadShortcut(in_ch, out_ch, stride)
    tail = [] if preact else [make_norm(norm, out_ch)]
    if kind == "B":
        return nn.Sequential(conv1x1(in_ch, out_ch, stride), *tail)
    # ResNet-D (Bag of Tricks, He et al. 2019): average-pool, then a stride-1 projection,
    # so the projection sees every input pixel. Layout as timm, so its weights load.
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, conv1x1(in_ch, out_ch), *tail)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): every channel scaled by a gate in (0, 1) that a 1x1
    bottleneck computes from all channels' means. timm's layout (fc1, fc2: 1x1 convs with biases; the
    bottleneck's width channels x ratio rounded to a multiple of 8, 8 at least), so its SE-ResNets load."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        reduced = max(8, int(channels * ratio + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


def make_squeeze_excite(channels: int, ratio: float) -> SqueezeExcite | None:
    return SqueezeExcite(channels, ratio) if ratio else None


def drop_path(branch: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016) for one batch: each sample's residual branch is zeroed with
    probability `rate`, and the rest are scaled by 1 / (1 - rate), so the expected sum is unchanged and
    evaluation, which keeps every branch, needs no rescaling (as timm and torchvision do it, per sample)."""
    keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(1.0 - rate)
    return branch * keep.div_(1.0 - rate)


class ResidualBlock(nn.Module):
    """What every block shares: squeeze-and-excitation, dropout and stochastic depth where configured, adding
    its shortcut (unless plain), zeroing its last layer.

    Subclasses build their layers in torchvision's order (convs and norms, timm's SE gate, then relu,
    then downsample), which is the order of their state-dict keys. `inner_widths`
    (one per entry of `inner_layers`) overrides the widths inside the block, which
    is what a channel-pruned network is; empty means the standard widths.
    """

    last_layer = ""  # the layer zero_init_last zeroes
    preactivated = False  # BN-ReLU before the convolutions, the sum not activated (He et al. 2016)
    drop_path_rate = 0.0  # the chance that training skips this block's branch for a sample (set by ResNet)
    dropout_rate = 0.0  # dropout before the branch's last convolution (set by ResNet; Wide ResNets use it)
    # (producer conv, the norm of its output, consumer conv) for each inner width: the channels
    # structured pruning may remove, because no shortcut or other block sees them.
    inner_layers: tuple[tuple[str, str, str], ...] = ()

    def resolve_inner_widths(self, inner_widths: tuple[int, ...], standard: int) -> tuple[int, ...]:
        """The block's inner widths: as given, or `standard` for each."""
        if not inner_widths:
            return (standard,) * len(self.inner_layers)
        if len(inner_widths) != len(self.inner_layers) or min(inner_widths) < 1:
            raise ConfigError(f"{type(self).__name__} takes {len(self.inner_layers)} positive inner width(s), "
                              f"got {tuple(inner_widths)}")
        return tuple(inner_widths)

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout_rate, self.training) if self.dropout_rate else x

    def merge_branch(self, out: torch.Tensor, x: torch.Tensor, projection_input: torch.Tensor) -> torch.Tensor:
        """The residual branch's output `out`, gated by squeeze-and-excitation where there is one, plus the
        shortcut of `x` (a projection sees `projection_input`) unless the block is plain."""
        if self.se is not None:
            out = self.se(out)
        if self.residual:
            if self.training and self.drop_path_rate:
                out = drop_path(out, self.drop_path_rate)
            out += x if self.downsample is None else self.downsample(projection_input)
        return out

    def shortcut_only(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output with its residual branch deleted (Veit et al. 2016's lesion): its shortcut, through
        the ReLU that follows the sum where there is one. A plain block has no shortcut: deleting it leaves
        its input, which only blocks whose input and output shapes match allow."""
        if not self.residual:
            return x
        if self.downsample is None:
            shortcut = x
        else:
            shortcut = self.downsample(F.relu(self.bn1(x)) if self.preactivated else x)
        return shortcut if self.preactivated else F.relu(shortcut)

    def zero_init_last(self) -> None:
        """Zero the branch's last scale (pre-activation: last conv): the block starts as its shortcut."""
        weight = getattr(getattr(self, self.last_layer), "weight", None)
        if weight is not None:
            nn.init.zeros_(weight)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR nets)."""

    expansion = 1
    last_layer = "bn2"
    inner_layers = (("conv1", "bn1", "conv2"),)

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, groups: int = 1, width_per_group: int = 64,
                 norm: str | None = "batch", stride_in_1x1: bool = False, inner_widths: tuple[int, ...] = (),
                 se_ratio: float = 0.0):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ConfigError("BasicBlock supports only groups=1 and width_per_group=64")
        (mid,) = self.resolve_inner_widths(inner_widths, planes)
        self.conv1 = conv3x3(in_ch, mid, stride)
        self.bn1 = make_norm(norm, mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(mid, planes)
        self.bn2 = make_norm(norm, planes)
        self.se = make_squeeze_excite(planes, se_ratio)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.relu(self.merge_branch(out, x, x))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand (ResNet-50 and deeper).

    The stride sits on the 3x3 ("v1.5", torchvision's default); stride_in_1x1=True
    puts it on the first 1x1 as in the paper, Caffe and Keras ("v1").
    """

    expansion = 4
    last_layer = "bn3"
    inner_layers = (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"))

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, groups: int = 1, width_per_group: int = 64,
                 norm: str | None = "batch", stride_in_1x1: bool = False, inner_widths: tuple[int, ...] = (),
                 se_ratio: float = 0.0):
        super().__init__()
        reduce, middle = self.resolve_inner_widths(inner_widths, int(planes * (width_per_group / 64.0)) * groups)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_ch, reduce, stride_1x1)
        self.bn1 = make_norm(norm, reduce)
        self.conv2 = conv3x3(reduce, middle, stride_3x3, groups)
        self.bn2 = make_norm(norm, middle)
        self.conv3 = conv1x1(middle, planes * self.expansion)
        self.bn3 = make_norm(norm, planes * self.expansion)
        self.se = make_squeeze_excite(planes * self.expansion, se_ratio)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.dropout(self.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return self.relu(self.merge_branch(out, x, x))


class PreActBasicBlock(ResidualBlock):
    """BN-ReLU-conv3x3 twice; the sum is not activated (He et al. 2016, "Identity Mappings")."""

    expansion = 1
    last_layer = "conv2"
    inner_layers = (("conv1", "bn2", "conv2"),)
    preactivated = True

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, groups: int = 1, width_per_group: int = 64,
                 norm: str | None = "batch", stride_in_1x1: bool = False, inner_widths: tuple[int, ...] = (),
                 se_ratio: float = 0.0):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ConfigError("PreActBasicBlock supports only groups=1 and width_per_group=64")
        (mid,) = self.resolve_inner_widths(inner_widths, planes)
        self.bn1 = make_norm(norm, in_ch)
        self.conv1 = conv3x3(in_ch, mid, stride)
        self.bn2 = make_norm(norm, mid)
        self.conv2 = conv3x3(mid, planes)
        self.se = make_squeeze_excite(planes, se_ratio)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu is not in-place here: x itself is the identity shortcut.
        preact = F.relu(self.bn1(x))
        out = self.conv1(preact)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        # A projection sees the pre-activated input, as in the authors' code.
        return self.merge_branch(out, x, preact)


class PreActBottleneck(ResidualBlock):
    """BN-ReLU before each of the 1x1, 3x3, 1x1 convolutions; the sum is not activated."""

    expansion = 4
    last_layer = "conv3"
    preactivated = True
    inner_layers = (("conv1", "bn2", "conv2"), ("conv2", "bn3", "conv3"))

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, groups: int = 1, width_per_group: int = 64,
                 norm: str | None = "batch", stride_in_1x1: bool = False, inner_widths: tuple[int, ...] = (),
                 se_ratio: float = 0.0):
        super().__init__()
        reduce, middle = self.resolve_inner_widths(inner_widths, int(planes * (width_per_group / 64.0)) * groups)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = make_norm(norm, in_ch)
        self.conv1 = conv1x1(in_ch, reduce, stride_1x1)
        self.bn2 = make_norm(norm, reduce)
        self.conv2 = conv3x3(reduce, middle, stride_3x3, groups)
        self.bn3 = make_norm(norm, middle)
        self.conv3 = conv1x1(middle, planes * self.expansion)
        self.se = make_squeeze_excite(planes * self.expansion, se_ratio)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.bn1(x))
        out = self.conv1(preact)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.dropout(self.relu(self.bn3(out))))
        return self.merge_branch(out, x, preact)


BLOCKS = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}
