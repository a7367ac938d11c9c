"""JPEG decoding on the training device through torchvision.io: the file loader's `--decoder torchvision`.

The default file loader decodes with Pillow in worker processes, so training from JPEGs
runs as fast as the machine's cores decode. Where torchvision is installed, decoding can
move to the device instead: `torchvision.io.decode_jpeg` on a batch of files runs nvjpeg
on CUDA (on A100, H100 and H200 it sends the batch's baseline JPEGs to the GPU's hardware
JPEG engines), and libjpeg-turbo in the training process on a CPU, where it is slower than
Pillow's workers and exists so that this path is tested without a GPU.

The workers still do what only the host can: read each file, and look at its header with
Pillow (no pixels decoded). A file that is not a plain JPEG in RGB or grey, is over the
decompression-bomb limit or is cut short (no end-of-image marker) is decoded by Pillow in
the worker, exactly as `--decoder pillow` would, which reads it or reports it. EXIF
orientation is read from the header and applied on the device (torchvision applies it on
the CPU only). A JPEG whose data is corrupt past its header fails on the device: the batch
is then decoded one file at a time, and that file is reported and skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from ..errors import ConfigError
from .decode import MAX_PIXELS, BadImageError, missing_file, read_image
from .transforms import resize_center_crop, resize_center_crop_pixels

DECODERS = ("pillow", "torchvision")
END_OF_IMAGE = b"\xff\xd9"


@dataclasses.dataclass
class EncodedJpeg:
    """A JPEG file's bytes, checked by its header, for decoding on the device."""

    data: np.ndarray  # uint8, the whole file
    orientation: int  # EXIF orientation, 1 = as stored
    name: str  # the path, for the message if it fails to decode


def read_encoded(path: str | os.PathLike, resize: int, crop: int, interpolation: str) -> EncodedJpeg | torch.Tensor:
    """A worker's part: the file's bytes when the device can decode them, else Pillow's resized crop
    (uint8 3 x crop x crop) as `--decoder pillow` makes it. Raises BadImageError as `read_image` does."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing_file(path) from None
    except OSError as error:
        raise BadImageError(f"{path}: cannot be read ({error})") from None
    orientation = device_decodable(data)
    if orientation is not None:
        return EncodedJpeg(np.frombuffer(data, dtype=np.uint8), orientation, str(path))
    return resize_center_crop(read_image(path, resize), resize, crop, interpolation)


def device_decodable(data: bytes) -> int | None:
    """The EXIF orientation (1 = as stored) of a JPEG the device decoder can take: complete, RGB or
    grey, within the pixel limit; None for anything else, which goes to Pillow to be read or refused."""
    if not (data.startswith(b"\xff\xd8") and data[-64:].rstrip(b"\0").endswith(END_OF_IMAGE)):
        return None  # not a JPEG, or cut short (Pillow reports it as truncated)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused as read_image refuses it
            with Image.open(io.BytesIO(data)) as image:  # parses the header only: no pixels are decoded
                if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.width * image.height > MAX_PIXELS:
                    return None
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # an unparsable header, or a bomb: Pillow's full read names the problem
        return None
    return orientation if orientation in range(1, 9) else None


@dataclasses.dataclass
class EncodedBatch:
    """A batch as the workers hand it over: JPEG bytes for the device, and what Pillow decoded."""

    indices: list[int]  # positions (in the split) of this batch's readable items, in batch order
    jpegs: torch.Tensor  # the batch's JPEG files end to end, uint8
    jpeg_sizes: list[int]
    jpeg_slots: list[int]  # each JPEG's place in `indices`
    jpeg_names: list[str]
    orientations: list[int]
    decoded: torch.Tensor | None  # images Pillow decoded in the worker, uint8 N x 3 x crop x crop
    decoded_slots: list[int]  # their places in `indices`
    failed: list[tuple[int, str]]  # (position, one-line reason) of each item no decoder could read

    def pin_memory(self) -> EncodedBatch:
        """The batch with its tensors page-locked, as `InferenceBatch.pin_memory` (a DataLoader with
        pin_memory=True calls this): the JPEG bytes go to the GPU's decoder, Pillow's images to the GPU."""
        return dataclasses.replace(self, jpegs=self.jpegs.pin_memory(),
                                   decoded=None if self.decoded is None else self.decoded.pin_memory())

    def decode(self, device: torch.device, resize: int, crop: int,
               interpolation: str) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """(indices, uint8 N x 3 x crop x crop images on `device`, failed) with the JPEGs decoded there."""
        images: list[torch.Tensor | None] = [None] * len(self.indices)
        failed = list(self.failed)
        pictures = decode_jpegs(list(torch.split(self.jpegs, self.jpeg_sizes)), self.jpeg_names, device)
        upright: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}  # size -> {slot: picture}
        for slot, picture, orientation in zip(self.jpeg_slots, pictures, self.orientations):
            if isinstance(picture, str):
                failed.append((self.indices[slot], picture))
            else:
                picture = oriented(picture, orientation)
                upright.setdefault(tuple(picture.shape), {})[slot] = picture
        for group in upright.values():  # one resize per photo size, not one per photo: fewer kernel launches
            resized = resize_center_crop_pixels(torch.stack(list(group.values())), resize, crop, interpolation)
            for slot, image in zip(group, resized):
                images[slot] = image
        if self.decoded is not None:
            for slot, image in zip(self.decoded_slots, self.decoded.to(device, non_blocking=True)):
                images[slot] = image
        kept = [slot for slot, image in enumerate(images) if image is not None]
        stacked = torch.stack([images[slot] for slot in kept]) if kept else None
        return [self.indices[slot] for slot in kept], stacked, failed


def collate_encoded(items) -> EncodedBatch:
    """Worker results (position, EncodedJpeg | decoded tensor | None, message) -> one EncodedBatch,
    the JPEG bytes in one buffer so the batch crosses to the training process as a few tensors."""
    readable = [(index, payload) for index, payload, _ in items if payload is not None]
    jpegs = [(slot, payload) for slot, (_, payload) in enumerate(readable) if isinstance(payload, EncodedJpeg)]
    decoded = [(slot, payload) for slot, (_, payload) in enumerate(readable) if isinstance(payload, torch.Tensor)]
    data = np.concatenate([jpeg.data for _, jpeg in jpegs]) if jpegs else np.zeros(0, dtype=np.uint8)
    return EncodedBatch(
        indices=[index for index, _ in readable], jpegs=torch.from_numpy(data),
        jpeg_sizes=[len(jpeg.data) for _, jpeg in jpegs], jpeg_slots=[slot for slot, _ in jpegs],
        jpeg_names=[jpeg.name for _, jpeg in jpegs], orientations=[jpeg.orientation for _, jpeg in jpegs],
        decoded=torch.stack([image for _, image in decoded]) if decoded else None,
        decoded_slots=[slot for slot, _ in decoded],
        failed=[(index, message) for index, _, message in items if message is not None])


def decode_jpegs(encoded: list[torch.Tensor], names: list[str], device: torch.device) -> list[torch.Tensor | str]:
    """Each JPEG as a uint8 3 x H x W tensor on `device`, or the one-line reason it could not be decoded.

    The whole list goes to torchvision in one call (nvjpeg decodes a batch at once); if that fails,
    one file at a time, so that a single corrupt file costs only itself."""
    if not encoded:
        return []
    try:
        return torchvision_decode(encoded, device)
    except RuntimeError:
        pass
    results: list[torch.Tensor | str] = []
    for data, name in zip(encoded, names):
        try:
            results.append(torchvision_decode([data], device)[0])
        except RuntimeError as error:
            results.append(f"{name}: corrupt JPEG data ({first_line(error)})")
    return results


def torchvision_decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # optional: only `--decoder torchvision` needs it

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def oriented(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """A 3 x H x W image turned upright by its EXIF orientation, as Pillow's `ImageOps.exif_transpose`."""
    rows, columns = -2, -1
    if orientation == 2:
        return pixels.flip(columns)
    if orientation == 3:
        return pixels.flip(rows, columns)
    if orientation == 4:
        return pixels.flip(rows)
    if orientation == 5:
        return pixels.transpose(rows, columns)
    if orientation == 6:
        return pixels.rot90(-1, (rows, columns))
    if orientation == 7:
        return pixels.transpose(rows, columns).flip(rows, columns)
    if orientation == 8:
        return pixels.rot90(1, (rows, columns))
    return pixels


@functools.cache  # asked by the config and by each loader: the sample decode runs once per device
def check_decoder(decoder: str, device: torch.device) -> None:
    """Refuse, in one line, a decoder that cannot work here: an unknown name, or `torchvision` where its
    JPEG decoder does not import or cannot decode a JPEG on `device` (e.g. built without nvjpeg)."""
    if decoder not in DECODERS:
        raise ConfigError(f"--decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "pillow":
        return
    sample = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 90)).save(sample, format="JPEG")
    try:
        picture = torchvision_decode([torch.frombuffer(bytearray(sample.getvalue()), dtype=torch.uint8)], device)[0]
    except Exception as error:  # ImportError, or the extension's RuntimeError
        raise ConfigError(f"--decoder torchvision: torchvision cannot decode JPEGs on {device} ({first_line(error)}); "
                          f"install torchvision with its image extension, or use --decoder pillow") from None
    if picture.shape != (3, 8, 16) or picture.device.type != device.type:
        raise ConfigError(f"--decoder torchvision: torchvision decoded a 16x8 JPEG on {device} to "
                          f"{tuple(picture.shape)} on {picture.device}; use --decoder pillow")


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
