"""`WeightEMA`: an exponential moving average of a model's weights that never waits for the device.

The rule is PyTorch's (`AveragedModel` with `get_ema_multi_avg_fn`, buffers averaged too):
the first update copies the model, every later one moves each floating-point tensor a
fraction 1 - decay of the way towards the model's (`torch._foreach_lerp_`, one kernel
for all of them). Integer buffers (BN's batch counters) are copied. The checkpoint keys
are AveragedModel's too ("module.<name>" and "n_averaged"), so earlier last.pt files resume.

Why not AveragedModel itself: it keeps its update count in a tensor and copies it to
the device on every update, and that copy waits for the device's whole queue, once per
training step. Here the count is a Python int.
"""

from __future__ import annotations

import copy
from itertools import compress

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards `model` (an architecture twin of the averaged one)."""
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            is_float = [t.is_floating_point() for t in averaged]
            is_counter = [not f for f in is_float]
            torch._foreach_lerp_(list(compress(averaged, is_float)), list(compress(current, is_float)),
                                 1.0 - self.decay)
            if any(is_counter):
                torch._foreach_copy_(list(compress(averaged, is_counter)), list(compress(current, is_counter)))
        self.updates += 1

    def state_dict(self) -> dict:
        state = {f"module.{name}": value for name, value in self.module.state_dict().items()}
        return {**state, "n_averaged": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict({name.removeprefix("module."): value for name, value in state.items()
                                     if name.startswith("module.")})
        self.updates = int(state["n_averaged"])
