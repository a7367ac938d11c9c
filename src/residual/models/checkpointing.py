"""Activation checkpointing ("gradient checkpointing"): a block keeps only its input for the backward
pass and computes its activations again there, trading about one more forward pass for memory.

torch.utils.checkpoint runs the block's forward twice, so batch norm would update its running
statistics twice per step (pytorch/pytorch#96136, open; timm's checkpointing does this): the
averages would move faster than the momentum says, and a checkpointed run would drift from the
same run without it. Here the second run leaves them as the first left them (momentum 0, the batch
counter put back), so a step gives the same gradients and statistics either way. Under
torch.compile, Dynamo refuses such a context (it takes only selective-checkpointing ones) and needs
none: the compiled graph applies each buffer update once, however often it recomputes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)`, its activations recomputed in the backward pass instead of kept."""
    if torch.compiler.is_compiling():
        return checkpoint(block, x, use_reentrant=False)
    norms = [module for module in block.modules() if isinstance(module, _BatchNorm)]
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _statistics_kept(norms)))


@contextlib.contextmanager
def _statistics_kept(norms: list[_BatchNorm]) -> Iterator[None]:
    """Batch norm layers that normalise as before but leave their running statistics alone: the recomputation
    sees the same batch statistics, and momentum 0 makes the running averages' update keep them exactly."""
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
                norm.num_batches_tracked.sub_(1)
