"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Write to a temporary file in the destination's folder, fsync it, os.replace it
over the destination, then fsync the folder so the rename itself survives a
crash. On any error the temporary file is removed and the destination is
left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import NoSpaceError


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `destination`."""
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    except OSError as error:  # named after the file meant, not its temporary name (".model.safetensors.x1y2.tmp")
        raise type(error)(error.errno, error.strerror, str(destination)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private (0600); give the usual permissions
        put_in_place(tmp, destination)
    except BaseException as error:
        full = isinstance(error, Exception) and out_of_space(error, destination.parent)
        tmp.unlink(missing_ok=True)
        if full:
            kept = f"the previous {destination.name} is kept" if destination.exists() else "there was none before"
            raise NoSpaceError(f"{destination}: out of disk space (or quota) writing it ({kept}); free some space "
                               f"and run again") from None
        raise


def put_in_place(written: Path, destination: Path) -> None:
    """Move the complete file `written` (in `destination`'s folder) over `destination`, durably: the file's data
    on disk first, then the rename, then the folder's entry."""
    with open(written, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(written, destination)
    _fsync_dir(destination.parent)


def out_of_space(error: Exception, folder: Path) -> bool:
    """Whether a failed write ran out of disk space or quota."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):  # safetensors' error type
        return True
    # torch.save's zip writer says only "unexpected pos" or "iostream error": ask the file system, which a write that
    # ran out of space leaves (nearly) full until the partial file is removed.
    if not (isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "iostream error" in str(error))):
        return False
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


NEARLY_FULL_BYTES = 1 << 20


def write_json(path: str | os.PathLike, data) -> None:
    """`data` as indented JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
