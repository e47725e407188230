"""``p2v serve``: the sidecar runtime the Blender add-on talks to over one TCP connection.

One job at a time; the models stay warm in this process between jobs and clients (the editor's
model cache owns them). Each connection has a reader (this module's ``_Connection``, which also
spools frames to disk as they arrive) and a writer thread, so reading is never held up by a
client that is slow to take results; the job itself runs on a third thread. The wire format is
``protocol.py``; ``docs/protocol.md`` describes the whole exchange.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from . import __version__
from . import protocol as P
from .errors import EditCancelled, GpuOutOfMemory, InputError, ModelLoadError, P2VError
from .settings import EditSettings, SettingsError

log = logging.getLogger("p2v.serve")

DEFAULT_READ_TIMEOUT = 30.0  # a peer must make progress within this mid-message (and on hello)
DEFAULT_FRAME_TIMEOUT = 600.0  # longest wait for the next frame of an upload (scene renders are slow)
DEFAULT_MAX_CONNECTIONS = 8
RESULTS_QUEUED = 2  # result frames waiting in a connection's writer before the job waits
CANCEL_WAIT = 60.0  # longest wait for a job to notice its cancel flag on disconnect or shutdown
_LINGER_BYTES = 4 * 1024 * 1024
_LINGER_SECONDS = 0.5
_MAX_REFUSED = 256

JobRunner = Callable[..., Iterator[tuple[int, Any]]]


# --- job runners -------------------------------------------------------------------------------


def edit_job_runner(frames, settings, *, depth=None, progress=None, cancel=None, stats=None, warn=None):
    """The real edit: ``editor.edit_clip``, imported on first use so the server starts fast."""
    from .editor import EditStats, edit_clip

    edit_stats = EditStats()
    try:
        yield from edit_clip(frames, settings, depth=depth, progress=progress, cancel=cancel, stats=edit_stats,
                             warn=warn)
    finally:
        if stats is not None:
            stats.update(edit_stats.to_dict())
        _free_device_memory()


def _free_device_memory() -> None:
    """Give the job's activations and feature cache back to the GPU (the weights stay warm)."""
    import gc
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def echo_job_runner(frames, settings, *, depth=None, progress=None, cancel=None, stats=None, warn=None):
    """Each frame back unchanged, after ``extra["echo_steps"]`` "steps" of ``extra["echo_delay"]`` s.

    No model: tests and ``scripts/bench_protocol.py`` use it to exercise the wire, cancel and
    backpressure. ``extra["echo_fail_at"] = k`` raises ``InputError`` instead of frame k;
    ``extra["echo_warn"]`` is sent as a warning first.
    """
    extra = getattr(settings, "extra", None) or {}  # (the echo parameters move off the wire next)
    delay = min(max(_number(extra.get("echo_delay"), 0.0), 0.0), 1.0)
    steps = int(min(max(_number(extra.get("echo_steps"), 1), 1), 1000))
    fail_at = extra.get("echo_fail_at")
    if warn is not None and isinstance(extra.get("echo_warn"), str):
        warn(extra["echo_warn"])
    count = len(frames)
    started = time.monotonic()
    for index in range(count):
        image = frames.read(index)
        if depth is not None:
            depth.read(index)
        if fail_at == index:
            raise InputError(f"echo job told to fail at frame {index}")
        for step in range(steps):
            if cancel is not None and cancel.is_set():
                raise EditCancelled(index)
            if delay:
                time.sleep(delay)
            if progress is not None:
                progress("edit", index * steps + step + 1, count * steps)
        yield index, image
    if stats is not None:
        stats.update(frames=count, model_load_seconds=0.0, edit_seconds=time.monotonic() - started)


def _number(value, default):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else default


JOB_RUNNERS = {"edit": edit_job_runner, "echo": echo_job_runner}


# --- outgoing messages -------------------------------------------------------------------------


class _Writer:
    """Sends one connection's messages from its own thread, in order.

    Small messages queue freely (progress of a stage is coalesced to its latest value); at most
    ``RESULTS_QUEUED`` result frames wait, so memory does not grow when a client reads slowly.
    """

    def __init__(self, sock: socket.socket, on_broken: Callable[[], None]):
        self._sock = sock
        self._on_broken = on_broken
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._results_queued = 0
        self._closed = False
        self.broken = False
        self.bytes_out = 0
        self._thread = threading.Thread(target=self._run, name="p2v-writer", daemon=True)
        self._thread.start()

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
                    self._sock.sendall(head)
                elif len(payload) <= 65536:
                    self._sock.sendall(head + bytes(payload))
                else:
                    self._sock.sendall(head)
                    P.send_all(self._sock, payload)
            except OSError:
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


# --- one job -----------------------------------------------------------------------------------


class _Spool:
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
    """What the editor reads: ``len``, ``.size``, ``.description``, ``.read(i)`` (waits for frame i)."""

    def __init__(self, job: "_Job", kind: str):
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


class _Job:
    def __init__(self, server: "Server", conn: "_Connection", job_id: str, settings: EditSettings,
                 count: int, width: int, height: int, has_depth: bool, folder: str):
        self.server = server
        self.conn = conn
        self.id = job_id
        self.settings = settings
        self.count = count
        self.width = width
        self.height = height
        self.has_depth = has_depth
        self.folder = folder
        self.peer = conn.peer
        self.cancel = threading.Event()
        self.finished = threading.Event()  # no more editing; the spool is gone
        self.ended = threading.Event()  # finished, the job slot is free and the last message queued
        self.cond = threading.Condition()
        self.received = {"frame": 0, "depth": 0}
        self.results_sent = 0
        self.spools = {"frame": _Spool(os.path.join(folder, "frames.rgb"), count, (height, width, 3), "uint8")}
        if has_depth:
            self.spools["depth"] = _Spool(os.path.join(folder, "depth.f32"), count, (height, width), "float32")
        self.thread: threading.Thread | None = None
        self.started = time.monotonic()
        self.bytes_in_start = conn.bytes_in
        self.bytes_out_start = conn.writer.bytes_out
        self._finish_lock = threading.Lock()

    # upload side (the connection's reader thread)

    def next_expected(self) -> tuple[str, int] | None:
        frames, depths = self.received["frame"], self.received["depth"]
        if frames >= self.count and (not self.has_depth or depths >= self.count):
            return None
        if self.has_depth and depths < frames:
            return "depth", depths
        return "frame", frames

    def store(self, kind: str, data: memoryview) -> None:
        with self.cond:
            if not self.finished.is_set():
                self.spools[kind].append(data)
            self.received[kind] += 1
            self.cond.notify_all()

    def upload_complete(self) -> bool:
        return self.next_expected() is None

    # editor side

    def wait_for(self, kind: str, index: int) -> None:
        with self.cond:
            while self.received[kind] <= index:
                if self.cancel.is_set() or self.finished.is_set():
                    raise EditCancelled(self.results_sent)
                self.cond.wait(0.25)

    def start(self) -> None:
        if self.thread is None and not self.finished.is_set():
            self.thread = threading.Thread(target=self._run, name=f"p2v-job-{self.id}", daemon=True)
            self.thread.start()

    def request_cancel(self) -> None:
        self.cancel.set()
        with self.cond:
            self.cond.notify_all()
        if self.thread is None:
            self.finish({"type": "cancelled", "frames_done": self.results_sent})

    def wait(self, timeout: float) -> bool:
        return self.ended.wait(timeout)

    def _progress(self, stage, done, total) -> None:
        try:
            header = {"type": "progress", "stage": str(stage)[:64], "done": int(done), "total": int(total)}
        except (TypeError, ValueError):
            return
        self.conn.writer.send(header)

    def _warn(self, message) -> None:
        self.conn.writer.send({"type": "warning", "message": P.one_line(str(message))})

    def _run(self) -> None:
        final: dict | None = None
        stats: dict[str, Any] = {}
        iterator = None
        try:
            frames = SpooledFrames(self, "frame")
            depth = SpooledFrames(self, "depth") if self.has_depth else None
            iterator = self.server.job_runner(frames, self.settings, depth=depth, progress=self._progress,
                                              cancel=self.cancel, stats=stats, warn=self._warn)
            for index, image in iterator:
                if self.cancel.is_set():
                    raise EditCancelled(self.results_sent)
                if index != self.results_sent:
                    raise RuntimeError(f"the editor yielded frame {index} where {self.results_sent} was due")
                payload = _image_payload(image, self.width, self.height)
                header = P.frame_header("result", index, self.width, self.height)
                if not self.conn.writer.send_result(header, payload, self.cancel.is_set):
                    raise EditCancelled(self.results_sent)
                self.results_sent += 1
            final = {"type": "done", "frames": self.results_sent, "stats": self._stats(stats)}
        except EditCancelled:
            final = {"type": "cancelled", "frames_done": self.results_sent}
        except P2VError as exc:
            final = P.error_header(_error_code(exc), str(exc), False)
        except ImportError as exc:
            log.exception("job %s: the editor could not be imported", self.id)
            final = P.error_header(P.E_INTERNAL, f"the runtime's editor is not available: {exc}", False)
        except MemoryError:
            final = P.error_header(P.E_INTERNAL, "the runtime ran out of memory", False)
        except Exception as exc:  # never let a job take the server down
            log.exception("job %s failed", self.id)
            final = P.error_header(P.E_INTERNAL, f"internal error in the runtime: {type(exc).__name__}: {exc}", False)
        finally:
            if iterator is not None and hasattr(iterator, "close"):
                try:
                    iterator.close()
                except Exception:
                    log.exception("job %s: closing the editor failed", self.id)
            self.finish(final)

    def _stats(self, stats: dict) -> dict:
        out = _json_safe(stats)
        if not isinstance(out, dict):
            out = {}
        out.setdefault("model_load_seconds", 0.0)
        out["frames"] = self.results_sent
        out["bytes_in"] = self.conn.bytes_in - self.bytes_in_start
        out["bytes_out"] = self.conn.writer.bytes_out - self.bytes_out_start
        out["seconds"] = round(time.monotonic() - self.started, 6)
        return out

    def finish(self, final: dict | None) -> None:
        """Clean up once, free the server for the next job, then send the job's last message."""
        with self._finish_lock:
            if self.finished.is_set():
                return
            with self.cond:
                self.finished.set()
                self.cond.notify_all()
                for spool in self.spools.values():
                    spool.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            self.server._end_job(self)
            if final is not None:
                self.conn.writer.send(final)
            self.ended.set()
        log.info("job %s ended: %s", self.id, final["type"] if final else "no message")


def _image_payload(image, width: int, height: int) -> memoryview:
    view = memoryview(image)
    expected = (height, width, 3)
    if view.format not in ("B", "b", "c") or view.nbytes != width * height * 3 or (
        view.ndim == 3 and tuple(view.shape) != expected
    ):
        raise RuntimeError(f"the editor yielded an image of shape {tuple(view.shape)}, format {view.format!r}; expected {expected} uint8")
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _error_code(exc: P2VError) -> str:
    if isinstance(exc, SettingsError):
        return P.E_SETTINGS
    if isinstance(exc, InputError):
        return P.E_INPUT
    if isinstance(exc, ModelLoadError):
        return P.E_MODEL_LOAD
    if isinstance(exc, GpuOutOfMemory):
        return P.E_GPU_OOM
    return P.E_EDIT_FAILED


def _json_safe(value, depth: int = 0):
    """Stats as plain JSON: non-finite floats become None, unknown objects their str()."""
    if depth > 8:
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        try:
            return _json_safe(value.item(), depth + 1)
        except Exception:
            pass
    return str(value)


# --- one connection ----------------------------------------------------------------------------


class _Connection:
    def __init__(self, server: "Server", sock: socket.socket, peer: str):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.authed = False
        self.closing = False
        self.job: _Job | None = None  # this connection's latest job
        self.upload: _Job | None = None  # the job whose frames are still arriving
        self.bytes_in = 0
        sock.settimeout(server.read_timeout)
        self.writer = _Writer(sock, self._on_broken)

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
            raise P.ProtocolError(P.E_VERSION, f"client speaks p2v protocol {header['protocol']}, this runtime speaks {P.PROTOCOL_VERSION}")
        if not self.server.check_token(header["token"]):
            log.warning("%s: wrong token", self.peer)
            raise P.ProtocolError(P.E_AUTH, "wrong token: use the token the runtime was started with (P2V_TOKEN or --token-file)")
        self.authed = True
        self.writer.send({
            "type": "hello_ok", "protocol": P.PROTOCOL_VERSION, "server": f"p2v-runtime {__version__}",
            "pid": os.getpid(), "busy": self.server.current_job is not None,
            "limits": {
                "max_header_bytes": P.MAX_HEADER_BYTES, "max_payload_bytes": P.MAX_PAYLOAD_BYTES,
                "max_frame_side": P.MAX_FRAME_SIDE, "max_frame_pixels": P.MAX_FRAME_PIXELS,
                "max_frames": P.MAX_FRAMES, "window": self.server.window,
            },
        })

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
            self.writer.send(P.error_header(P.E_BUSY, "this connection's previous job is still running; wait for its done, cancelled or error", False))
            return
        count, width, height = header["frames"], header["width"], header["height"]
        if not 1 <= count <= P.MAX_FRAMES:
            raise P.ProtocolError(P.E_LIMIT, f"a job has 1..{P.MAX_FRAMES} frames, got {count}")
        P.check_frame_size(width, height)
        try:
            settings = EditSettings.from_dict(header["settings"])
        except SettingsError as exc:
            self.writer.send(P.error_header(P.E_SETTINGS, str(exc), False))
            return
        except Exception as exc:
            self.writer.send(P.error_header(P.E_SETTINGS, f"unusable settings: {type(exc).__name__}: {exc}", False))
            return
        self.upload = None
        needed = count * width * height * (3 + (4 if header["depth"] else 0))
        job = self.server._begin_job(self, settings, count, width, height, header["depth"], needed)
        if job is None:
            return
        self.job = self.upload = job
        log.info("job %s from %s: %d frame(s) %dx%d%s", job.id, self.peer, count, width, height, " with depth" if job.has_depth else "")
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
            raise P.ProtocolError(P.E_BAD_SHAPE, f"{kind} {index} has shape {header['shape']}, the job's frames are {list(spool.shape)}")
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
        deadline = time.monotonic() + _LINGER_SECONDS
        scratch = bytearray(65536)
        drained = 0
        while drained < _LINGER_BYTES:
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


# --- the server --------------------------------------------------------------------------------


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
    ``(index, image)`` like ``edit_clip``; ``stats`` is a dict it fills, ``warn(message)`` sends a
    ``warning`` to the client.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str,
                 job_runner: JobRunner | None = None, allow_remote: bool = False,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
                 idle_timeout: float | None = None, spool_dir: str | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, window: int = P.DEFAULT_WINDOW):
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
        self.current_job: _Job | None = None
        self._job_lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._connections: dict[_Connection, threading.Thread] = {}
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
            raise P2VError(f"refusing to listen on {self.host!r}: it is not a loopback address (pass --allow-remote and a token to serve other machines)")
        family, type_, proto, _, addr = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
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
                if self.idle_timeout and self.current_job is None and time.monotonic() - self._last_activity > self.idle_timeout:
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
                sock.send(P.encode_head(P.error_header(P.E_TOO_MANY, f"the runtime already has {self.max_connections} connections open; try again later", True)))
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                sock.close()
                return
            if len(self._refused) >= _MAX_REFUSED:
                sock.close()
            else:  # read off what the peer sends until it closes, from the accept loop, without waiting
                self._refused[sock] = time.monotonic() + _LINGER_SECONDS
            return
        self.touch()
        conn = _Connection(self, sock, peer)
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
        conn = _Connection(self, sock, peer)
        with self._conn_lock:
            self._connections[conn] = threading.current_thread()
        conn.serve()

    def _connection_closed(self, conn: _Connection) -> None:
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

    def _begin_job(self, conn: _Connection, settings: EditSettings, count: int, width: int,
                   height: int, has_depth: bool, needed_bytes: int) -> _Job | None:
        """Claim the one job slot; None (after telling the client why) when it cannot start."""
        if not self._job_lock.acquire(blocking=False):
            conn.writer.send(P.error_header(P.E_BUSY, "the runtime is busy with another job; try again when it finishes", False))
            return None
        try:
            root = self.spool_dir or tempfile.gettempdir()
            os.makedirs(root, exist_ok=True)
            free = shutil.disk_usage(root).free
            if needed_bytes + 64 * 1024 * 1024 > free:
                conn.writer.send(P.error_header(P.E_DISK, f"the job needs {needed_bytes / 1e9:.2f} GB in {root}, only {free / 1e9:.2f} GB are free", False))
                self._job_lock.release()
                return None
            folder = tempfile.mkdtemp(prefix="p2v-job-", dir=root)
            job = _Job(self, conn, f"{os.getpid()}-{next(self._job_ids)}", settings, count, width, height, has_depth, folder)
        except BaseException:
            self._job_lock.release()
            raise
        self.current_job = job
        return job

    def _end_job(self, job: _Job) -> None:
        if self.current_job is job:
            self.current_job = None
            self.touch()
            self._job_lock.release()


# --- command line ------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (see the ready line)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --host; needs a token from P2V_TOKEN or --token-file")
    parser.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                        help="exit after S seconds with no job and no message from any client")
    parser.add_argument("--token-file", default=None,
                        help="file holding the token clients must send (default: $P2V_TOKEN, else a random one on loopback)")
    parser.add_argument("--spool-dir", default=None, help="folder for job folders of spooled frames (default: the temp folder)")
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="S",
                        help="close a connection that stalls mid-message or sends no hello for S seconds")
    parser.add_argument("--frame-timeout", type=float, default=DEFAULT_FRAME_TIMEOUT, metavar="S",
                        help="cancel a job whose client sends no frame for S seconds mid-upload")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--job-runner", choices=sorted(JOB_RUNNERS), default="edit", help=argparse.SUPPRESS)


def _read_token(args) -> tuple[str | None, str | None]:
    """(token, error). The token never comes from the command line, only a file or the environment."""
    path = getattr(args, "token_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            return None, f"cannot read --token-file {path}: {exc.strerror or exc}"
        if not token:
            return None, f"--token-file {path} is empty"
        return token, None
    return os.environ.get("P2V_TOKEN", "").strip() or None, None


def serve_main(args: argparse.Namespace) -> int:
    """``p2v serve``: print the ready line on stdout, log to stderr, serve until stopped."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("p2v serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    token, problem = _read_token(args)
    if problem:
        print(f"p2v serve: {problem}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        if not args.allow_remote:
            print(f"p2v serve: refusing to listen on {args.host!r}, which is not a loopback address: "
                  "pass --allow-remote and set P2V_TOKEN or --token-file", file=sys.stderr)
            return 2
        if token is None:
            print(f"p2v serve: refusing to listen on {args.host!r} without a token: set P2V_TOKEN or --token-file",
                  file=sys.stderr)
            return 2
    generated = token is None
    if generated:
        token = secrets.token_urlsafe(32)
    for name, value in (("--read-timeout", args.read_timeout), ("--frame-timeout", args.frame_timeout), ("--idle-timeout", args.idle_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            print(f"p2v serve: {name} must be a positive number of seconds, got {value}", file=sys.stderr)
            return 2
    server = Server(args.host, args.port, token=token, job_runner=JOB_RUNNERS[args.job_runner],
                    allow_remote=args.allow_remote, read_timeout=args.read_timeout,
                    frame_timeout=args.frame_timeout, idle_timeout=args.idle_timeout,
                    spool_dir=args.spool_dir, max_connections=max(1, args.max_connections))
    try:
        host, port = server.bind()
    except (OSError, P2VError) as exc:
        print(f"p2v serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: server.stop())
    ready = {"event": "ready", "host": host, "port": port, "pid": os.getpid(), "protocol": P.PROTOCOL_VERSION}
    if generated:
        ready["token"] = token  # only reachable on loopback: remote binds refuse to start without one
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    server.serve_forever()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2v serve", description="Run the Pix2Video runtime server.")
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
