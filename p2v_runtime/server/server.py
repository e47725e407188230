"""The server: listens, accepts connections up to a limit, and holds the one job slot.

Each accepted connection gets its own thread (:class:`Connection`); connections over the limit
are refused with a ``too_many_connections`` error from the accept loop itself, which also ends
the server after its idle timeout.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import logging
import os
import select
import shutil
import socket
import tempfile
import threading
import time

from .. import protocol as P
from ..errors import P2VError
from ..settings import EditSettings
from .connection import LINGER_SECONDS, Connection
from .job import CANCEL_WAIT, Job, JobRunner, edit_job_runner

log = logging.getLogger("p2v.serve")

DEFAULT_READ_TIMEOUT = 30.0  # a peer must make progress within this mid-message (and on hello)
DEFAULT_FRAME_TIMEOUT = 600.0  # longest wait for the next frame of an upload (scene renders are slow)
DEFAULT_MAX_CONNECTIONS = 8
_MAX_REFUSED = 256


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class Server:
    """The runtime server.

    ``job_runner(frames, settings, *, depth, progress, cancel, stats, warn)`` yields
    ``(index, image)`` like ``edit_clip``; ``stats`` is the job's :class:`EditStats` for it to
    fill, ``warn(message)`` sends a ``warning`` to the client. The default is the real edit.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str,
        job_runner: JobRunner | None = None,
        allow_remote: bool = False,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        idle_timeout: float | None = None,
        spool_dir: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        window: int = P.DEFAULT_WINDOW,
    ):
        if not token:
            raise ValueError("the server needs a token")
        self.host = host
        self.port = port
        self.token = token
        self.job_runner = job_runner or edit_job_runner
        self.allow_remote = allow_remote
        self.read_timeout = read_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.spool_dir = spool_dir
        self.max_connections = max_connections
        self.window = window
        self.address: tuple[str, int] | None = None
        self.current_job: Job | None = None
        self._job_lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._connections: dict[Connection, threading.Thread] = {}
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._last_activity = time.monotonic()
        self._job_ids = itertools.count(1)
        self._refused: dict[socket.socket, float] = {}  # refused sockets being drained, with deadlines

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def touch(self) -> None:
        self._last_activity = time.monotonic()

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.token.encode("utf-8"))

    def bind(self) -> tuple[str, int]:
        """Listen; refuse a non-loopback address unless ``allow_remote`` (the token is always set)."""
        if not is_loopback(self.host) and not self.allow_remote:
            raise P2VError(
                f"refusing to listen on {self.host!r}: it is not a loopback address "
                "(pass --allow-remote and a token to serve other machines)"
            )
        family, type_, proto, _, addr = socket.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, type_, proto)
        try:
            if os.name != "nt":
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(addr)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self.address = (host, port)
        return self.address

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`, SIGTERM, ``shutdown`` or the idle timeout."""
        if self._listener is None:
            self.bind()
        listener = self._listener
        log.info("serving on %s:%d", *self.address)
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([listener, *self._refused], [], [], 0.2)
                for sock in readable:
                    if sock is not listener:
                        self._drain_refused(sock)
                        continue
                    try:
                        sock, addr = listener.accept()
                    except OSError:
                        continue
                    self._accept(sock, f"{addr[0]}:{addr[1]}")
                self._expire_refused()
                if (
                    self.idle_timeout
                    and self.current_job is None
                    and time.monotonic() - self._last_activity > self.idle_timeout
                ):
                    log.info("unused for %g s; exiting", self.idle_timeout)
                    self._stop.set()
        finally:
            self._stop.set()
            listener.close()
            for sock in list(self._refused):
                sock.close()
            self._refused.clear()
            self._shutdown_connections()

    def _accept(self, sock: socket.socket, peer: str) -> None:
        P.tune_socket(sock)
        with self._conn_lock:
            full = len(self._connections) >= self.max_connections
        if full:
            log.warning("%s: refused, %d connections open", peer, self.max_connections)
            try:
                sock.setblocking(False)
                sock.send(
                    P.encode_head(
                        P.error_header(
                            P.E_TOO_MANY,
                            f"the runtime already has {self.max_connections} connections open; try again later",
                            True,
                        )
                    )
                )
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                sock.close()
                return
            if len(self._refused) >= _MAX_REFUSED:
                sock.close()
            else:  # read off what the peer sends until it closes, from the accept loop, without waiting
                self._refused[sock] = time.monotonic() + LINGER_SECONDS
            return
        self.touch()
        conn = Connection(self, sock, peer)
        thread = threading.Thread(target=conn.serve, name=f"p2v-conn-{peer}", daemon=True)
        with self._conn_lock:
            self._connections[conn] = thread
        thread.start()

    def _drain_refused(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._refused.pop(sock, None)
        sock.close()

    def _expire_refused(self) -> None:
        now = time.monotonic()
        for sock, deadline in list(self._refused.items()):
            if now >= deadline:
                self._refused.pop(sock, None)
                sock.close()

    def handle_connection(self, sock: socket.socket, peer: str = "test") -> None:
        """Serve one already-connected socket in the calling thread (tests, fuzzing)."""
        conn = Connection(self, sock, peer)
        with self._conn_lock:
            self._connections[conn] = threading.current_thread()
        conn.serve()

    def _connection_closed(self, conn: Connection) -> None:
        with self._conn_lock:
            self._connections.pop(conn, None)
        self.touch()

    def _shutdown_connections(self) -> None:
        job = self.current_job
        if job is not None:
            job.request_cancel()
            job.wait(CANCEL_WAIT)
        deadline = time.monotonic() + 3.0
        with self._conn_lock:
            threads = list(self._connections.items())
        for conn, thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _begin_job(
        self,
        conn: Connection,
        settings: EditSettings,
        count: int,
        width: int,
        height: int,
        has_depth: bool,
        needed_bytes: int,
    ) -> Job | None:
        """Claim the one job slot; None (after telling the client why) when it cannot start."""
        if not self._job_lock.acquire(blocking=False):
            conn.writer.send(
                P.error_header(P.E_BUSY, "the runtime is busy with another job; try again when it finishes", False)
            )
            return None
        try:
            root = self.spool_dir or tempfile.gettempdir()
            os.makedirs(root, exist_ok=True)
            free = shutil.disk_usage(root).free
            if needed_bytes + 64 * 1024 * 1024 > free:
                conn.writer.send(
                    P.error_header(
                        P.E_DISK,
                        f"the job needs {needed_bytes / 1e9:.2f} GB in {root}, only {free / 1e9:.2f} GB are free",
                        False,
                    )
                )
                self._job_lock.release()
                return None
            folder = tempfile.mkdtemp(prefix="p2v-job-", dir=root)
            job = Job(
                self, conn, f"{os.getpid()}-{next(self._job_ids)}", settings, count, width, height, has_depth, folder
            )
        except BaseException:
            self._job_lock.release()
            raise
        self.current_job = job
        return job

    def _end_job(self, job: Job) -> None:
        if self.current_job is job:
            self.current_job = None
            self.touch()
            self._job_lock.release()
