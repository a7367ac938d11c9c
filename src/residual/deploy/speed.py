"""CPU speed of a model, measured the same way for PyTorch and ONNX Runtime.

PyTorch's own `torch.utils.benchmark.Timer` does the timing (with warm-up, and with
the process's thread count rather than its default of one): latency is the median
per-call time of single images over blocks of calls, throughput the images per
second of repeated calls at a batch of 32. Inputs are random, of the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import benchmark

THROUGHPUT_BATCH = 32


@dataclass
class Speed:
    latency_ms: float  # batch 1, median
    images_per_s: float  # batch THROUGHPUT_BATCH

    def to_dict(self) -> dict:
        return {"latency_ms_b1": round(self.latency_ms, 3), f"images_per_s_b{THROUGHPUT_BATCH}":
                round(self.images_per_s, 1)}


def measure_speed(model, input_size: int, in_chans: int = 3, latency_seconds: float = 1.0,
                  throughput_repeats: int = 5) -> Speed:
    """Latency at batch 1 and images/s at batch 32 of `model` (a PyTorch module or an exported model) on CPU."""
    def call(x: torch.Tensor):
        with torch.inference_mode():
            return model(x)

    generator = torch.Generator().manual_seed(0)
    single = torch.randn(1, in_chans, input_size, input_size, generator=generator)
    batch = torch.randn(THROUGHPUT_BATCH, in_chans, input_size, input_size, generator=generator)
    timer = lambda x: benchmark.Timer("call(x)", globals={"call": call, "x": x},  # noqa: E731
                                      num_threads=torch.get_num_threads())
    latency = timer(single).blocked_autorange(min_run_time=latency_seconds).median
    per_batch = timer(batch).timeit(throughput_repeats).mean
    return Speed(latency * 1000, THROUGHPUT_BATCH / per_batch)
