"""A job's frames on disk: written in arrival order by the connection, read by the job's runner.

Spooling to one file per kind (frames, depth) keeps a long clip's upload out of memory, and lets
the runner read frame i as soon as it has arrived while later frames are still coming in.
"""

from __future__ import annotations

import threading

from .. import protocol as P
from ..errors import InputError


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
