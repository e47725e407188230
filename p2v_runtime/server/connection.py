"""One client connection: its hello (TLS first, when the server has it), its reader loop, its hang-up.

A connection starts *waiting*: it holds none of the server's client slots until its hello has
been checked, which must happen within the hello timeout counted from the connection's accept
(TLS handshake included), however the bytes trickle in. Then the reader checks each message
before acting on it, spools a job's frames to disk as they arrive and answers in order through
the connection's :class:`Writer`; a job runs on its own thread, so reading goes on while it
edits (to take ``cancel`` and later frames). Errors in what the client sent end the connection
with an ``error`` message the client gets to read.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time

from .. import __version__
from .. import protocol as P
from ..settings import SettingsError
from .job import CANCEL_WAIT, Job, settings_from_wire
from .writer import Writer

log = logging.getLogger("p2v.serve")

LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 0.5
_POLL = 0.25  # how often a waiting connection looks at the server's stop flag and its own eviction
TLS_RECORD = 0x16  # the first byte of a TLS handshake


class _Quiet(Exception):
    """End the connection without an error message (one could not be read: a failed TLS handshake)."""


class Connection:
    """One client: authenticates it, takes its jobs and frames, and hangs up cleanly.

    ``server`` is the :class:`Server` that accepted it: its settings, token, client slots and
    job slot. ``source`` is what the server counts wrong tokens by (the peer's address); ``local``
    says the peer is on this machine (loopback or the Unix socket), which decides how much a
    failure message may say.
    """

    def __init__(self, server, sock: socket.socket, peer: str, source: str | None = None, local: bool = True):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.source = source or peer
        self.local = local
        self.accepted_at = time.monotonic()
        self.evicted = False  # set by the server to make room for a newer waiting connection
        self.authed = False
        self.closing = False
        self.job: Job | None = None  # this connection's latest job
        self.upload: Job | None = None  # the job whose frames are still arriving
        self.bytes_in = 0
        sock.settimeout(server.read_timeout)
        self.writer = Writer(sock, self._on_broken, peer)

    def serve(self) -> None:
        try:
            if self._authenticate():
                self._loop()
        except P.ProtocolError as exc:
            if exc.code != P.E_AUTH:  # wrong tokens are logged by the server, at most every few seconds
                self._log(exc.code, f"{exc.message} ({exc.code})")
            self.writer.send(P.error_header(exc.code, exc.message, True))
        except _Quiet as exc:
            self._log("quiet", str(exc))
        except OSError as exc:
            self._log("oserror", f"connection failed: {exc}")
        except Exception as exc:  # a bug here must not take the server down
            log.exception("%s: internal error", self.peer)
            self.writer.send(P.error_header(P.E_INTERNAL, f"internal error in the runtime: {type(exc).__name__}", True))
        finally:
            self._close()

    def _log(self, kind: str, message: str) -> None:
        """Log why the connection ends: each time for a client, sparingly for a peer that never said hello."""
        if self.authed:
            log.info("%s: %s", self.peer, message)
        else:
            self.server.log_sparingly(f"{self.source} {kind}", f"{self.peer}: {message}")

    def _on_broken(self) -> None:
        """Sending failed (peer gone, or not reading for the read timeout): cancel and hang up."""
        job = self.job
        if job is not None and not job.finished.is_set():
            log.info("job %s: cancelled: its client %s cannot be sent to", job.id, self.peer)
            job.cancel.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which then closes
        except OSError:
            pass

    # --- before the hello: TLS, the hello itself, within one deadline from the accept ---------------

    def _authenticate(self) -> bool:
        """TLS (if any) and a good hello by the hello deadline; False when the peer just went away."""
        deadline = self.accepted_at + self.server.hello_timeout
        if self.server.tls is not None:
            self._start_tls(deadline)
        head = self._read_hello(deadline)
        if head is None:
            return False
        header, payload_len, head_bytes = head
        self.bytes_in += head_bytes
        kind = header["type"]
        if kind not in P.CLIENT_TYPES:
            raise P.ProtocolError(P.E_UNEXPECTED, f"{kind!r} is a message the runtime sends, not one it accepts")
        if kind != "hello":
            raise P.ProtocolError(P.E_NOT_AUTHENTICATED, "the first message must be hello with the token")
        self._check_version(header)
        while True:
            verdict, wait = self.server.try_token(self.source, header["token"])
            if verdict is not None:
                break
            self._pause(wait, deadline, "too many wrong tokens from this address lately")
        if not verdict:
            raise P.ProtocolError(
                P.E_AUTH, "wrong token: use the token the runtime was started with (P2V_TOKEN or --token-file)"
            )
        if not self.server._admit(self):
            raise P.ProtocolError(
                P.E_TOO_MANY,
                f"the runtime already has {self.server.max_connections} clients connected; try again later",
            )
        self.authed = True
        self.sock.settimeout(self.server.read_timeout)
        self.server.touch()
        self._hello_ok()
        return True

    def _waiting_check(self, deadline: float, why: str) -> float:
        """Raise when a waiting connection must end (stop, eviction, deadline); else the seconds left."""
        if self.server.stopping:
            raise P.ProtocolError(P.E_SHUTTING_DOWN, "the runtime is shutting down")
        if self.evicted:
            raise P.ProtocolError(
                P.E_TOO_MANY,
                "too many connections are waiting to say hello; this one waited longest",
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise P.ProtocolError(
                P.E_TIMEOUT, f"{why} within {self.server.hello_timeout:g} s of connecting; closing the connection"
            )
        return left

    def _pause(self, seconds: float, deadline: float, why: str) -> None:
        """Wait ``seconds`` (within the hello deadline); a peer that hangs up meanwhile gets no try."""
        until = time.monotonic() + seconds
        while True:
            left = min(self._waiting_check(deadline, f"no hello accepted ({why})"), until - time.monotonic())
            if left <= 0:
                return
            if self._peer_closed(min(_POLL, left)):
                raise _Quiet("closed while its address waited after wrong tokens")

    def _peer_closed(self, wait: float) -> bool:
        """Whether the peer closed its end (waits up to ``wait`` to see); unknown counts as open."""
        if isinstance(self.sock, P.TLSSocket):
            time.sleep(wait)
            return False
        if not P.wait_readable(self.sock, wait):
            return False
        self.sock.settimeout(0.01)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            return True

    def _read_hello(self, deadline: float) -> tuple[dict, int, int] | None:
        """The first message's prefix and header, all of it by ``deadline``; None if the peer closed first.

        Read in pieces of what is still missing, never past the header, so a client that sends its
        next messages right behind the hello loses nothing.
        """
        buf = bytearray()
        need, header_len, payload_len = P.PREFIX_SIZE, None, 0
        while True:
            left = self._waiting_check(deadline, "no complete hello")
            self.sock.settimeout(min(_POLL, left))
            try:
                chunk = self.sock.recv(need - len(buf))
            except TimeoutError:
                continue
            if not chunk:
                self._waiting_check(deadline, "no complete hello")
                if not buf:
                    return None
                raise P.ProtocolError(P.E_TRUNCATED, f"connection closed mid-message ({len(buf)} bytes of the hello)")
            buf += chunk
            if header_len is None and len(buf) == P.PREFIX_SIZE:
                header_len, payload_len = P.parse_prefix(bytes(buf))
                need += header_len
            elif header_len is not None and len(buf) == need:
                header = P.parse_header(bytes(buf[P.PREFIX_SIZE :]))
                P.check_payload_length(header, payload_len)
                return header, payload_len, need

    def _start_tls(self, deadline: float) -> None:
        """The TLS handshake, by ``deadline``; a client that does not speak TLS hears why, in plain."""
        first = b""
        while not first:
            left = self._waiting_check(deadline, "no TLS handshake")
            self.sock.settimeout(min(_POLL, left))
            try:
                first = self.sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            if not first:
                raise _Quiet("closed before the TLS handshake")
        if first[0] != TLS_RECORD:
            raise P.ProtocolError(
                P.E_TLS,
                "this runtime speaks TLS: connect with its CA certificate (--tls-ca, or the add-on's "
                "CA certificate preference)",
            )
        try:
            tls = P.TLSSocket.wrap(
                self.sock,
                self.server.tls,
                server_side=True,
                deadline=deadline,
                stop=lambda: self.server.stopping or self.evicted,
            )
        except TimeoutError:
            raise _Quiet(f"no TLS handshake within {self.server.hello_timeout:g} s of connecting") from None
        except (ssl.SSLError, OSError) as exc:
            raise _Quiet(f"TLS handshake failed: {exc}") from None
        self.sock = tls
        self.writer.use(tls)

    # --- an authenticated client ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self.closing:
            if not self._wait_for_message():
                return
            head = P.read_head(self.sock)
            if head is None:
                return  # the client closed the connection
            header, payload_len, head_bytes = head
            self.bytes_in += head_bytes
            self.server.touch()
            self._dispatch(header, payload_len)

    def _wait_for_message(self) -> bool:
        """Wait for the next message's first byte; False when the server is stopping."""
        if self.upload is not None and self.job is self.upload and not self.upload.finished.is_set():
            limit, why = self.server.frame_timeout, "no frame"
        else:
            limit, why = None, ""
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            if self.server.stopping:
                job = self.job
                if job is not None and not job.finished.is_set():
                    job.request_cancel()  # the client hears "cancelled" before "shutting_down"
                    job.wait(CANCEL_WAIT)
                self.writer.send(P.error_header(P.E_SHUTTING_DOWN, "the runtime is shutting down", True))
                return False
            slice_s = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            if P.wait_readable(self.sock, slice_s):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                raise P.ProtocolError(P.E_TIMEOUT, f"{why} within {limit:g} s; closing the connection")

    def _dispatch(self, header: dict, payload_len: int) -> None:
        kind = header["type"]
        if kind not in P.CLIENT_TYPES:
            raise P.ProtocolError(P.E_UNEXPECTED, f"{kind!r} is a message the runtime sends, not one it accepts")
        if kind in P.PAYLOAD_TYPES:
            self._on_image(header, payload_len)
        else:
            getattr(self, "_on_" + kind)(header)

    def _check_version(self, header: dict) -> None:
        if header["protocol"] != P.PROTOCOL_VERSION:
            raise P.ProtocolError(
                P.E_VERSION,
                f"client speaks p2v protocol {header['protocol']}, this runtime speaks {P.PROTOCOL_VERSION}",
            )

    def _on_hello(self, header: dict) -> None:
        """A hello again on an authenticated connection: checked like the first (no waiting)."""
        self._check_version(header)
        verdict, _ = self.server.try_token(self.source, header["token"])
        if not verdict:
            raise P.ProtocolError(
                P.E_AUTH, "wrong token: use the token the runtime was started with (P2V_TOKEN or --token-file)"
            )
        self._hello_ok()

    def _hello_ok(self) -> None:
        self.writer.send(
            {
                "type": "hello_ok",
                "protocol": P.PROTOCOL_VERSION,
                "server": f"p2v-runtime {__version__}",
                "pid": os.getpid(),
                "busy": self.server.busy,
                "limits": {
                    "max_header_bytes": P.MAX_HEADER_BYTES,
                    "max_payload_bytes": P.MAX_PAYLOAD_BYTES,
                    "max_frame_side": P.MAX_FRAME_SIDE,
                    "max_frame_pixels": P.MAX_FRAME_PIXELS,
                    "max_frames": P.MAX_FRAMES,
                    "window": self.server.window,
                },
            }
        )

    def _on_ping(self, header: dict) -> None:
        reply = {"type": "pong"}
        if "t" in header:
            reply["t"] = header["t"]
        self.writer.send(reply)

    def _on_shutdown(self, header: dict) -> None:
        verdict, _ = self.server.try_token(self.source, header["token"])
        if not verdict:
            raise P.ProtocolError(P.E_AUTH, "wrong token for shutdown")
        log.info("%s asked the runtime to shut down", self.peer)
        self.writer.send({"type": "bye"})
        self.closing = True
        self.server.stop()

    def _on_cancel(self, header: dict) -> None:
        # The upload stays open: frames of the cancelled job still in flight are read and dropped.
        job = self.job
        if job is not None and not job.finished.is_set():
            log.info("job %s: cancel requested", job.id)
            job.request_cancel()

    def _on_job(self, header: dict) -> None:
        if self.job is not None and not self.job.finished.is_set():
            self.writer.send(
                P.error_header(
                    P.E_BUSY,
                    "this connection's previous job is still running; wait for its done, cancelled or error",
                    False,
                )
            )
            return
        count, width, height = header["frames"], header["width"], header["height"]
        if not 1 <= count <= P.MAX_FRAMES:
            raise P.ProtocolError(P.E_LIMIT, f"a job has 1..{P.MAX_FRAMES} frames, got {count}")
        P.check_frame_size(width, height)
        try:
            settings = self.server.paths.apply(settings_from_wire(header["settings"]))
        except SettingsError as exc:
            log.info("%s: job refused: %s", self.peer, exc)
            self.writer.send(P.error_header(P.E_SETTINGS, str(exc), False))
            return
        except Exception as exc:  # noqa: BLE001 - bad settings of any kind are the client's error
            log.warning("%s: job refused: unusable settings: %s: %s", self.peer, type(exc).__name__, exc)
            detail = f": {exc}" if self.local else ""
            self.writer.send(P.error_header(P.E_SETTINGS, f"unusable settings: {type(exc).__name__}{detail}", False))
            return
        self.upload = None
        needed = count * width * height * (3 + (4 if header["depth"] else 0))
        job = self.server._begin_job(self, settings, count, width, height, header["depth"], needed)
        if job is None:
            return
        job.send_depth = bool(header.get("send_depth", False))
        job.preview = bool(header.get("preview", False))
        job.queue_updates = bool(header.get("queue", False))
        self.job = self.upload = job
        log.info(
            "job %s from %s: %d frame(s) %dx%d%s",
            job.id,
            self.peer,
            count,
            width,
            height,
            " with depth" if job.has_depth else "",
        )
        self.writer.send({"type": "job_ok", "job": job.id, "frames": count, "window": self.server.window})
        if settings.depth_norm == "frame" or self.server.pool is not None:
            # Per-frame depth needs no clip statistics: edit while frames arrive. A pool's job
            # takes its place in the queue now (its frames go to the actors as they arrive).
            job.start()

    def _on_image(self, header: dict, payload_len: int) -> None:
        kind, index = header["type"], header["index"]
        job = self.upload
        if job is None:
            raise P.ProtocolError(P.E_ORDER, f"{kind} {index} arrived outside a job's upload")
        expected = job.next_expected()
        if expected is None:
            raise P.ProtocolError(P.E_ORDER, f"{kind} {index} arrived after all {job.count} frames of the job")
        if (kind, index) != expected:
            raise P.ProtocolError(P.E_ORDER, f"expected {expected[0]} {expected[1]}, got {kind} {index}")
        spool = job.spools[kind]
        if tuple(header["shape"]) != spool.shape:
            raise P.ProtocolError(
                P.E_BAD_SHAPE, f"{kind} {index} has shape {header['shape']}, the job's frames are {list(spool.shape)}"
            )
        view = spool.receive_buffer()
        P.recv_exact_into(self.sock, view)
        self.bytes_in += payload_len
        job.store(kind, view)
        if (kind == "depth" or not job.has_depth) and not job.finished.is_set():
            self.writer.send({"type": "received", "index": index})
        if job.upload_complete():
            self.upload = None
            job.start()

    def _close(self) -> None:
        job = self.job
        if job is not None:
            if not job.finished.is_set():
                log.info("job %s: client %s went away; cancelling", job.id, self.peer)
                job.request_cancel()
            job.wait(CANCEL_WAIT)
        self.writer.close(timeout=2.0)
        _lingering_close(self.sock)
        self.server._connection_closed(self)


def _lingering_close(sock: socket.socket) -> None:
    """Half-close, then read off what the peer still sends (bounded), so it sees our last message.

    Closing with unread input makes the kernel answer with a reset, which can destroy the error
    message we just sent before the peer reads it.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        scratch = bytearray(65536)
        drained = 0
        while drained < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0 or not P.wait_readable(sock, left):
                break
            sock.settimeout(left)  # a TLS record may be readable only in part
            n = sock.recv_into(scratch)
            if n == 0:
                break
            drained += n
    except OSError:
        pass
    finally:
        sock.close()
