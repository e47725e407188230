"""One edit of one strip: frames out, edited frames into a new strip. Shared by every front end.

The modal operator, the headless script and the tests all drive the same :class:`EditJob`:

* :meth:`EditJob.start` (main thread) checks everything that can be checked before anything is
  changed (strip, output folder, free channel, runtime settings, no other job), starts the local
  runtime if needed, and starts the worker thread.
* The worker thread does all socket I/O with the vendored client: it sends the frames the main
  thread renders, writes each edited frame as a PNG as soon as it arrives, and posts events
  (progress, frame written, done, cancelled, error) to a queue. It never touches bpy.
* :meth:`EditJob.poll` (main thread; the operator's timer, or a loop) renders the next frames
  into a bounded queue for the worker, applies the events (the strip grows), and says whether
  the job is still running.
* :meth:`EditJob.cancel` (any thread) asks the runtime to stop within one denoising step.

A cancelled or failed job keeps the frames already received as a shorter strip and says how many.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass

from . import output_strip, png, runtime_process, strip_frames
from ._vendor import settings as schema
from ._vendor.settings import SettingsError
from .errors import P2VAddonError, StripTooLong

FRAME_QUEUE = 4  # rendered frames waiting for the worker (memory bound)
QUEUE_STAGE = "queue"  # status.stage while a pool's job waits for a GPU; stage_done: its place
POLL_BUDGET = 0.05  # seconds of rendering per poll, so the UI stays responsive

_current: EditJob | None = None
_current_lock = threading.Lock()


def current_job() -> EditJob | None:
    """The job running now, if any (the panel shows its progress)."""
    job = _current
    return job if job is not None and job.running else None


@dataclass
class JobStatus:
    stage: str = "starting"
    stage_done: int = 0
    stage_total: int = 0


class _Abort(Exception):
    """The worker stops sending because the job was cancelled or the main side failed."""


class EditJob:
    """Edit ``strip`` of ``scene`` with ``settings`` (a validated ``EditSettings`` of the schema).

    The settings the runtime uses go over the wire; the rest (frame range, depth source, Z-pass
    render) say what this job renders and sends.
    """

    def __init__(
        self,
        scene,
        strip,
        settings,
        runtime: runtime_process.RuntimeConfig,
        *,
        output_dir: str = "",
        max_frames: int = 0,
        confirmed: bool = False,
        save_depth_dir: str = "",
        preview: bool = False,
    ):
        self.scene = scene
        self.preview = preview  # edit the anchor only (the settings' anchor frame of the range)
        self.strip = strip
        self.settings = settings
        self.runtime = runtime
        self.save_depth_dir = save_depth_dir  # the depth each frame was edited with, as 16-bit PNGs
        self.output_dir = output_dir
        self.max_frames = max_frames
        self.confirmed = confirmed
        self.state = "new"  # new, running, done, cancelled, failed
        self.message = ""
        self.status = JobStatus()
        self._stage_done: dict = {}  # stage -> steps done, as the runtime reports them
        self._progress = 0.0
        self.total = 0  # frames rendered and sent
        self.edited_total = 0  # frames edited: all of them, or the anchor for a preview
        self.stats: dict = {}
        self.warnings: list[str] = []  # the runtime's warnings (e.g. a setting it adjusted)
        self.frames: strip_frames.StripFrames | None = None
        self.output: output_strip.OutputStrip | None = None
        self.process: runtime_process.RuntimeProcess | None = None
        self._events: queue.Queue = queue.Queue()
        self._to_send: queue.Queue = queue.Queue(maxsize=FRAME_QUEUE)
        self._rendered = 0
        self._cancel = threading.Event()
        self._abort = threading.Event()
        self._worker: threading.Thread | None = None
        self._direct = False  # run_here: the socket I/O runs on the main thread
        self._client = None  # the worker's connection, for cancel()
        self._depth_pending = None
        self.started_at = 0.0

    # --- main thread ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def progress(self) -> float:
        """The whole job's progress, 0..1, never going back (the runtime's stage counters take turns:
        inversion 3/12 after edit 2/12): the inversion and edit steps of every frame, the bulk of it."""
        if self.state == "done":
            return 1.0
        steps = max(1, self.edited_total * self.settings.steps)
        done = self._stage_done.get("inversion", 0) + self._stage_done.get("edit", 0)
        self._progress = max(self._progress, min(1.0, done / (2 * steps)))
        return self._progress

    @property
    def stage_text(self) -> str:
        """What the job is doing, for the panel and the status bar (a pool's queue in words)."""
        if self.status.stage == QUEUE_STAGE:
            return runtime_process.wire_client.queue_text(self.status.stage_done)
        return self.status.stage

    @property
    def frames_done(self) -> int:
        return 0 if self.output is None else self.output.frames

    def start(self, threaded: bool = True) -> EditJob:
        """Check, then start; raise :class:`P2VAddonError` (nothing changed) when the job cannot run.

        ``threaded=False`` starts no worker: :meth:`run_here` then does its work on this thread.
        """
        global _current
        with _current_lock:
            if current_job() is not None:
                raise P2VAddonError("A Pix2Video edit is already running: wait for it or cancel it first")
            _current = self
            self.state = "running"
        try:
            self._prepare()
        except BaseException:
            self.state = "new"
            with _current_lock:
                if _current is self:
                    _current = None
            if self.frames is not None:
                self.frames.close()
            if self.output is not None:
                self.output.release()  # its folder was reserved; nothing was written into it
                self.output = None
            raise
        self.started_at = time.monotonic()
        if threaded:
            self._worker = threading.Thread(target=self._work, name="p2v-edit-worker", daemon=True)
            self._worker.start()
        return self

    def run_here(self) -> str:
        """Start and run the whole job on the calling (main) thread, without a worker thread.

        For the operator when it runs without an event loop (``bpy.ops.sequencer.p2v_edit()`` in a
        script, ``blender -b``): the script may call it inside ``context.temp_override``, and an
        operator (our renders) called there while another Python thread runs crashes Blender.
        Frames are rendered as the socket asks for them; results are applied between frames.
        """
        self.start(threaded=False)
        return self.run_started()

    def run_started(self) -> str:
        """Run a job started with ``threaded=False`` to its end on this thread; return its state."""
        if self._worker is not None:
            raise RuntimeError("this job has a worker thread: poll() it instead")
        self._direct = True
        try:
            self._work()
        except KeyboardInterrupt:
            self._cancel.set()
            self._events.put(("cancelled",))
        while self.poll():
            pass
        return self.state

    def check(self) -> None:
        """Raise :class:`P2VAddonError` (or :class:`StripTooLong`) when this job could not start; change
        nothing and render nothing. A run of several strips checks them all before the first renders.
        """
        frames = self._checked_frames()
        start = frames.first_frame + self._preview_offset(frames.count)
        output_strip.result_channel(self.scene, self.strip, start, 1 if self.preview else frames.count)

    def _checked_frames(self) -> strip_frames.StripFrames:
        """The strip's frames (not yet opened), after every check that needs no change to anything."""
        try:
            self.settings.validate()  # the runtime's own rules and messages (the vendored schema)
        except SettingsError as exc:
            raise P2VAddonError(str(exc)) from None
        self._check_anchor()
        frames = strip_frames.StripFrames(
            self.scene, self.strip, self.settings.depth, self.settings.zpass_render, self._frames_to_send()
        )
        if self.max_frames and frames.count > self.max_frames and not self.confirmed:
            raise StripTooLong(
                f"Strip '{self.strip.name}' shows {frames.count} frames, more than the limit of "
                f"{self.max_frames}: confirm to edit it anyway",
                frames.count,
                self.max_frames,
            )
        if self.runtime.mode == "REMOTE":
            runtime_process.require_wire()
        else:
            runtime_process.resolve_python(self.runtime.python, self.runtime.python_hint)
        return frames

    def _prepare(self) -> None:
        frames = self._checked_frames()
        self.total = frames.count
        self.edited_total = 1 if self.preview else frames.count
        self.output = output_strip.OutputStrip(
            self.scene,
            self.strip,
            frames.first_frame + self._preview_offset(frames.count),
            self.edited_total,
            self.output_dir,
            look=frames.look,
            record=self.record(),
            name=output_strip.result_name(
                self.strip.name, self.settings.prompt, " p2v preview" if self.preview else " p2v"
            ),
        )
        if self.save_depth_dir:
            try:
                os.makedirs(self.save_depth_dir, exist_ok=True)
            except OSError as exc:
                raise P2VAddonError(
                    f"Cannot create the depth folder {self.save_depth_dir}: {exc.strerror or exc}"
                ) from None
        if self.runtime.mode != "REMOTE":
            self.process = runtime_process.ensure_local(self.runtime)
        frames.open()
        self.frames = frames

    def _check_anchor(self) -> None:
        """An anchor past the range is refused before anything renders (a range past the strip is
        StripFrames' to refuse, with the strip's name, as is a missing strip)."""
        if self.strip is None:
            return
        try:
            chosen = schema.frame_range(self.settings.frames, self.strip.frame_final_duration)
        except SettingsError:
            return
        try:
            self.settings.anchor_index(len(chosen))
        except SettingsError as exc:
            raise P2VAddonError(f"{exc} (strip '{self.strip.name}')") from None

    def _narrowed_preview(self) -> bool:
        """A preview with per-frame depth renders and sends its anchor alone (clip normalisation
        needs every frame's depth for the range, so then all are sent)."""
        return self.preview and self.settings.depth_norm == "frame"

    def _frames_to_send(self) -> str:
        """The range to render: the settings' range; for a narrowed preview, the anchor's frame of it."""
        if not self._narrowed_preview() or self.strip is None:
            return self.settings.frames
        try:
            chosen = schema.frame_range(self.settings.frames, self.strip.frame_final_duration)
        except SettingsError:
            return self.settings.frames  # StripFrames refuses it with the strip's name
        anchor = chosen.start + self.settings.anchor_index(len(chosen))
        return f"{anchor}:{anchor + 1}"

    def _preview_offset(self, count: int) -> int:
        """Where the preview's frame sits in the rendered frames: its strip goes at the anchor's
        frame on the timeline (a narrowed preview rendered the anchor alone)."""
        if not self.preview or self._narrowed_preview():
            return 0
        return self.settings.anchor_index(count)

    def _wire_settings(self) -> dict:
        """The settings the runtime uses; a narrowed preview's one frame is its own anchor."""
        wire = self.settings.to_wire()
        if self._narrowed_preview():
            wire["anchor"] = "first"
        return wire

    def record(self) -> dict:
        """How the result was made, kept on its strip (custom properties) for Re-edit and people."""
        record = {
            "p2v_source": self.strip.name,
            "p2v_prompt": self.settings.prompt,
            "p2v_settings": json.dumps(self.settings.to_dict(), sort_keys=True),
        }
        if self.preview:
            record["p2v_preview"] = True
        return record

    def poll(self) -> bool:
        """Render frames for the worker, apply what arrived; True while the job runs."""
        if self.state != "running":
            return False
        try:
            self._render_ahead()
        except Exception as exc:  # noqa: BLE001 - a frame could not be rendered: stop the worker and the runtime's job
            self._abort.set()
            self._cancel.set()
            message = (
                str(exc)
                if isinstance(exc, P2VAddonError)
                else f"Frame {self._rendered} of strip '{self.strip_name}' could not be read: {exc}"
            )
            self._events.put(("error", message))
        for event in self._waiting_events():
            self._apply(event)
            if self.state != "running":
                break
        return self.state == "running"

    def _waiting_events(self):
        """The worker's events already in the queue, without waiting for more."""
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return

    @property
    def strip_name(self) -> str:
        return self.frames.strip_name if self.frames is not None else "?"

    def _render_ahead(self) -> None:
        if self.frames is None or self._direct or self._cancel.is_set() or self._abort.is_set():
            return
        deadline = time.monotonic() + POLL_BUDGET
        while self._rendered < self.total and not self._to_send.full():
            rgb = self.frames.read(self._rendered)
            depth = self.frames.read_depth(self._rendered)
            self._to_send.put((rgb, depth))
            self._rendered += 1
            if time.monotonic() > deadline:
                break

    def _apply(self, event: tuple) -> None:
        kind = event[0]
        if kind == "progress":
            _, stage, done, total = event
            self.status = JobStatus(stage, done, total)
            self._stage_done[stage] = max(done, self._stage_done.get(stage, 0))
        elif kind == "frame":
            self.output.append(event[1])
        elif kind == "warning":
            self.warnings.append(event[1])
        elif kind == "done":
            self.stats = event[1]
            if self.frames_done == self.edited_total:
                self._finish(
                    "done",
                    f"{'Previewed the anchor' if self.preview else f'Edited {self.total} frame(s)'} of "
                    f"'{self.strip_name}' into strip "
                    f"'{self.output.strip_name}' ({self.output.folder})",
                )
            else:
                self._finish(
                    "failed",
                    f"The runtime finished with {self.frames_done} of {self.edited_total} frame(s)" + self._kept(),
                )
        elif kind == "cancelled":
            self._finish(
                "cancelled", f"Cancelled after {self.frames_done} of {self.edited_total} frame(s)" + self._kept()
            )
        elif kind == "error":
            self._finish("failed", event[1] + self._kept())

    def _kept(self) -> str:
        if self.output is None or not self.output.frames:
            return "; nothing was changed"
        return f"; {self.output.frames} frame(s) kept in strip '{self.output.strip_name}'"

    def _finish(self, state: str, message: str) -> None:
        global _current
        self._abort.set()
        if self._worker is not None:
            self._worker.join(10.0)
        # Frames the worker wrote after its last event was taken still belong to the strip.
        for event in self._waiting_events():
            if event[0] == "frame":
                self.output.append(event[1])
        if self.frames is not None:
            self.frames.close()
        if self.output is not None and not self.output.frames:
            self.output.release()
        if self.output is not None and self.output.unsaved and self.output.frames:
            message += (
                "; the file is not saved yet: its frames wait in the temp folder and move beside it when it is saved"
            )
        self.state = state
        self.message = message
        with _current_lock:
            if _current is self:
                _current = None

    def _apply_frames(self) -> None:
        """Apply the frame events waiting in the queue, keep the rest in order (run_here only)."""
        pending = []
        for event in self._waiting_events():
            if event[0] == "frame":
                self.output.append(event[1])
            elif event[0] in ("progress", "warning"):
                self._apply(event)
            else:
                pending.append(event)
        for event in pending:
            self._events.put(event)

    def cancel(self) -> None:
        """Ask the runtime to stop (any thread); the job ends, state ``cancelled``, on a later poll.

        The first call sends ``cancel`` at once (the runtime stops within one denoising step and
        answers ``cancelled``); a second call drops the connection, for a runtime that does not
        answer.
        """
        again = self._cancel.is_set()
        self._cancel.set()
        client = self._client
        if client is None:
            return
        try:
            client.close() if again else client.cancel()
        except Exception:  # noqa: BLE001 - the connection is already gone: the worker reports that
            pass

    def wait(self, timeout: float | None = None, interval: float = 0.02, on_poll=None) -> str:
        """Poll until the job ends (headless use); return its state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if on_poll is not None:
                on_poll(self)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval)
        return self.state

    # --- worker thread -------------------------------------------------------------------------

    def _next_frame(self, index: int):
        if self._direct:  # main thread: show what arrived, then render the frame asked for
            self._apply_frames()
            if self._cancel.is_set():
                raise _Abort()
            rgb = self.frames.read(index)
            self._depth_pending = self.frames.read_depth(index)
            self._rendered = index + 1
            return rgb
        while True:
            if self._abort.is_set() or self._cancel.is_set():
                raise _Abort()
            try:
                rgb, depth = self._to_send.get(timeout=0.1)
            except queue.Empty:
                continue
            self._depth_pending = depth
            return rgb

    def _next_depth(self, index: int):
        return self._depth_pending

    def _work(self) -> None:
        events = self._events
        client = None
        try:
            client = runtime_process.connect(self.runtime, self.process, self._cancel)
            self._client = client
            if self._cancel.is_set():  # cancelled while the runtime was starting: submit nothing
                events.put(("cancelled",))
                return
            width, height = self.frames.width, self.frames.height
            depth = self._next_depth if self.frames.has_depth else None
            # cancel() calls client.cancel() itself, so the wait for results needs no polling.
            for message in client.run_job(
                self._wire_settings(),
                self._next_frame,
                width,
                height,
                count=self.total,
                depth=depth,
                send_depth=bool(self.save_depth_dir),
                preview=self.preview and self.total > 1,
            ):
                if message.type == "progress":
                    events.put(("progress", message["stage"], message["done"], message["total"]))
                elif message.type == "queued":  # a pool's job waits for a GPU (1: next to start)
                    events.put(("progress", QUEUE_STAGE, message["position"], 0))
                elif message.type == "result":
                    name = self.output.write(message["index"], message.payload, width, height)
                    events.put(("frame", name))
                elif message.type == "warning":
                    events.put(("warning", str(message.get("message", ""))))
                elif message.type == "depth_used":
                    map_height, map_width = message["shape"]
                    png.write_grey16(
                        os.path.join(self.save_depth_dir, output_strip.FRAME_NAME.format(message["index"])),
                        message.payload,
                        map_width,
                        map_height,
                    )
                elif message.type == "done":
                    events.put(("done", dict(message["stats"])))
                elif message.type == "cancelled":
                    events.put(("cancelled",))
        except _Abort:
            events.put(("cancelled",) if self._cancel.is_set() else ("error", "Stopped"))
        except P2VAddonError as exc:
            events.put(("cancelled",) if self._cancel.is_set() else ("error", str(exc)))
        except OSError as exc:
            events.put(("error", f"Cannot write the edited frame into {self.output.folder}: {exc.strerror or exc}"))
        except Exception as exc:  # noqa: BLE001 - any failure of the worker becomes the job's message
            lost = runtime_process.wire is not None and isinstance(exc, runtime_process.wire.ConnectionLost)
            if lost and self._cancel.is_set():  # a second cancel() dropped the connection
                events.put(("cancelled",))
            else:
                events.put(("error", self._describe_failure(exc)))
        finally:
            self._client = None
            if client is not None:
                client.close()

    def _describe_failure(self, exc: Exception) -> str:
        wire = runtime_process.wire
        if wire is not None and isinstance(exc, wire.ConnectionLost):
            if self.process is not None:
                status = self.process.exit_status(wait=2.0)
                if status is not None:
                    return (
                        f"The runtime stopped unexpectedly (exit status {status}) during the edit; "
                        f"its log: {self.process.log_path}"
                    )
            return f"Lost the connection to {self.runtime.describe()}: {exc.message}"
        if wire is not None and isinstance(exc, wire.RemoteError):
            return f"The runtime could not edit the strip: {exc.message}"
        if wire is not None and isinstance(exc, wire.ProtocolError):
            return f"The runtime broke the protocol: {exc.message}"
        return f"Edit failed: {type(exc).__name__}: {exc}"
