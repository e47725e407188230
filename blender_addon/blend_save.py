"""Saving a .blend that other jobs may save at the same moment (farm jobs editing strips of one file).

Each headless job opened the file, added its result strip in memory, and must not overwrite
what another job saved in the meantime. So saving takes a lock on the file (an OS lock on a
hidden file beside it, released by the OS if the process dies), and if the file changed since
this job opened it, reopens the newest version and adds its strip again before saving. The
save itself goes to a temporary file beside the .blend that replaces it in one rename, after the
previous version is kept as ``.blend1`` (as Blender keeps it): a failed save leaves the user's
file as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import bpy

from . import output_strip
from .errors import P2VAddonError

LOCK_WAIT = 600.0  # seconds a job waits for others to finish saving the same file


def file_stamp(path: str) -> tuple:
    """What changes when anyone saves the file: modification time, size, inode."""
    info = os.stat(path)
    return (info.st_mtime_ns, info.st_size, info.st_ino)


@contextlib.contextmanager
def locked(blend_path: str, wait: float = LOCK_WAIT):
    """Hold the save lock of ``blend_path`` (one holder at a time, across processes)."""
    folder, name = os.path.split(os.path.abspath(blend_path))
    lock_path = os.path.join(folder, f".{name}.p2v-lock")
    try:
        handle = open(lock_path, "a+b")
    except OSError as exc:
        raise P2VAddonError(f"Cannot lock {blend_path} for saving ({exc.strerror or exc})") from None
    try:
        deadline = time.monotonic() + wait
        while not _try_lock(handle):
            if time.monotonic() > deadline:
                raise P2VAddonError(f"Another job kept {blend_path} locked for more than {wait:g} s; not saved")
            time.sleep(0.1)
        try:
            yield
        finally:
            _unlock(handle)
    finally:
        handle.close()


def _try_lock(handle) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(handle) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def save_with_results(blend_path: str, opened: tuple, results: list[dict]) -> str:
    """Save the open file to ``blend_path`` with the result strips ``results`` (``OutputStrip.spec()``
    each); return how, for the log. ``opened`` is the file's stamp when this job opened it."""
    with locked(blend_path):
        how = "saved"
        if os.path.exists(blend_path) and file_stamp(blend_path) != opened:
            bpy.ops.wm.open_mainfile(filepath=blend_path, load_ui=False)
            for result in results:
                output_strip.recreate(result)
            strips = "the strip" if len(results) == 1 else f"the {len(results)} strips"
            how = f"reopened (another job had saved it), added {strips} again and saved"
        save_atomically(blend_path)
    return how


def save_atomically(blend_path: str) -> None:
    """Write the open file to ``blend_path`` so that it is the old file or the new one, never neither."""
    folder, name = os.path.split(os.path.abspath(blend_path))
    temp = os.path.join(folder, f".{name}.p2v-{os.getpid()}.blend")
    try:
        result = bpy.ops.wm.save_as_mainfile(filepath=temp, copy=True)
        if "FINISHED" not in result or not os.path.isfile(temp):
            raise P2VAddonError(f"Blender could not write {temp}")
        if os.path.exists(blend_path):
            shutil.copy2(blend_path, blend_path + "1")  # the previous version, as Blender keeps it
        os.replace(temp, blend_path)
    except (OSError, RuntimeError) as exc:
        raise P2VAddonError(f"Cannot save {blend_path} ({exc}); the file is as it was") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
