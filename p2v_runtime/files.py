"""Writing a file so that a reader sees the old contents or the new, never half a file.

Frames, depth maps, reports and cached inversions are read by other processes (the add-on, a
re-run, a player) while they are written, and a run can be interrupted at any point. So every
file the runtime writes goes to a hidden temporary beside its target (same folder, so the rename
stays on one file system), reaches the disk, and is renamed over the target; on any failure the
temporary is removed and the target keeps what it had.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield an empty hidden temporary beside ``path``; it replaces ``path`` when the block succeeds.

    For writers that need a path rather than an open file (ffmpeg). ``suffix`` ends the temporary's
    name (ffmpeg picks the container from it); the default keeps it out of ``*.png`` globs. The
    folder is created when missing. The temporary is made with the usual permissions (the umask
    applies), not the owner-only ones of :mod:`tempfile`, since outputs are often shared.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _create_temporary(target, suffix)
    try:
        yield temp
        _flush_to_disk(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` with a binary file open on the temporary, then replace ``path`` with it."""
    target = Path(path)
    with replacing(target) as temp:
        with open(temp, "wb") as file:
            write(file)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8, newlines as given (``\\n`` on every OS), through :func:`atomic_write`."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda file: file.write(data))


def _create_temporary(target: Path, suffix: str) -> Path:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(temp, flags, 0o666))
        except FileExistsError:
            continue
        return temp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def _flush_to_disk(path: Path) -> None:
    """fsync before the rename: after a crash the target is the old file or the whole new one."""
    descriptor = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
