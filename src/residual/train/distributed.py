"""Data-parallel training on PyTorch's own engine: DistributedDataParallel, launched by torchrun.

`launch` starts N local workers with torch.distributed.run (torchrun), each running
`residual train --run-dir RUN`: every worker reads the run's config.yaml, and a
group that torchrun restarts after a lost worker (`--max-restarts`) resumes from
the run's last.pt. Several machines use torchrun directly (docs/distributed.md).

`World` is what one worker knows about the group (its rank, the group's size),
read from the environment torchrun sets, with the few collectives the trainer
needs: sums for global metrics, a broadcast for the run directory, a merge of
the unreadable files each worker met, a barrier.
The process group uses nccl on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1  # workers on this machine

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only worker that prints and writes files."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_type: str) -> "World":
        """This worker's place in the group torchrun started (or a world of one outside torchrun)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            store, rank, size = next(dist.rendezvous("env://"))
            # A group that torchrun restarts meets again in the same store; without a prefix of its own,
            # a worker can read an address the previous attempt left there and fail to connect.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=size,
                                    store=dist.PrefixStore(f"residual/attempt-{attempt}", store))
        return cls(dist.get_rank(), local_rank, dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    def device(self, device: torch.device) -> torch.device:
        """The worker's own GPU (one per local rank); other devices are shared as they are."""
        return torch.device("cuda", self.local_rank) if self.distributed and device.type == "cuda" else device

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over all workers (float64, so counts stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def average(self, value: torch.Tensor | int, device: torch.device) -> torch.Tensor | int:
        """The mean of `value` over all workers, as a tensor on `device` that the host does not wait for
        (in a world of one, `value` as it is)."""
        if not self.distributed:
            return value
        tensor = torch.full((), value, dtype=torch.float32, device=device) if isinstance(value, int) else value
        dist.all_reduce(tensor)
        return tensor / self.size

    def broadcast(self, value):
        """Rank 0's `value` on every worker."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def merge(self, mapping: dict) -> dict:
        """The union of every worker's `mapping` (e.g. the unreadable files each one met)."""
        if not self.distributed:
            return dict(mapping)
        gathered = [None] * self.size
        dist.all_gather_object(gathered, mapping)
        return {key: value for part in gathered for key, value in part.items()}

    def gather(self, array: np.ndarray) -> np.ndarray:
        """Every worker's rows of `array`, rank by rank (e.g. each one's share of the validation probabilities)."""
        if not self.distributed:
            return array
        gathered = [None] * self.size
        dist.all_gather_object(gathered, array)
        return np.concatenate(gathered)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def end_worker(code: int) -> None:
    """Leave a torchrun worker whose command succeeded without the interpreter's teardown (returns otherwise).

    In the test suite a worker died of SIGABRT after its run had finished and its process group was
    destroyed ("terminate called without an active exception", no Python frame left on any thread): a C++
    thread torn down while the interpreter finalised, so torchrun reported a failed group for a finished
    run. A finished worker has nothing left to do at exit (its files are written and closed), so it flushes
    its output and ends with os._exit. A failing worker exits as usual, so torchrun's error reports stay."""
    if code == 0 and "TORCHELASTIC_RUN_ID" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def per_worker_batch(global_batch: int, world: World) -> int:
    """--batch-size is the global batch (what the learning rate is scaled by); each worker takes its share."""
    if global_batch % world.size:
        raise ConfigError(f"--batch-size {global_batch} is the global batch: it must divide evenly among the "
                          f"{world.size} workers (e.g. {global_batch - global_batch % world.size})")
    return global_batch // world.size


def torchrun_command(run_dir: Path, nproc: int, max_restarts: int) -> list[str]:
    """The torchrun command that runs `residual train --run-dir RUN_DIR` on `nproc` local workers."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "residual", "train", "--run-dir", str(run_dir)]


def check_launch(nproc: int, max_restarts: int, device: str, sync_bn: bool, batch_size: int | None) -> None:
    """What can be refused before any worker starts (so the user sees one line, not N tracebacks)."""
    if nproc < 1 or max_restarts < 0:
        raise ConfigError("--nproc must be at least 1 and --max-restarts at least 0")
    if batch_size is not None:  # an automatic one is chosen to divide among the workers
        per_worker_batch(batch_size, World(size=nproc))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if sync_bn and not cuda:
        raise ConfigError("--sync-bn needs CUDA workers (PyTorch's SyncBatchNorm has no CPU kernel); on the CPU "
                          "each worker normalises with its own batch statistics")
    if cuda:
        if nproc > torch.cuda.device_count():
            raise ConfigError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); one worker "
                              f"per GPU (use --device cpu for CPU workers)")


def launch(run_dir: Path, nproc: int, max_restarts: int = 0) -> int:
    """Run the prepared run directory on `nproc` local workers; torchrun's exit code."""
    # Workers must import this same residual, also from a source checkout that is not installed.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(run_dir, nproc, max_restarts), env=env).returncode
