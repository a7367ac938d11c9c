"""CPU speed of a model, measured the same way for PyTorch and ONNX Runtime.

Latency is the median of single-image calls; throughput is images per second
over repeated calls at a batch of 32. Both run on random inputs of the model's
size after warm-up calls, so first-call costs (allocation, kernel selection)
are not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

THROUGHPUT_BATCH = 32


@dataclass
class Speed:
    latency_ms: float  # batch 1, median
    images_per_s: float  # batch THROUGHPUT_BATCH

    def to_dict(self) -> dict:
        return {"latency_ms_b1": round(self.latency_ms, 3), f"images_per_s_b{THROUGHPUT_BATCH}":
                round(self.images_per_s, 1)}


def timed_calls(call: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `repeats` calls of `call(x)`, after `warmup` untimed ones."""
    for _ in range(warmup):
        call(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return times


def measure_speed(model, input_size: int, in_chans: int = 3, latency_repeats: int = 30,
                  throughput_repeats: int = 5) -> Speed:
    """Latency at batch 1 and images/s at batch 32 of `model` (a PyTorch module or an OnnxModel) on CPU."""
    def call(x: torch.Tensor):
        with torch.inference_mode():
            return model(x)

    generator = torch.Generator().manual_seed(0)
    single = torch.randn(1, in_chans, input_size, input_size, generator=generator)
    batch = torch.randn(THROUGHPUT_BATCH, in_chans, input_size, input_size, generator=generator)
    latency = statistics.median(timed_calls(call, single, latency_repeats))
    throughput = THROUGHPUT_BATCH * throughput_repeats / sum(timed_calls(call, batch, throughput_repeats, warmup=1))
    return Speed(latency * 1000, throughput)
