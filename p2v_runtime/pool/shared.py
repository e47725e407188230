"""What the editing actor sees of its job's board: the frames, and the inversions shared with the pool."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import ray

from ..errors import EditCancelled

if TYPE_CHECKING:  # inversion.py imports torch; the server process imports this module and never does
    from ..inversion import InversionCache

POLL = 0.5  # seconds an actor waits on the board before it looks at its cancel flag again


class BoardFrames:
    """The job's frames (or Z-pass depth) as the editor reads them (the ``Frames`` protocol),
    waiting for each one the server has not received yet."""

    def __init__(self, board, kind: str, count: int, size: tuple[int, int], cancel: threading.Event, job: str):
        self.board = board
        self.kind = kind
        self.count = count
        self.size = size
        self.cancel = cancel
        self.description = f"the {kind}s of job {job}"

    def __len__(self) -> int:
        return self.count

    def read(self, index: int) -> np.ndarray:
        if not 0 <= index < self.count:
            raise IndexError(index)
        while True:
            if self.cancel.is_set():
                raise EditCancelled(0)
            box = ray.get(self.board.frame.remote(self.kind, index, POLL))
            if box is not None:
                return ray.get(box[0])


class BoardInversions:
    """``editor.SharedInversions`` on the job's board: this actor's disk cache first, then the
    board (done by another actor, being done: wait, or nobody's yet: invert it here)."""

    def __init__(self, board, worker: str, cancel: threading.Event):
        self.board = board
        self.worker = worker
        self.cancel = cancel
        self.disk: InversionCache | None = None
        self.from_pool = 0  # inversions another actor computed

    def attach(self, disk: InversionCache) -> BoardInversions:
        self.disk = disk
        return self

    def has(self, key: str) -> bool:
        return self.disk.has(key)

    def announce(self, spec, requests: list) -> None:
        ray.get(self.board.announce.remote(spec, requests, self.worker))

    def load(self, key: str) -> np.ndarray | None:
        latent = self.disk.load(key)
        if latent is not None:
            return latent
        while True:
            if self.cancel.is_set():
                raise EditCancelled(0)
            status, latent = ray.get(self.board.take.remote(key, self.worker, POLL))
            if status == "mine":
                return None
            if status == "done":
                self.from_pool += 1
                self.disk.store(key, latent)  # a re-edit on this node finds it on disk
                return latent

    def store(self, key: str, latent: np.ndarray) -> None:
        self.disk.store(key, latent)
        ray.get(self.board.complete.remote(key, latent, self.worker))
