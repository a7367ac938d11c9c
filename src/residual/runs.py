"""Where a task runs: a fresh run directory (never over an earlier run) and a device."""

from __future__ import annotations

from pathlib import Path

import torch


def new_run_dir(out: str, name: str) -> Path:
    """OUT/NAME, or OUT/NAME-2, NAME-3 ... if taken: a new run never overwrites an old one."""
    base = Path(out) / name
    candidate, index = base, 1
    while candidate.exists():
        index += 1
        candidate = base.with_name(f"{base.name}-{index}")
    candidate.mkdir(parents=True)
    return candidate


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
