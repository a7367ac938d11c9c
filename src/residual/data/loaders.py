"""Batches of uint8 images for training and evaluation.

Two loaders with one interface, `loader.epoch(epoch, start=0)` yielding
(images uint8 N x 3 x H x W, labels) on the training device:

- InMemoryLoader: the whole split decoded once into one tensor and moved to the
  device once. For data that fits in memory (CIFAR, `shapes`, most small
  datasets): on a GPU no batch ever round-trips through the CPU.
- FileLoader: a DataLoader with workers, pinned memory and persistent workers,
  decoding files as it goes. A file that cannot be read is skipped, logged and
  counted; too many failures in a row stop training with a clear error. A batch
  none of whose files could be read still comes, empty, in its place.

The order of each epoch is a permutation seeded by (seed, epoch), and an epoch
can start at any batch: that is what lets a resumed run continue exactly where
the interrupted one stopped. Under data-parallel training every worker draws the
same order and takes its share as DistributedSampler deals it (`shard`), so the
workers' batches together are exactly the batches one process would see.

`inference_batches` is the evaluation-time stream used by evaluate, predict,
explain and embed: items in their given order, decoded by DataLoader workers a
few batches ahead (so memory stays bounded on any folder size), each batch
saying which items it holds and which could not be read. Both take the same
`decoder`: Pillow in the workers, or JPEGs decoded on the device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError
from ..progress import progress_bar
from .datasets import DatasetError, Split
from .decode import BadImageError, as_image, read_image
from .device_decode import EncodedBatch, check_decoder, collate_encoded, read_encoded
from .transforms import resize_center_crop

log = logging.getLogger(__name__)


def epoch_order(count: int, shuffle: bool, seed: int, epoch: int, weights: torch.Tensor | None = None,
                repeats: int = 1) -> torch.Tensor:
    """The epoch's sample order: a seeded permutation, or with `weights` a seeded draw with replacement.

    `repeats` > 1 is repeated augmentation (Hoffer et al. 2020; DeiT, ResNet strikes back): the epoch
    draws count / repeats images and takes each `repeats` times in a row, so it keeps its length and each
    copy is augmented differently. Next to each other, the copies go to different workers under `shard`
    (each sees its own view of the image, as timm's RepeatAugSampler deals them), or to one batch.
    """
    if not shuffle:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    drawn = math.ceil(count / repeats)
    if weights is not None:
        order = torch.multinomial(weights, drawn, replacement=True, generator=generator)
    else:
        order = torch.randperm(count, generator=generator)[:drawn]
    return order.repeat_interleave(repeats)[:count]


def shard(order: torch.Tensor, rank: int, world: int, pad: bool) -> torch.Tensor:
    """Worker `rank`'s share of an epoch order: every `world`-th index starting at `rank`.

    This is DistributedSampler's deal. With `pad` the order first wraps around to a
    multiple of `world`, so every worker gets as many samples (DDP needs equal step
    counts); without it (evaluation) no sample is counted twice. Written out rather than
    using DistributedSampler because that class cannot start mid-epoch or deal a
    weighted draw, which resume and --balanced-sampler need.
    """
    if world == 1:
        return order
    if pad and len(order) % world:
        order = torch.cat([order, order[:world - len(order) % world]])
    return order[rank::world]


def shard_size(count: int, rank: int, world: int, pad: bool) -> int:
    return math.ceil(count / world) if pad else len(range(rank, count, world))


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights that make every class equally likely to be drawn."""
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


def batch_count(count: int, batch_size: int, drop_last: bool) -> int:
    """Batches of `count` items; `drop_last` leaves out a shorter last batch, unless it is the only one."""
    return count // batch_size if drop_last and count >= batch_size else math.ceil(count / batch_size)


class BadFileLog:
    """Unreadable files: each logged once, all counted, and a streak limit."""

    def __init__(self, max_streak: int = 20):
        self.max_streak = max_streak
        self.files: dict[str, str] = {}
        self.streak = 0

    def record(self, message: str | None) -> None:
        if message is None:
            self.streak = 0
            return
        path = message.split(": ", 1)[0]
        if path not in self.files:
            self.files[path] = message
            log.warning("skipped %s", message)
        self.streak += 1
        if self.streak > self.max_streak:
            raise DatasetError(f"{self.streak} images in a row could not be read (last: {message}); "
                               f"check the data with `residual check-data`")


def load_into_memory(split: Split, resize: int, crop: int, interpolation: str, bad: BadFileLog,
                     label: str = "loading", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every file of a split once -> (uint8 N x 3 x crop x crop, labels)."""
    if split.images is not None:
        return split.images, torch.as_tensor(split.labels)
    images, labels = [], []
    with progress_bar(label, progress) as bar:
        for path, target in bar.track(list(zip(split.files, split.labels)), description=label):
            try:
                images.append(resize_center_crop(read_image(path, resize), resize, crop, interpolation))
                labels.append(target)
                bad.record(None)
            except BadImageError as error:
                bad.record(str(error))
    if not images:
        raise DatasetError(f"none of the {len(split.files)} images of this split could be read")
    return torch.stack(images), torch.as_tensor(labels)


class InMemoryLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int,
                 device: torch.device, drop_last: bool = False, balanced: bool = False, rank: int = 0,
                 world: int = 1, repeats: int = 1):
        self.weights = balanced_weights(labels) if balanced else None
        self.repeats = repeats
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        count = shard_size(len(self.labels), self.rank, self.world, pad=self.shuffle)
        return batch_count(count, self.batch_size, self.drop_last)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.labels), self.shuffle, self.seed, epoch, self.weights, self.repeats)
        order = shard(order, self.rank, self.world, pad=self.shuffle).to(self.images.device)
        for index in range(start, len(self)):
            batch = order[index * self.batch_size:(index + 1) * self.batch_size]
            yield self.images[batch], self.labels[batch]


class _EpochBatchSampler(Sampler[list[int]]):
    def __init__(self, count: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 weights: torch.Tensor | None = None, rank: int = 0, world: int = 1, repeats: int = 1):
        self.count, self.batch_size, self.shuffle, self.seed = count, batch_size, shuffle, seed
        self.drop_last, self.weights, self.rank, self.world, self.repeats = drop_last, weights, rank, world, repeats
        self.epoch, self.start = 0, 0

    def batches(self) -> int:
        """Batches in a whole epoch of this worker's share."""
        return batch_count(shard_size(self.count, self.rank, self.world, self.shuffle), self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return self.batches() - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.count, self.shuffle, self.seed, self.epoch, self.weights, self.repeats)
        order = shard(order, self.rank, self.world, pad=self.shuffle)
        for index in range(self.start, self.batches()):
            yield order[index * self.batch_size:(index + 1) * self.batch_size].tolist()


class FileLoader:
    """`decoder`: 'pillow' decodes in the workers; 'torchvision' has the workers read and check the files
    and decodes the JPEGs on `device` (nvjpeg on CUDA; data/device_decode.py)."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int, device: torch.device,
                 resize: int, crop: int, interpolation: str, workers: int, bad: BadFileLog, drop_last: bool = False,
                 balanced: bool = False, rank: int = 0, world: int = 1, decoder: str = "pillow", repeats: int = 1):
        check_decoder(decoder, device)
        self.device, self.bad, self.batch_size = device, bad, batch_size
        self.resize, self.crop, self.interpolation = resize, crop, interpolation
        self.labels = torch.as_tensor(split.labels)
        self.pinned = device.type == "cuda"  # batches reach the GPU without the host waiting for it
        weights = balanced_weights(torch.as_tensor(split.labels)) if balanced else None
        self.sampler = _EpochBatchSampler(len(split), batch_size, shuffle, seed, drop_last, weights, rank, world,
                                          repeats)
        dataset_class, collate = DECODING[decoder]
        self.loader = DataLoader(dataset_class(split.files, resize, crop, interpolation),
                                 batch_sampler=self.sampler, num_workers=workers, pin_memory=self.pinned,
                                 persistent_workers=workers > 0, collate_fn=collate)

    def __len__(self) -> int:
        return self.sampler.batches()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start = epoch, start
        for batch in self.loader:
            batch = on_device(batch, self.device, self.resize, self.crop, self.interpolation)
            for message in [message for _, message in batch.failed] + [None] * len(batch.indices):
                self.bad.record(message)
            if batch.images is None:
                # Yielded all the same: a batch's position is what a resume starts from, and data-parallel
                # workers must take their steps together.
                yield (torch.empty((0, 3, self.crop, self.crop), dtype=torch.uint8, device=self.device),
                       torch.empty(0, dtype=torch.long, device=self.device))
                continue
            labels = self.labels[batch.indices]
            labels = labels.pin_memory() if self.pinned else labels
            yield batch.images, labels.to(self.device, non_blocking=True)


# --- evaluation-time stream ------------------------------------------------------------------------

@dataclass
class InferenceBatch:
    indices: list[int]  # positions (in the items given) of the images in this batch
    images: torch.Tensor | None  # uint8 N x 3 x crop x crop, None when none of the batch could be read
    failed: list[tuple[int, str]]  # (position, one-line reason) of each unreadable item

    def pin_memory(self) -> InferenceBatch:
        """The batch with its images in page-locked memory: a DataLoader with pin_memory=True calls this
        (it leaves other objects as they are), and only from page-locked memory does a copy to the GPU
        run in the background instead of waiting for the device's queue."""
        return dataclasses.replace(self, images=None if self.images is None else self.images.pin_memory())


class _InferenceDataset(torch.utils.data.Dataset):
    def __init__(self, items: list, resize: int, crop: int, interpolation: str):
        self.items, self.resize, self.crop, self.interpolation = items, resize, crop, interpolation

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, resize_center_crop(as_image(self.items[index], self.resize), self.resize, self.crop,
                                             self.interpolation), None
        except BadImageError as error:
            return index, None, str(error)


class _EncodedDataset(_InferenceDataset):
    """`--decoder torchvision`'s workers: a file's JPEG bytes for the device, or Pillow's decoded crop
    (of any other file, and of images given in memory)."""

    def __getitem__(self, index: int):
        if not isinstance(self.items[index], (str, os.PathLike)):
            return super().__getitem__(index)
        try:
            return index, read_encoded(self.items[index], self.resize, self.crop, self.interpolation), None
        except BadImageError as error:
            return index, None, str(error)


def _collate_inference(items) -> InferenceBatch:
    good = [(index, image) for index, image, _ in items if image is not None]
    failed = [(index, message) for index, _, message in items if message is not None]
    images = torch.stack([image for _, image in good]) if good else None
    return InferenceBatch([index for index, _ in good], images, failed)


# Per decoder: what the workers make of an item, and how their results become one batch.
DECODING = {"pillow": (_InferenceDataset, _collate_inference), "torchvision": (_EncodedDataset, collate_encoded)}


def on_device(batch: InferenceBatch | EncodedBatch, device: torch.device, resize: int, crop: int,
              interpolation: str) -> InferenceBatch:
    """A batch from the workers with its images on `device`: JPEGs handed over encoded are decoded there."""
    if isinstance(batch, EncodedBatch):
        return InferenceBatch(*batch.decode(device, resize, crop, interpolation))
    if batch.images is None or batch.images.device == device:
        return batch
    return dataclasses.replace(batch, images=batch.images.to(device, non_blocking=batch.images.is_pinned()))


def decoding_workers(processes: int = 1) -> int:
    """Decoding processes to start when none are asked for: the cores this process may run on,
    shared by the `processes` training processes on this machine, less one each for its own
    loop. Decoding is what keeps a GPU fed from JPEGs, so it gets every core left."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes - 1)


def check_stream(batch_size: int, workers: int | None, decoder: str, device: str | torch.device) -> None:
    """Refuse, in one line, arguments `inference_batches` cannot work with: callers that write as they go
    check them before their first line."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be at least 0, got {workers}")
    check_decoder(decoder, torch.device(device))


def inference_batches(items: list, resize: int, crop: int, interpolation: str = "bilinear", batch_size: int = 64,
                      workers: int | None = None, decoder: str = "pillow",
                      device: str | torch.device = "cpu") -> Iterator[InferenceBatch]:
    """`items` (paths, PIL images, arrays) resized and center-cropped, in order, `batch_size` at a time,
    each batch's images on `device`.

    workers=None starts `decoding_workers()` processes when there is more than one batch to decode, called from
    the main thread; from any other, it decodes in that thread. Threads sharing a model (a web app's pool) each
    predicting at once made DataLoaders fork side by side, and a worker forked while another thread held a lock
    died (exit code 1), reported by the process-wide SIGCHLD handler to whichever thread it interrupted.
    `decoder` as FileLoader's: 'torchvision' decodes the JPEG files on `device`.
    """
    check_stream(batch_size, workers, decoder, device)
    device = torch.device(device)
    if workers is None:
        in_main_thread = threading.current_thread() is threading.main_thread()
        workers = decoding_workers() if len(items) > batch_size and in_main_thread else 0
    dataset_class, collate = DECODING[decoder]
    loader = DataLoader(dataset_class(items, resize, crop, interpolation), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate)
    for batch in loader:
        yield on_device(batch, device, resize, crop, interpolation)
