"""One job's board: its frames, the inversions it needs and its cancel flag, shared by the pool.

A small asynchronous Ray actor (no CPU reserved) created by the server for each job, so it lives
as long as the job whatever happens to the actors that work on it:

- frames: the server puts each uploaded frame (and Z-pass depth) into Ray's object store and
  gives the board its reference; actors on any node read them from there.
- inversions: the editing actor announces, in its edit order, each inversion it needs; idle actors
  ``claim`` them one at a time; the editing actor ``take``s each one when its turn comes: done (the
  latent), or still pending (it inverts it itself), or being computed elsewhere (it waits). The
  latents stay here until the job ends (64 KiB a frame at 512x512), so an actor that replaces a
  dead one resumes from every inversion already done. They travel in Ray's object store, not in a
  shared folder: nodes need no common file system, and an inversion is small next to its cost.
- cancel: set by the server; the actors look at it between steps.
"""

from __future__ import annotations

import asyncio
from collections import Counter

_PENDING, _CLAIMED, _DONE = "pending", "claimed", "done"


class JobBoard:
    """The board's state; ``pool.py`` makes it a Ray actor (its methods then run on one event loop)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._frames: dict[str, dict[int, list]] = {"frame": {}, "depth": {}}
        self._spec = None
        self._order: list[str] = []  # announced keys, in the edit's order
        self._requests: dict[str, object] = {}
        self._state: dict[str, tuple[str, str | None]] = {}  # key -> (state, worker)
        self._refused: dict[str, set[str]] = {}  # key -> workers that cannot compute it (another model)
        self._latents: dict[str, object] = {}
        self._counts: Counter[str] = Counter()
        self._cancelled = False

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, timeout: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    # frames ------------------------------------------------------------------------------------

    async def add_frame(self, kind: str, index: int, box: list) -> None:
        """``box`` is ``[ObjectRef]``: in a list, so Ray hands the reference over, not the frame."""
        self._frames[kind][index] = box
        await self._notify()

    async def frame(self, kind: str, index: int, timeout: float) -> list | None:
        """The frame's ``[ObjectRef]`` once uploaded; None after ``timeout`` or when cancelled."""
        if index not in self._frames[kind] and not self._cancelled:
            await self._wait(timeout)
        return self._frames[kind].get(index)

    # inversions --------------------------------------------------------------------------------

    async def announce(self, spec, requests: list, worker: str) -> None:
        """The inversions ``worker``'s edit needs, in its order (again after a restart: done ones
        stay done). The first one still pending is ``worker``'s: it needs it now, and it would
        otherwise wait for an idle actor to compute it."""
        self._spec = spec
        for request in requests:
            if request.key not in self._state:
                self._state[request.key] = (_PENDING, None)
                self._order.append(request.key)
            self._requests[request.key] = request
        first = next((r.key for r in requests if self._state[r.key][0] == _PENDING), None)
        if first is not None:
            self._state[first] = (_CLAIMED, worker)
        await self._notify()

    async def claim(self, worker: str):
        """(spec, request, frame box) of the first pending inversion ``worker`` can compute, now its; or None."""
        if self._cancelled:
            return None
        for key in self._order:
            if self._state[key][0] == _PENDING and worker not in self._refused.get(key, ()):
                request = self._requests[key]
                box = self._frames["frame"].get(request.index)
                if box is None:
                    continue
                self._state[key] = (_CLAIMED, worker)
                return self._spec, request, box
        return None

    async def pending(self) -> int:
        return 0 if self._cancelled else sum(1 for state, _ in self._state.values() if state == _PENDING)

    async def take(self, key: str, worker: str, timeout: float):
        """For the editing actor: ("done", latent); ("mine", None) when it must invert the frame
        itself (pending, now its, or never announced); ("wait", None) while another actor is on
        it after ``timeout`` (ask again)."""
        state, owner = self._state.get(key, (None, None))
        if state == _CLAIMED and owner != worker:
            await self._wait(timeout)
            state, owner = self._state.get(key, (None, None))
        if state == _DONE:
            return "done", self._latents[key]
        if state == _CLAIMED and owner != worker:
            return "wait", None
        if state is not None:
            self._state[key] = (_CLAIMED, worker)
        return "mine", None

    async def complete(self, key: str, latent, worker: str) -> None:
        if self._state.get(key, (None,))[0] != _DONE:
            self._state[key] = (_DONE, worker)
            self._latents[key] = latent
            self._counts[worker] += 1
        await self._notify()

    async def refuse(self, key: str, worker: str) -> None:
        """``worker`` cannot compute ``key`` (it has another model or device): back to pending for the others."""
        self._refused.setdefault(key, set()).add(worker)
        if self._state.get(key) == (_CLAIMED, worker):
            self._state[key] = (_PENDING, None)
        await self._notify()

    async def release(self, worker: str) -> None:
        """``worker`` is gone: what it had claimed is pending again (its waiters wake)."""
        for key, (state, owner) in list(self._state.items()):
            if state == _CLAIMED and owner == worker:
                self._state[key] = (_PENDING, None)
        await self._notify()

    async def counts(self) -> dict[str, int]:
        """Inversions computed for this job, by worker."""
        return dict(self._counts)

    # cancel ------------------------------------------------------------------------------------

    async def cancel(self) -> None:
        self._cancelled = True
        await self._notify()

    async def cancelled(self) -> bool:
        return self._cancelled
