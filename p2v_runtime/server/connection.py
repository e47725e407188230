"""One client connection: the reader loop that dispatches its messages, and its hang-up.

The reader checks each message before acting on it, spools a job's frames to disk as they arrive
and answers in order through the connection's :class:`Writer`; a job runs on its own thread, so
reading goes on while it edits (to take ``cancel`` and later frames). Errors in what the client
sent end the connection with an ``error`` message the client gets to read.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from .. import __version__
from .. import protocol as P
from ..settings import SettingsError
from .job import CANCEL_WAIT, Job, settings_from_wire
from .writer import Writer

log = logging.getLogger("p2v.serve")

LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 0.5


class Connection:
    """One client: authenticates it, takes its jobs and frames, and hangs up cleanly.

    ``server`` is the :class:`Server` that accepted it: its settings, token and job slot.
    """

    def __init__(self, server, sock: socket.socket, peer: str):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.authed = False
        self.closing = False
        self.job: Job | None = None  # this connection's latest job
        self.upload: Job | None = None  # the job whose frames are still arriving
        self.bytes_in = 0
        sock.settimeout(server.read_timeout)
        self.writer = Writer(sock, self._on_broken)

    def serve(self) -> None:
        try:
            self._loop()
        except P.ProtocolError as exc:
            log.info("%s: %s (%s)", self.peer, exc.message, exc.code)
            self.writer.send(P.error_header(exc.code, exc.message, True))
        except OSError as exc:
            log.info("%s: connection failed: %s", self.peer, exc)
        except Exception as exc:  # a bug here must not take the server down
            log.exception("%s: internal error", self.peer)
            self.writer.send(P.error_header(P.E_INTERNAL, f"internal error in the runtime: {type(exc).__name__}", True))
        finally:
            self._close()

    def _on_broken(self) -> None:
        """Sending failed (peer gone, or not reading for the read timeout): cancel and hang up."""
        job = self.job
        if job is not None and not job.finished.is_set():
            job.cancel.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which then closes
        except OSError:
            pass

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
        if not self.authed:
            limit, why = self.server.read_timeout, "no hello"
        elif self.upload is not None and self.job is self.upload and not self.upload.finished.is_set():
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
        if not self.authed and kind != "hello":
            raise P.ProtocolError(P.E_NOT_AUTHENTICATED, "the first message must be hello with the token")
        if kind in P.PAYLOAD_TYPES:
            self._on_image(header, payload_len)
        else:
            getattr(self, "_on_" + kind)(header)

    def _on_hello(self, header: dict) -> None:
        if header["protocol"] != P.PROTOCOL_VERSION:
            raise P.ProtocolError(
                P.E_VERSION,
                f"client speaks p2v protocol {header['protocol']}, this runtime speaks {P.PROTOCOL_VERSION}",
            )
        if not self.server.check_token(header["token"]):
            log.warning("%s: wrong token", self.peer)
            raise P.ProtocolError(
                P.E_AUTH, "wrong token: use the token the runtime was started with (P2V_TOKEN or --token-file)"
            )
        self.authed = True
        self.writer.send(
            {
                "type": "hello_ok",
                "protocol": P.PROTOCOL_VERSION,
                "server": f"p2v-runtime {__version__}",
                "pid": os.getpid(),
                "busy": self.server.current_job is not None,
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
        if not self.server.check_token(header["token"]):
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
            settings = settings_from_wire(header["settings"])
        except SettingsError as exc:
            self.writer.send(P.error_header(P.E_SETTINGS, str(exc), False))
            return
        except Exception as exc:  # noqa: BLE001 - bad settings of any kind are the client's error
            self.writer.send(P.error_header(P.E_SETTINGS, f"unusable settings: {type(exc).__name__}: {exc}", False))
            return
        self.upload = None
        needed = count * width * height * (3 + (4 if header["depth"] else 0))
        job = self.server._begin_job(self, settings, count, width, height, header["depth"], needed)
        if job is None:
            return
        job.send_depth = bool(header.get("send_depth", False))
        job.preview = bool(header.get("preview", False))
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
        if settings.depth_norm == "frame":
            job.start()  # per-frame depth needs no clip statistics: edit while frames arrive

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
            n = sock.recv_into(scratch)
            if n == 0:
                break
            drained += n
    except OSError:
        pass
    finally:
        sock.close()
