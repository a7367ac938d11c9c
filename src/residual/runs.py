"""Where a task runs: a fresh run directory (never over an earlier run, and never trained in by two
processes at once), a device, and whether to compile for it."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError, ResidualError


def new_run_dir(out: str, name: str) -> Path:
    """OUT/NAME, or OUT/NAME-2, NAME-3 ... if taken: a new run never overwrites an old one."""
    base = Path(out) / name
    candidate, index = base, 1
    while True:
        try:  # mkdir claims the name: two runs started at once cannot both take it, as a check before could
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            index += 1
            candidate = base.with_name(f"{base.name}-{index}")


class RunInUseError(ResidualError):
    """A run directory another process is training in."""


RUN_LOCK = ".lock"  # in the run directory: its holder's process and host


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Held while a process trains in `run_dir`. A second one (a resume started twice, a job requeued while the
    first still runs) is refused, instead of writing its checkpoints and metrics between the first's. The kernel
    releases the lock when its process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # Windows has no flock: runs there are not guarded
        yield
        return
    with open(run_dir / RUN_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunInUseError(f"{run_dir}: {holder} is training in it; let it finish, or stop it and then "
                                f"resume") from None
        except OSError as error:  # a file system without locks (some NFS mounts): the run trains unguarded
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
        else:
            lock.seek(0)
            lock.truncate()
            lock.write(f"process {os.getpid()} on {socket.gethostname()}")
            lock.flush()
        yield


@contextmanager
def output_dir(out: str | None, runs: str, name: str) -> Iterator[Path]:
    """The folder a command writes into: `out` as given, else a new run folder RUNS/NAME. A new run
    folder still empty at the end (the command failed, or every image did) is removed again."""
    if out:
        yield Path(out)
        return
    run_dir = new_run_dir(runs, name)
    try:
        yield run_dir
    finally:
        if not any(run_dir.iterdir()):
            run_dir.rmdir()


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, then MPS, then the CPU. A device named outright must exist here: asking for a GPU
    the machine lacks is an error at the start, not a traceback from deep inside torch."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is usable here (none found, or this PyTorch is built "
                              f"without CUDA); use --device cpu or auto")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0")
        if device.type == "mps" and not _mps_available():
            raise ConfigError(f"--device {name}: MPS (Apple's GPU) is not available here; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def compile_repays(device_type: str, work: int, threshold: int, unit: str) -> tuple[bool, str]:
    """Whether torch.compile pays for its warm-up over `work` `unit`s (steps, images), and why: only on
    CUDA (on a CPU it was slower or barely faster, docs/BENCHMARKS.md) and from `threshold` on."""
    if device_type != "cuda":
        return False, f"off (chosen automatically only on CUDA; this run is on {device_type})"
    if work < threshold:
        return False, f"off ({work:,} {unit}: too few to repay compilation, which starts at {threshold:,})"
    return True, f"on ({work:,} {unit} repay the compilation warm-up)"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). There bf16 autocast trains
    1.7-2.6x as fast as fp32 (docs/BENCHMARKS.md); elsewhere bf16 is emulated and slower."""
    try:  # PyTorch's own feature checks (torch.cpu), private in name only since 2.1
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False
