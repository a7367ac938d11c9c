"""The inference fast path: a trained model made cheaper to run, with the same answers.

`prepare_for_inference(model, device, precision)` does three things, in place:

- folds every BatchNorm that directly follows a convolution into that convolution.
  In eval mode BN is a fixed per-channel scale and shift, so conv + BN is one conv
  with a bias: a post-activation ResNet loses half its layers and their memory
  traffic. The pairs are found by tracing the forward pass with torch.fx, so every
  stem, shortcut and block variant (and pruned nets) is covered; BN that does not
  follow a conv (the pre-activation BN at a block's input) is left as it is.
  PyTorch's `fuse_conv_bn_eval` computes each folded conv.
- channels_last weights (the layout cuDNN's and oneDNN's fast kernels use);
- `precision`: 'auto' is bf16 weights on CUDA (fp16 where bf16 is missing) and fp32
  elsewhere. A forward pre-hook casts whatever float32 NCHW batch a caller passes to
  the weights' dtype and layout, and the logits come back float32, so predict,
  evaluate and Grad-CAM need no change.

The module tree keeps its names (a folded BN becomes an Identity), so layer names
such as `layer4` still work for Grad-CAM and feature hooks.

`compile_for_inference(model, batch_size)` adds torch.compile for long prediction jobs:
every batch it is given is padded to `batch_size`, so the one compiled graph serves the
whole stream, the shorter last batch included (a new shape would compile again, as long
as the first time).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for `precision` on `device` ('auto': bf16 on CUDA, or fp16 without bf16; else fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return DTYPES[precision]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d whose input is a Conv2d's output (used by nothing else) into that conv.

    The model must be in eval mode. Returns how many pairs were folded.
    """
    if model.training:
        raise ConfigError("fold_batchnorm needs a model in eval mode: training-mode BN uses batch statistics")
    modules = dict(model.named_modules())
    graph = fx.symbolic_trace(model).graph
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], nn.Conv2d) and len(source.users) == 1):
            continue
        conv, norm = modules[source.target], modules[node.target]
        _replace(model, source.target, fuse_conv_bn_eval(conv, norm))
        _replace(model, node.target, nn.Identity())
        folded += 1
    return folded


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)


def prepare_for_inference(model: nn.Module, device: str | torch.device = "cpu", precision: str = "auto") -> nn.Module:
    """`model` on `device` in eval mode with BN folded, channels_last and `precision` weights (in place)."""
    device = torch.device(device)
    dtype = inference_dtype(precision, device)
    model.eval()
    fold_batchnorm(model)
    model.to(device=device, dtype=dtype, memory_format=torch.channels_last)

    def cast_input(_module, args):
        x, *rest = args
        return (x.to(dtype=dtype, memory_format=torch.channels_last), *rest)

    def float_output(_module, _args, output):
        return output.float() if isinstance(output, torch.Tensor) else [o.float() for o in output]

    model.register_forward_pre_hook(cast_input)
    model.register_forward_hook(float_output)
    model.inference_precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return model


class FullBatchCompiled(nn.Module):
    """`model` under torch.compile, fed only batches of `batch_size` images: a shorter batch is padded
    with zeros and its padding's outputs dropped. Reads like the model: same parameters (so the same
    device) and preprocessing."""

    def __init__(self, model: nn.Module, batch_size: int, mode: str | None = None):
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.compiled = torch.compile(model, mode=mode)
        self.preprocessing = model.preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = x.shape[0]
        if count >= self.batch_size:
            return self.compiled(x)
        padding = x.new_zeros((self.batch_size - count, *x.shape[1:]))
        return self.compiled(torch.cat([x, padding]))[:count]


def compile_for_inference(model: nn.Module, batch_size: int, mode: str | None = None) -> FullBatchCompiled:
    """`model` compiled for a stream of batches of at most `batch_size` images (one graph for all)."""
    return FullBatchCompiled(model.eval(), batch_size, mode)
