"""The output folder of one edit, shared by ``p2v edit`` and ``p2v batch`` so both refuse and write alike.

A folder is refused when it would write over the source frames, a depth folder, or frames of an
earlier result (unless overwriting was asked for); frames go in one at a time, each atomically,
so an interrupted edit leaves whole frames and the count of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def checked_output_dir(out, source, *, what: str, depth_dirs=(), overwrite: bool = False) -> Path:
    """The resolved folder ``out``, or :class:`InputError` naming it as ``what`` (e.g. ``--out X``)."""
    from .frames import existing_frames

    out_dir = Path(out).expanduser().resolve()
    if out_dir == Path(source).expanduser().resolve():
        raise InputError(f"{what} is the input folder; choose another folder so the source frames stay intact")
    for depth_dir in depth_dirs:
        if depth_dir and Path(depth_dir).expanduser().resolve() == out_dir:
            raise InputError(f"{what} is also a depth folder; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{what} exists and is not a folder")
    already = existing_frames(out_dir) if out_dir.is_dir() else []
    if already and not overwrite:
        raise InputError(f"{what} already holds {len(already)} frame(s); pass --overwrite or choose another folder")
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK):
        raise InputError(f"{what} is not writable")
    return out_dir


class OutputFolder:
    """Writes an edit's frames into ``folder`` (made on :meth:`make`) and counts them."""

    def __init__(self, folder: Path, what: str):
        self.folder = folder
        self.what = what  # how messages name it, e.g. "--out edited/"
        self.written = 0

    def make(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot make {self.what}: {exc.strerror or exc}") from None

    def write(self, index: int, rgb) -> None:
        from .frames import write_frame

        try:
            write_frame(self.folder, index, rgb)
        except OSError as exc:  # a full disk, a quota, a folder removed under us
            raise InputError(f"cannot write frame {index} to {self.folder}: {exc.strerror or exc}") from None
        self.written += 1
