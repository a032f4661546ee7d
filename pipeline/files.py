"""Atomic file writes: a file appears whole under its name, or not at all.

The content goes to a hidden temporary file in the target's folder (``.<name>.<random>.tmp``),
which is renamed over the target when the write succeeds and removed when it fails, so an
interruption never leaves a half-written file under the target's name. The temporary file is
created with the usual permissions (the umask's), which the target keeps.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; rename it over ``path`` on success.

    For writers that take a path (``torch.save``, ``Figure.savefig``, ``PIL.Image.save``): the
    temporary name ends in ``.tmp``, so tell them the format. Parent folders are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    tmp.touch(exist_ok=False)  # claims the name: two writers never share a temporary file
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(
    path: Path,
    mode: Literal["w", "wb"] = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it is replaced only once the ``with`` block succeeds.

    Args:
        path: the file to write; parent folders are created.
        mode: ``"wb"`` (bytes) or ``"w"`` (text).
        encoding, newline: as for :func:`open` (text mode).

    Yields:
        The open temporary file.
    """
    with atomic_target(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as fh:
        yield fh
