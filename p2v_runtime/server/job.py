"""One job: the thread that runs the job runner over the spooled frames and sends its results.

The job also decides its last message (``done`` with its :class:`EditStats`, ``cancelled``, or an
``error`` whose code says what kind of failure it was) and sends it only after the job slot is
free, so a client that hears it may submit its next job at once.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import protocol as P
from ..errors import USER_ERRORS, EditCancelled, GpuOutOfMemory, InputError, ModelLoadError, P2VError
from ..protocol import EditStats
from ..settings import EditSettings, SettingsError
from .spool import Spool, SpooledFrames

log = logging.getLogger("p2v.serve")

CANCEL_WAIT = 60.0  # longest wait for a job to notice its cancel flag on disconnect or shutdown
# Writing the spool failed because the disk (or a quota, or a file size limit) is full.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}

# ``runner(frames, settings, *, depth, progress, cancel, stats, warn)`` yields ``(index, image)``
# like ``edit_clip``; ``stats`` is the job's :class:`EditStats` for it to fill.
JobRunner = Callable[..., Iterator[tuple[int, Any]]]


def settings_from_wire(values: dict) -> EditSettings:
    """The ``job`` message's settings as an :class:`EditSettings`; raises ``SettingsError``."""
    return EditSettings.from_wire(values)


def edit_job_runner(
    frames, settings, *, depth=None, progress=None, cancel=None, stats=None, warn=None, depth_sink=None, preview=False
):
    """The real edit: ``editor.edit_clip``, imported on first use so the server starts fast."""
    from ..editor import edit_clip

    try:
        yield from edit_clip(
            frames,
            settings,
            depth=depth,
            progress=progress,
            cancel=cancel,
            stats=stats,
            warn=warn,
            depth_sink=depth_sink,
            preview=preview,
        )
    finally:
        _free_device_memory()


def _free_device_memory() -> None:
    """Give the job's activations and feature cache back to the GPU (the weights stay warm)."""
    import gc
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


class Job:
    """A job's state, shared by the connection that uploads its frames and the thread that edits them.

    ``server`` holds the job slot this job frees when it ends; ``conn`` is the connection that
    uploads the frames and sends the results (its ``writer``).
    """

    def __init__(
        self,
        server,
        conn,
        job_id: str,
        settings: EditSettings,
        count: int,
        width: int,
        height: int,
        has_depth: bool,
        folder: str,
    ):
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
        self.spools = {"frame": Spool(os.path.join(folder, "frames.rgb"), count, (height, width, 3), "uint8")}
        if has_depth:
            self.spools["depth"] = Spool(os.path.join(folder, "depth.f32"), count, (height, width), "float32")
        self.send_depth = False  # the client asked for the depth each frame was edited with
        self.preview = False  # the client asked for the anchor frame only
        self.queue_updates = False  # the client asked to hear its place in a pool's queue
        self.thread: threading.Thread | None = None
        self.started = time.monotonic()
        self.bytes_in_start = conn.bytes_in
        self.bytes_out_start = conn.writer.bytes_out
        self.abort_message: dict | None = None  # the last message when the server stops the job itself
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
        """Spool one frame (or depth); a full disk ends the job with ``disk_full`` (the upload is then dropped)."""
        full = None
        with self.cond:
            if not self.finished.is_set() and self.abort_message is None:
                try:
                    self.spools[kind].append(data)
                except OSError as exc:
                    if exc.errno not in DISK_FULL_ERRNOS:
                        raise
                    full = exc
            self.received[kind] += 1
            self.cond.notify_all()
        if full is not None:
            root = os.path.dirname(self.folder)
            at = self.received[kind] - 1
            log.warning("job %s: the spool folder %s is full at %s %d: %s", self.id, root, kind, at, full)
            self.abort(
                P.error_header(
                    P.E_DISK,
                    f"the runtime's spool folder ran out of space at {kind} {at} of "
                    f"{self.count} ({full.strerror or full}): free space there, or start the runtime with "
                    "--spool-dir on a larger disk",
                    False,
                )
            )

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
            self.finish(self.abort_message or {"type": "cancelled", "frames_done": self.results_sent})

    def abort(self, final: dict) -> None:
        """Stop the job for a reason of the server's own; ``final`` is its last message instead of cancelled."""
        if self.abort_message is None:
            self.abort_message = final
        self.request_cancel()

    def wait(self, timeout: float) -> bool:
        return self.ended.wait(timeout)

    def _progress(self, stage, done, total) -> None:
        try:
            header = {"type": "progress", "stage": str(stage)[:64], "done": int(done), "total": int(total)}
        except (TypeError, ValueError):
            return
        self.conn.writer.send(header)

    def _queued(self, position: int) -> None:
        """The job's place in the pool's queue (1: next to start), for clients that asked for it."""
        if self.queue_updates:
            self.conn.writer.send({"type": "queued", "position": int(position)})

    def _warn(self, message) -> None:
        self.conn.writer.send({"type": "warning", "message": P.one_line(str(message))})

    def _send_depth(self, index: int, depth01) -> None:
        """A ``depth_used`` message: frame ``index``'s model depth, HxW float32 in [0, 1]."""
        import numpy as np

        values = np.ascontiguousarray(depth01, dtype="<f4")
        height, width = values.shape
        header = {"type": "depth_used", "index": int(index), "shape": [height, width], "dtype": "float32"}
        self.conn.writer.send(header, memoryview(values).cast("B"))

    def _run(self) -> None:
        final: dict | None = None
        stats = EditStats()
        iterator = None
        try:
            frames = SpooledFrames(self, "frame")
            depth = SpooledFrames(self, "depth") if self.has_depth else None
            runner_options = {"depth_sink": self._send_depth} if self.send_depth else {}
            if self.preview:
                runner_options["preview"] = True
            if self.server.pool is not None:
                runner_options.update(queued=self._queued, job_id=self.id)
            iterator = self.server.job_runner(
                frames,
                self.settings,
                depth=depth,
                progress=self._progress,
                cancel=self.cancel,
                stats=stats,
                warn=self._warn,
                **runner_options,
            )
            # Results go out in frame order whatever order the editor works in (it buffers); a
            # preview's one result is the anchor's frame.
            preview_index = self.settings.anchor_index(self.count) if self.preview else None
            for index, image in iterator:
                if self.cancel.is_set():
                    raise EditCancelled(self.results_sent)
                due = self.results_sent if preview_index is None else preview_index
                if index != due or (preview_index is not None and self.results_sent):
                    raise RuntimeError(f"the editor yielded frame {index} where {due} was due")
                payload = _image_payload(image, self.width, self.height)
                header = P.frame_header("result", index, self.width, self.height)
                if not self.conn.writer.send_result(header, payload, self.cancel.is_set):
                    raise EditCancelled(self.results_sent)
                self.results_sent += 1
            final = {"type": "done", "frames": self.results_sent, "stats": self._stats(stats)}
        except EditCancelled:
            final = self.abort_message or {"type": "cancelled", "frames_done": self.results_sent}
        except USER_ERRORS as exc:
            final = P.error_header(_error_code(exc), self._user_message(exc), False)
        except ImportError as exc:
            log.exception("job %s: the editor could not be imported", self.id)
            final = P.error_header(P.E_INTERNAL, f"the runtime's editor is not available: {exc}", False)
        except MemoryError:
            final = P.error_header(P.E_INTERNAL, "the runtime ran out of memory", False)
        except Exception as exc:  # never let a job take the server down
            log.exception("job %s failed", self.id)
            detail = f": {exc}" if self.conn.local else " (details are in the runtime's log)"
            final = P.error_header(P.E_INTERNAL, f"internal error in the runtime: {type(exc).__name__}{detail}", False)
        finally:
            if iterator is not None and hasattr(iterator, "close"):
                try:
                    iterator.close()
                except Exception:
                    log.exception("job %s: closing the editor failed", self.id)
            self.finish(final)

    def _user_message(self, exc: Exception) -> str:
        """What the client reads. A library's own text (which may quote a file it read) stays in the
        log for a client on another machine: it reads the error's ``public`` one-liner instead."""
        message = str(exc)
        public = getattr(exc, "public", None)
        if public and not self.conn.local:
            log.warning("job %s: %s", self.id, message)
            return public
        return message

    def _stats(self, stats: EditStats) -> dict:
        """The runner's stats with what only the server knows: results sent, bytes, wall time."""
        stats.frames = self.results_sent
        stats.bytes_in = self.conn.bytes_in - self.bytes_in_start
        stats.bytes_out = self.conn.writer.bytes_out - self.bytes_out_start
        stats.seconds = round(time.monotonic() - self.started, 6)
        return _json_safe(stats.to_dict())

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
    if (
        view.format not in ("B", "b", "c")
        or view.nbytes != width * height * 3
        or (view.ndim == 3 and tuple(view.shape) != expected)
    ):
        raise RuntimeError(
            f"the editor yielded an image of shape {tuple(view.shape)}, format {view.format!r}; "
            f"expected {expected} uint8"
        )
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
        except Exception:  # noqa: BLE001 - stats stay JSON whatever a number type does
            pass
    return str(value)
