"""A connection's outgoing messages, sent in order from their own thread.

The reader never waits on a client that is slow to take results: it queues and goes back to
reading. Only the job waits, when ``RESULTS_QUEUED`` results are already queued. A client that
reads slowly is served at its pace; one that takes nothing for the read timeout is dropped, and
the log says so (no error message can reach a client that does not read).
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
from collections.abc import Callable

from .. import protocol as P

log = logging.getLogger("p2v.serve")

RESULTS_QUEUED = 2  # result frames waiting in a connection's writer before the job waits


class Writer:
    """Sends one connection's messages from its own thread, in order.

    Small messages queue freely (progress of a stage is coalesced to its latest value); at most
    ``RESULTS_QUEUED`` result frames wait, so memory does not grow when a client reads slowly.
    """

    def __init__(self, sock: socket.socket, on_broken: Callable[[], None], peer: str = "client"):
        self._sock = sock
        self._on_broken = on_broken
        self._peer = peer
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._results_queued = 0
        self._closed = False
        self.broken = False
        self.bytes_out = 0
        self._thread = threading.Thread(target=self._run, name="p2v-writer", daemon=True)
        self._thread.start()

    def use(self, sock) -> None:
        """Send through ``sock`` from now on (the connection's TLS socket, before anything is sent)."""
        self._sock = sock

    def send(self, header: dict, payload=None) -> bool:
        head = P.encode_head(header, 0 if payload is None else len(payload))
        stage = header.get("stage") if header["type"] == "progress" else None
        with self._cond:
            if self._closed or self.broken:
                return False
            if stage is not None and self._items and self._items[-1][2] == stage:
                self._items[-1] = (head, None, stage, False)  # the newer count replaces the older
            else:
                self._items.append((head, payload, stage, payload is not None))
                self._results_queued += payload is not None
            self.bytes_out += len(head) + (0 if payload is None else len(payload))
            self._cond.notify_all()
        return True

    def send_result(self, header: dict, payload, stop: Callable[[], bool]) -> bool:
        """Queue a result once there is room; False when stopped or the connection is gone."""
        with self._cond:
            while self._results_queued >= RESULTS_QUEUED and not (self._closed or self.broken):
                if stop():
                    return False
                self._cond.wait(0.1)
        return self.send(header, payload)

    def close(self, timeout: float) -> None:
        """Send what is queued (for at most ``timeout`` s), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                head, payload, _, is_result = self._items.popleft()
            try:
                if payload is None:
                    P.send_all(self._sock, head)
                elif len(payload) <= 65536:
                    P.send_all(self._sock, head + bytes(payload))
                else:
                    P.send_all(self._sock, head)
                    P.send_all(self._sock, payload)
            except OSError as exc:
                if isinstance(exc, TimeoutError):
                    log.warning(
                        "%s: stopped reading: nothing could be sent for %g s; dropping the connection",
                        self._peer,
                        self._sock.gettimeout() or 0,
                    )
                elif not self._closed:
                    log.info("%s: sending failed: %s", self._peer, exc)
                with self._cond:
                    self.broken = True
                    self._items.clear()
                    self._results_queued = 0
                    self._cond.notify_all()
                self._on_broken()
                return
            finally:
                del payload
            if is_result:
                with self._cond:
                    self._results_queued -= 1
                    self._cond.notify_all()
