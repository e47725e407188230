"""A job's frames on disk: written in arrival order by the connection, read by the job's runner.

Spooling to one file per kind (frames, depth) keeps a long clip's upload out of memory, and lets
the runner read frame i as soon as it has arrived while later frames are still coming in.

Each job folder (``p2v-job-*`` in the spool root) names its server in an ``owner`` file (process id
and host name). A server removes its job folders itself, however a job ends; the folders of a
server that was killed (``kill -9``, a crash, a power cut) are removed by the next server that
starts on the same spool root, once their owner is gone. A folder of a live server, of another
host, or without an owner file is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading

from .. import protocol as P
from ..errors import InputError

log = logging.getLogger("p2v.serve")

JOB_PREFIX = "p2v-job-"
OWNER_FILE = "owner"


def write_owner(folder: str) -> None:
    """Record this process as the owner of a job folder (for :func:`sweep_dead_spools`)."""
    with open(os.path.join(folder, OWNER_FILE), "w", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")


def sweep_dead_spools(root: str) -> tuple[int, int]:
    """Remove the job folders in ``root`` whose owner process is gone; return (folders, bytes) removed."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(JOB_PREFIX)]
    except OSError:
        return 0, 0
    host = socket.gethostname()
    removed = size = 0
    for name in names:
        folder = os.path.join(root, name)
        try:
            with open(os.path.join(folder, OWNER_FILE), encoding="utf-8") as handle:
                pid_text, _, owner_host = handle.read().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # being created, an older runtime's, or not ours: leave it
        if owner_host != host or pid == os.getpid() or pid_alive(pid):
            continue
        folder_bytes = _tree_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            removed += 1
            size += folder_bytes
    return removed, size


def _tree_bytes(folder: str) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (of any user). Unsure counts as alive: its folder stays."""
    if pid <= 0:
        return True
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


class Spool:
    """Frames (or depth) of a job in one file on disk, written in order, readable while growing."""

    def __init__(self, path: str, count: int, shape: tuple[int, ...], dtype: str):
        self.path = path
        self.count = count
        self.shape = shape
        self.dtype = dtype
        self.nbytes = P.DTYPE_SIZES[dtype]
        for dim in shape:
            self.nbytes *= dim
        self.writer = open(path, "wb", buffering=0)
        self.reader = open(path, "rb", buffering=0)
        self.read_lock = threading.Lock()
        self.buffer: bytearray | None = None  # receive buffer, made on the first frame

    def receive_buffer(self) -> memoryview:
        if self.buffer is None:
            self.buffer = bytearray(self.nbytes)
        return memoryview(self.buffer)

    def append(self, data: memoryview) -> None:
        written = 0
        while written < len(data):
            written += self.writer.write(data[written:])

    def read(self, index: int) -> bytearray:
        buf = bytearray(self.nbytes)
        view = memoryview(buf)
        with self.read_lock:
            self.reader.seek(index * self.nbytes)
            got = 0
            while got < self.nbytes:
                n = self.reader.readinto(view[got:])
                if not n:
                    raise InputError(f"spooled frame {index} is incomplete in {self.path}")
                got += n
        return buf

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


class SpooledFrames:
    """A job's spool as :class:`protocol.Frames`, what the runner reads; ``read(i)`` waits for frame i.

    ``job`` is the job the frames belong to: it owns the spools and says when frame i has arrived.
    """

    def __init__(self, job, kind: str):
        self._job = job
        self._kind = kind
        self._spool = job.spools[kind]
        self.size = (job.width, job.height)
        what = "frames" if kind == "frame" else "depth maps"
        self.description = f"{job.count} {what} {job.width}x{job.height} from client {job.peer}"

    def __len__(self) -> int:
        return self._job.count

    def read(self, index: int):
        import numpy as np

        if not 0 <= index < self._job.count:
            raise IndexError(f"frame {index} is outside 0..{self._job.count - 1}")
        self._job.wait_for(self._kind, index)
        data = self._spool.read(index)
        return np.frombuffer(data, dtype=np.uint8 if self._spool.dtype == "uint8" else "<f4").reshape(self._spool.shape)
