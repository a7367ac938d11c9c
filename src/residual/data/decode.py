"""The one way images are read: safely, as RGB, or not at all with a reason.

Every path (training, evaluation, prediction) calls `read_image`. It applies
EXIF orientation, converts every Pillow mode to 8-bit RGB (16-bit and 32-bit
integer images are scaled by their bit depth, not clipped; palette and
grey images with transparency are composited through RGBA onto white),
refuses decompression bombs, and turns every failure (missing, empty,
truncated, not an image) into one `BadImageError` naming the file.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ResidualError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".ppm", ".pgm")
MAX_PIXELS = 178_956_970  # Pillow's own bomb threshold (2x its warning limit), enforced as an error


log = logging.getLogger(__name__)


class BadImageError(ResidualError):
    """A file that cannot be used as an image; the message names it and says why."""


class UnreadableFolderError(ResidualError):
    """A folder whose files cannot be listed (no permission): the images in it would be left out unseen."""


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def is_metadata(relative: Path) -> bool:
    """A path (relative to the folder searched) that systems and tools leave beside images, never an image:
    hidden files and folders (.DS_Store, .ipynb_checkpoints, macOS' AppleDouble files ._photo.jpg, which
    carry an image's extension) and the __MACOSX folder of zip files made on a Mac."""
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def files_under(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted, following symbolic links to folders (a dataset assembled from links
    to class folders elsewhere is common; Path.rglob does not follow them before Python 3.13), each real
    folder visited once, so a link back up the tree ends there. A link to nothing is kept, for its reader to
    report; a pipe or socket is not a file (opening one would wait for a writer)."""
    def refuse(error: OSError) -> None:  # os.walk's default is to leave an unreadable folder out without a word
        unreadable = Path(error.filename)
        inside = unreadable.relative_to(folder) if unreadable.is_relative_to(folder) else unreadable
        if not is_metadata(inside):  # a hidden folder (another user's .Trash-1000) is never read anyway
            raise UnreadableFolderError(f"{unreadable}: its files cannot be listed ({error.strerror}); make it "
                                        f"readable for this user, or move it away")

    found, seen = [], set()
    for root, folders, files in os.walk(folder, followlinks=True, onerror=refuse):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        found += [Path(root) / name for name in files]
    return sorted(path for path in found if path.is_file() or (path.is_symlink() and not path.exists()))


def image_files(sources) -> list:
    """Inputs as given (paths as Path), with every folder replaced by its image files (recursively, sorted;
    `is_metadata` files left out)."""
    items: list = []
    for source in sources:
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            folder = Path(source)
            files = [p for p in files_under(folder) if not is_metadata(p.relative_to(folder))]
            items += [p for p in files if is_image_file(p)]
            if others := [p.name for p in files if not is_image_file(p)]:  # an iPhone's .HEIC photos, notes
                log.warning("%s: left out %d file(s) whose extension is no image's: %s", folder, len(others),
                            ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
        elif is_url(source):
            items.append(source)  # as given: Path would fold its '//' and read_image could not name it
        else:
            items.append(Path(source) if isinstance(source, (str, os.PathLike)) else source)
    return items


def is_url(source) -> bool:
    return isinstance(source, str) and "://" in source


def read_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """An 8-bit RGB image from `path`, fully decoded, or BadImageError.

    `min_side`: the caller will shrink the shorter side to this. A JPEG is then decoded at
    the smallest of Pillow's draft scales (1/2, 1/4, 1/8, done inside the DCT) that keeps
    both sides at or above it: photos much larger than the model input decode several
    times faster (docs/performance.md). Other formats decode in full.
    """
    if is_url(path):  # nothing is downloaded but pretrained weights (weights.py), and only those, checked
        raise BadImageError(f"{path}: a URL; residual reads image files, so download it first (curl -O URL)")
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
    except FileNotFoundError:
        raise missing_file(path) from None
    return _decoded(path, str(path), min_side)


def missing_file(path: Path) -> BadImageError:
    """The error for a file that is not there: a link whose file is gone says where it points."""
    if path.is_symlink():
        return BadImageError(f"{path}: a link to {os.readlink(path)}, which is not there; fix the link or remove it")
    return BadImageError(f"{path}: no such file")


def decode_bytes(data: bytes, name: str, min_side: int | None = None) -> Image.Image:
    """`read_image` of an encoded image held in memory (an upload); errors name it `name`."""
    if not data:
        raise BadImageError(f"{name}: empty (0 bytes)")
    return _decoded(io.BytesIO(data), name, min_side)


def _decoded(source, name: str, min_side: int | None) -> Image.Image:
    """The image in `source` (a path or a file object) decoded to RGB, every failure a BadImageError naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadImageError(f"{name}: {image.width}x{image.height} pixels is over the "
                                        f"{MAX_PIXELS:,} limit (possible decompression bomb)")
                if min_side:
                    image.draft("RGB", (min_side, min_side))
                image.load()  # decode now, so truncation fails here and not later
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{name}: no such file") from None
    except PermissionError as error:  # an OSError, but no sign of a damaged file
        raise BadImageError(f"{name}: cannot be read ({error.strerror}); make it readable for this user") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(f"{name}: refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise BadImageError(f"{name}: corrupt or truncated image ({error})") from None


def as_image(item, min_side: int | None = None) -> Image.Image:
    """An RGB PIL image from a path (read_image, with `min_side`), a PIL image, an H x W x 3 uint8 array
    or a 3 x H x W uint8 tensor."""
    if isinstance(item, (str, os.PathLike)):
        return read_image(item, min_side)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    array = np.asarray(item)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)  # channels first (a torch image) -> channels last
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3) or array.dtype != np.uint8:
        raise BadImageError(f"an array of shape {array.shape} and dtype {array.dtype} is not an image; "
                            f"give H x W x 3 uint8 RGB")
    return Image.fromarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array, "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Scale by the bit depth in use so 16-bit images keep their full range.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else 2.0 ** 32 - 1
        grey = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min(initial=0)), float(array.max(initial=1))
        grey = ((array - low) / max(high - low, 1e-12) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
