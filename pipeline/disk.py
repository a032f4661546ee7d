"""Disk space: check it before writing, and turn a full disk into a one-line error.

Every writer of inkpipe (ingest, checkpoints and metrics, predictions) knows, or can bound,
how much it is about to write. :func:`check_free` compares that with the free space of the
target's file system *before* the first byte is written, so a run that cannot fit says so up
front. A disk that fills anyway (another process writing, a bound that was too low) raises
``OSError(ENOSPC)`` somewhere deep in Zarr, torch or Pillow; :func:`disk_full_as_error` turns
it into a :class:`DiskFullError` naming the target and the space, and :func:`reserve`
allocates memory-mapped files up front, where a full disk would otherwise kill the process
with ``SIGBUS`` on the first page written.

Nothing here deletes anything: the writers keep what they finished (atomic files, complete
store fragments) and redo the interrupted part on the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskFullError

__all__ = [
    "DISK_FULL_ERRNOS",
    "block_bytes",
    "check_free",
    "disk_full_as_error",
    "disk_full_message",
    "format_bytes",
    "free_bytes",
    "is_disk_full",
    "reserve",
]

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space; quota exceeded
_DEFAULT_BLOCK = 4096


def format_bytes(n: float) -> str:
    """Return ``n`` bytes in decimal units: ``"512 B"``, ``"3.1 MB"``, ``"7.40 GB"``."""
    n = float(n)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def _existing(path: Path) -> Path:
    """Return ``path`` or its nearest existing ancestor (the file system it will live on)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Return the bytes free for this user on the file system that holds (or will hold) ``path``."""
    return int(shutil.disk_usage(_existing(path)).free)


def block_bytes(path: Path) -> int:
    """Return the allocation unit of ``path``'s file system (every file fills whole blocks)."""
    try:
        return int(os.statvfs(_existing(path)).f_frsize) or _DEFAULT_BLOCK
    except (AttributeError, OSError):  # no statvfs (Windows)
        return _DEFAULT_BLOCK


def check_free(path: Path, need_bytes: int, what: str, fix: str) -> None:
    """Raise :class:`DiskFullError` unless ``need_bytes`` fit on ``path``'s file system.

    Args:
        path: the file or folder about to be written (it need not exist yet).
        need_bytes: an upper bound of the bytes about to be written.
        what: what is written, for the message (``"fragment 2 into store.zarr"``).
        fix: what the user can do, for the message.
    """
    free = free_bytes(path)
    if need_bytes > free:
        raise DiskFullError(
            f"not enough disk space for {what}: it needs up to {format_bytes(need_bytes)}, "
            f"{format_bytes(free)} are free on the disk of {_existing(path)}; {fix}"
        )


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``OSError`` saying the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_message(exc: OSError, path: Path | None = None, what: str = "", fix: str = "") -> str:
    """Return the one-line message for a full disk met while writing ``what`` to ``path``."""
    target = Path(path) if path is not None else Path(exc.filename or ".")
    doing = f" writing {what}" if what else ""
    return f"the disk is full{doing} ({target}: {format_bytes(free_bytes(target))} free); " + (
        fix or "free some space and run the same command again"
    )


@contextlib.contextmanager
def disk_full_as_error(path: Path, what: str, fix: str) -> Iterator[None]:
    """Turn an ``OSError`` ENOSPC/EDQUOT inside the block into a one-line :class:`DiskFullError`.

    Args:
        path: the store, run or output folder being written (named in the message).
        what: what is being written; fix: what the user can do.
    """
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc) or isinstance(exc, DiskFullError):
            raise
        raise DiskFullError(disk_full_message(exc, path, what, fix)) from None


def reserve(path: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` of the file ``path`` on disk now (``ENOSPC`` now, not later).

    Memory maps are sparse: their pages get disk blocks when first written, and a full disk
    then kills the process with ``SIGBUS``. Where ``posix_fallocate`` exists the blocks are
    allocated here instead; elsewhere this does nothing.
    """
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None or nbytes <= 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        allocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # file system cannot: stay sparse
            return
        raise
    finally:
        os.close(fd)
