"""A model layer by layer, as Keras' `model.summary()` shows one: each module's output shape, parameters
and multiply-accumulates for one image, down to a depth (1: the stem's parts, the stages and the head;
2: also each block; 3: also the layers inside the blocks).

Written here rather than taken from torchinfo: MACs come from PyTorch's own FLOP counter, per module, so
they add up to the figures `residual models` prints (torchvision's convention: convolutions and matrix
products only), and the rows are the modules' state-dict names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import count_params


@dataclass(frozen=True)
class LayerRow:
    name: str  # the module's name, as in the state dict (layer1.0.conv1)
    kind: str  # its class (Conv2d, Bottleneck...)
    depth: int  # 1 for the model's own children
    output: tuple[int, ...]  # the output shape of one image (channels, height, width); () if it did not run
    params: int  # of the module and everything inside it
    macs: int


def does_nothing(module: nn.Module) -> bool:
    """A placeholder the model's layout keeps (no norm in a plain stem, dropout of 0): not worth a row."""
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


@dataclass(frozen=True)
class LayerSummary:
    rows: list[LayerRow]
    params: int  # the whole model's
    macs: int  # the whole model's, for one image
    input_shape: tuple[int, int, int]  # channels, height, width of the image counted


def layer_summary(model: nn.Module, input_size: int, depth: int = 2, in_chans: int = 3) -> LayerSummary:
    """One row per module down to `depth`, in the order they are defined (which is the order they run)."""
    modules = [(name, module) for name, module in model.named_modules()
               if name and name.count(".") < depth and not does_nothing(module)]
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape[1:])
        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules]
    device = next(model.parameters()).device
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(torch.zeros(1, in_chans, input_size, input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    flops = counter.get_flop_counts()
    prefix = type(model).__name__ + "."  # the counter names modules by their path below the model's class
    rows = [LayerRow(name, type(module).__name__, name.count(".") + 1, shapes.get(name, ()), count_params(module),
                     sum(flops.get(prefix + name, {}).values()) // 2)  # two FLOPs per multiply-accumulate
            for name, module in modules]
    return LayerSummary(rows, count_params(model), counter.get_total_flops() // 2, (in_chans, input_size, input_size))
