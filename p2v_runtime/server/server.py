"""The server: listens, accepts connections, keeps the client slots and the one job slot.

Each accepted connection gets its own thread (:class:`Connection`). A connection first *waits*:
it must finish its hello (and TLS handshake) within the hello timeout of its accept, and holds no
client slot until its token is good. Waiting connections have a cap of their own; when it is
full, the newest connection takes the place of the oldest waiting one from the address with the
most waiting (so a flood of silent sockets costs a real client one hello round trip, not its
turn). Authenticated clients have ``max_connections`` slots; a good hello when they are all
taken is answered ``too_many_connections``. Wrong tokens make their source address wait before
its next try, longer after each (up to ``auth_backoff`` seconds), and are logged at most every
few seconds per address. Only authenticated clients' messages and jobs count as activity for the
idle timeout. The accept loop also refuses connections beyond a hard cap of threads, and ends the
server after its idle timeout.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import itertools
import logging
import os
import select
import shutil
import socket
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time

from .. import protocol as P
from ..errors import P2VError
from ..settings import EditSettings
from .connection import LINGER_SECONDS, Connection
from .job import CANCEL_WAIT, Job, JobRunner, edit_job_runner
from .paths import PathRules
from .spool import JOB_PREFIX, sweep_dead_spools, write_owner

log = logging.getLogger("p2v.serve")

DEFAULT_READ_TIMEOUT = 30.0  # a peer must make progress within this mid-message (and when taking results)
DEFAULT_HELLO_TIMEOUT = 10.0  # TLS handshake and the whole hello, from the accept
DEFAULT_FRAME_TIMEOUT = 600.0  # longest wait for the next frame of an upload (scene renders are slow)
DEFAULT_MAX_CONNECTIONS = 8  # authenticated clients at once
DEFAULT_MAX_WAITING = 16  # connections that have not yet said a good hello
DEFAULT_AUTH_BACKOFF = 5.0  # longest wait imposed on an address after wrong tokens
AUTH_BACKOFF_FIRST = 0.1  # the wait after one wrong token; it doubles with each further one
AUTH_FORGET = 600.0  # an address's wrong tokens are forgotten after this long without one
AUTH_LOG_EVERY = 10.0  # at most one log line per address in this many seconds
_MAX_SOURCES = 4096  # addresses whose wrong tokens are remembered
_MAX_REFUSED = 256
UNIX_PREFIX = "unix:"


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


def unix_sockets_available() -> bool:
    """Whether ``--unix`` works here (Linux, macOS and other POSIX systems; not Windows)."""
    return hasattr(socket, "AF_UNIX") and os.name != "nt"


@dataclasses.dataclass
class _Failures:
    """Wrong tokens from one source address."""

    count: int = 0
    last: float = 0.0
    next_try: float = 0.0
    logged_at: float | None = None
    unlogged: int = 0


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
        hello_timeout: float | None = None,
        max_waiting: int = DEFAULT_MAX_WAITING,
        auth_backoff: float = DEFAULT_AUTH_BACKOFF,
        tls: ssl.SSLContext | None = None,
        unix_path: str | None = None,
        paths: PathRules | None = None,
        pool=None,
    ):
        if not token:
            raise ValueError("the server needs a token")
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the token is not UTF-8 text") from None
        self.host = host
        self.port = port
        self.token = token
        # With a pool (p2v serve --ray) jobs run on its actors: as many as clients may wait in its
        # queue, each started at once (its frames go to the actors as they arrive).
        self.pool = pool
        self.job_runner = pool.job_runner if pool is not None else job_runner or edit_job_runner
        self.max_jobs = max_connections if pool is not None else 1
        self.allow_remote = allow_remote
        self.read_timeout = read_timeout
        self.hello_timeout = min(DEFAULT_HELLO_TIMEOUT, read_timeout) if hello_timeout is None else hello_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.spool_dir = spool_dir
        self.max_connections = max_connections
        self.max_waiting = max(1, max_waiting)
        self.auth_backoff = auth_backoff
        self.tls = tls
        self.unix_path = unix_path
        self.remote = unix_path is None and not is_loopback(host)
        self.paths = paths or PathRules.for_server(remote=self.remote)
        self.window = window
        self.address: tuple[str, int] | None = None
        self.jobs: list[Job] = []
        self._jobs_lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._connections: dict[Connection, threading.Thread] = {}  # waiting and authenticated
        self._clients: set[Connection] = set()  # authenticated: the slots max_connections counts
        self._auth_lock = threading.Lock()
        self._failures: dict[str, _Failures] = {}
        self._log_marks: dict[str, tuple[float, int]] = {}  # log_sparingly: key -> (last logged, skipped)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._unix_inode: int | None = None
        self._last_activity = time.monotonic()
        self._job_ids = itertools.count(1)
        self._refused: dict[socket.socket, float] = {}  # refused sockets being drained, with deadlines

    @property
    def current_job(self) -> Job | None:
        """The running job (the oldest one, on a pool), or None."""
        return next((job for job in list(self.jobs) if job is not None), None)

    @property
    def busy(self) -> bool:
        """Whether a job sent now would not start at once."""
        if self.pool is not None:
            return self.pool.would_wait()
        return bool(self.jobs)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def touch(self) -> None:
        self._last_activity = time.monotonic()

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.token.encode("utf-8"))

    def try_token(self, source: str, token: str) -> tuple[bool | None, float]:
        """(whether ``token`` is right, 0) or, while ``source`` must still wait after wrong tokens, (None, seconds).

        Checked under one lock, so parallel connections from one address get one try per wait.
        """
        with self._auth_lock:
            now = time.monotonic()
            state = self._failures.get(source)
            if state is not None and now - state.last > AUTH_FORGET:
                del self._failures[source]
                state = None
            if state is not None and now < state.next_try:
                return None, state.next_try - now
            if self.check_token(token):
                return True, 0.0
            if state is None:
                if len(self._failures) >= _MAX_SOURCES:
                    del self._failures[min(self._failures, key=lambda k: self._failures[k].last)]
                state = self._failures[source] = _Failures()
            state.count += 1
            state.last = now
            if self.auth_backoff > 0:
                state.next_try = now + min(AUTH_BACKOFF_FIRST * 2 ** min(state.count - 1, 30), self.auth_backoff)
            self._log_wrong_token(source, state, now)
            return False, 0.0

    def log_sparingly(self, key: str, message: str) -> None:
        """Log ``message`` at most once every few seconds per ``key``, counting the ones left out."""
        with self._auth_lock:
            now = time.monotonic()
            last, skipped = self._log_marks.get(key, (None, 0))
            if last is not None and now - last < AUTH_LOG_EVERY:
                self._log_marks[key] = (last, skipped + 1)
                return
            if len(self._log_marks) >= _MAX_SOURCES:
                self._log_marks.clear()
            self._log_marks[key] = (now, 0)
        if skipped:
            message += f" (and {skipped} more like it in the last {now - last:.0f} s)"
        log.info("%s", message)

    @staticmethod
    def _log_wrong_token(source: str, state: _Failures, now: float) -> None:
        if state.logged_at is not None and now - state.logged_at < AUTH_LOG_EVERY:
            state.unlogged += 1
            return
        wait = max(0.0, state.next_try - now)
        if state.logged_at is None:
            log.warning("wrong token from %s", source)
        else:
            log.warning(
                "wrong token from %s: %d in the last %.0f s, %d in a row; its next try waits %.1f s",
                source,
                state.unlogged + 1,
                now - state.logged_at,
                state.count,
                wait,
            )
        state.logged_at = now
        state.unlogged = 0

    def bind(self) -> tuple[str, int]:
        """Listen; refuse a non-loopback address unless ``allow_remote`` (the token is always set).

        With ``unix_path``, listen on that Unix socket instead (mode 0600), and return (path, 0).
        """
        if self.unix_path is not None:
            return self._bind_unix(self.unix_path)
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
        self._sweep_spools()
        return self.address

    def _bind_unix(self, path: str) -> tuple[str, int]:
        """A Unix socket at ``path``, readable and writable by this user only.

        An existing ``path`` is replaced only when it is a socket nobody listens on (left by a
        runtime that was killed); anything else there is an error.
        """
        if not unix_sockets_available():
            raise P2VError("Unix sockets are not available on this system: use --host and --port")
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        if info is not None:
            if not stat.S_ISSOCK(info.st_mode):
                raise P2VError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(2.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale: its runtime is gone
            except OSError as exc:
                raise P2VError(f"cannot tell whether a runtime listens on {path}: {exc.strerror or exc}") from None
            else:
                raise P2VError(f"another process listens on {path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)  # the socket is made 0600 from its first moment
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(64)
            self._unix_inode = os.stat(path).st_ino
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(mask)
        self._listener = listener
        self.address = (path, 0)
        self._sweep_spools()
        return self.address

    @property
    def where(self) -> str:
        """Where clients connect: ``host:port`` or ``unix:PATH``."""
        if self.address is None:
            return "(not listening)"
        if self.unix_path is not None:
            return UNIX_PREFIX + self.address[0]
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`, SIGTERM, ``shutdown`` or the idle timeout."""
        if self._listener is None:
            self.bind()
        listener = self._listener
        log.info("serving on %s%s", self.where, " (TLS)" if self.tls is not None else "")
        log.info("%s", self.paths.describe())
        if self.remote and self.tls is None:
            log.warning("serving other machines without TLS: the token and frames cross the network in clear")
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
                    self._accept(sock, addr)
                self._expire_refused()
                if self.idle_timeout and not self.jobs and time.monotonic() - self._last_activity > self.idle_timeout:
                    log.info("unused for %g s; exiting", self.idle_timeout)
                    self._stop.set()
        finally:
            self._stop.set()
            listener.close()
            self._remove_unix_socket()
            for sock in list(self._refused):
                sock.close()
            self._refused.clear()
            self._shutdown_connections()

    def _remove_unix_socket(self) -> None:
        if self.unix_path is None or self._unix_inode is None:
            return
        try:
            if os.stat(self.unix_path).st_ino == self._unix_inode:  # still ours, not a successor's
                os.unlink(self.unix_path)
        except OSError:
            pass

    def _sweep_spools(self) -> None:
        """At start: remove the job folders that killed runtimes left in the spool root."""
        root = self.spool_dir or tempfile.gettempdir()
        removed, size = sweep_dead_spools(root)
        if removed:
            log.info(
                "removed %d job folder(s) (%s) of runtimes that are gone from %s",
                removed,
                f"{size / 1e6:.1f} MB",
                root,
            )

    def _peer_of(self, sock: socket.socket, addr) -> tuple[str, str, bool]:
        """(peer for the log, source address wrong tokens are counted by, whether it is on this machine)."""
        if self.unix_path is not None:
            peer = "unix"
            if sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED"):
                try:
                    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    pid, uid, _ = struct.unpack("3i", creds)
                    peer = f"unix(pid {pid}, uid {uid})"
                except OSError:
                    pass
            return peer, "unix", True
        host, port = addr[0], addr[1]
        try:
            local = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            local = False
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host, local

    def _accept(self, sock: socket.socket, addr) -> None:
        P.tune_socket(sock)
        peer, source, local = self._peer_of(sock, addr)
        with self._conn_lock:
            full = len(self._connections) >= self.max_connections + 2 * self.max_waiting
        if full:  # threads still ending (evicted, lingering): refuse from here, without a thread
            log.warning("%s: refused, %d connections open", peer, len(self._connections))
            self._refuse(sock, "the runtime has too many connections open; try again later")
            return
        conn = Connection(self, sock, peer, source, local)
        thread = threading.Thread(target=conn.serve, name=f"p2v-conn-{peer}", daemon=True)
        with self._conn_lock:
            waiting = [c for c in self._connections if c not in self._clients and not c.evicted]
            if len(waiting) >= self.max_waiting:
                victim = self._longest_waiting(waiting)
                victim.evicted = True
                self.log_sparingly(
                    f"{victim.source} evicted",
                    f"{victim.peer}: closed to make room: {len(waiting)} connections waiting to say hello",
                )
            self._connections[conn] = thread
        thread.start()

    @staticmethod
    def _longest_waiting(waiting: list[Connection]) -> Connection:
        """The oldest waiting connection of the source address with the most waiting ones."""
        counts: dict[str, int] = {}
        for conn in waiting:
            counts[conn.source] = counts.get(conn.source, 0) + 1
        return min(waiting, key=lambda c: (-counts[c.source], c.accepted_at))

    def _admit(self, conn: Connection) -> bool:
        """Give an authenticated connection a client slot; False when all are taken."""
        with self._conn_lock:
            if len(self._clients) >= self.max_connections:
                log.warning("%s: refused, %d clients connected", conn.peer, self.max_connections)
                return False
            self._clients.add(conn)
            return True

    def _refuse(self, sock: socket.socket, message: str) -> None:
        try:
            sock.setblocking(False)
            sock.send(P.encode_head(P.error_header(P.E_TOO_MANY, message, True)))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self._refused) >= _MAX_REFUSED:
            sock.close()
        else:  # read off what the peer sends until it closes, from the accept loop, without waiting
            self._refused[sock] = time.monotonic() + LINGER_SECONDS

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

    def handle_connection(self, sock: socket.socket, peer: str = "test", *, local: bool = True) -> None:
        """Serve one already-connected socket in the calling thread (tests, fuzzing).

        ``local``: treat the peer as on this machine (loopback) or, False, as on another one.
        """
        conn = Connection(self, sock, peer, peer, local)
        with self._conn_lock:
            self._connections[conn] = threading.current_thread()
        conn.serve()

    def _connection_closed(self, conn: Connection) -> None:
        with self._conn_lock:
            self._connections.pop(conn, None)
            self._clients.discard(conn)
        if conn.authed:
            self.touch()

    def _shutdown_connections(self) -> None:
        jobs = [job for job in list(self.jobs) if job is not None]
        for job in jobs:
            job.request_cancel()
        deadline = time.monotonic() + CANCEL_WAIT
        for job in jobs:
            job.wait(max(0.0, deadline - time.monotonic()))
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
        """Claim a job slot (the one, or a place in the pool's queue); None (after telling the client
        why) when it cannot start."""
        with self._jobs_lock:
            if len(self.jobs) >= self.max_jobs:
                busy = (
                    f"the runtime's queue is full ({self.max_jobs} jobs); try again when one finishes"
                    if self.pool is not None
                    else "the runtime is busy with another job; try again when it finishes"
                )
                conn.writer.send(P.error_header(P.E_BUSY, busy, False))
                return None
            self.jobs.append(None)  # the place, taken while the job folder is made
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
                self._free_place(None)
                return None
            folder = tempfile.mkdtemp(prefix=JOB_PREFIX, dir=root)
            try:
                write_owner(folder)  # so a later server can remove it if this one is killed
                job_id = f"{os.getpid()}-{next(self._job_ids)}"
                job = Job(self, conn, job_id, settings, count, width, height, has_depth, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        except BaseException:
            self._free_place(None)
            raise
        with self._jobs_lock:
            self.jobs[self.jobs.index(None)] = job
        return job

    def _free_place(self, job: Job | None) -> None:
        with self._jobs_lock:
            if job in self.jobs:
                self.jobs.remove(job)

    def _end_job(self, job: Job) -> None:
        if job in self.jobs:
            self._free_place(job)
            self.touch()
