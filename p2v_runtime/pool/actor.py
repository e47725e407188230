"""One actor of the pool: a device, its warm models, and the work the server hands it.

``edit`` runs one job's sequential edit (``editor.edit_clip``) and streams back what the server
sends its client: progress, warnings, depth, results (from ``skip`` on: after a restart the
frames the client has are recomputed, for the chain, but not sent again) and last the stats.
``invert_one`` computes one pending inversion of any running job, bit for bit what the editing
actor would compute (the same functions on the same kind of device and dtype).

torch and the editor are imported inside the methods: this module is also imported by the
server process, which never loads them.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback

import ray

from ..errors import USER_ERRORS, EditCancelled, GpuOutOfMemory, InputError, ModelLoadError, P2VError
from ..settings import EditSettings, SettingsError
from .shared import POLL, BoardFrames, BoardInversions

log = logging.getLogger("p2v.pool")

# Every item an actor yields is a Ray object sent to the server: progress (every denoising step)
# goes at most this often, the latest count of each stage, so it costs the edit nothing.
PROGRESS_EVERY = 0.1
GPU_ACTOR_THREADS = 4  # CPU threads of a GPU actor unless --actor-threads says otherwise
# The errors an actor reports by name, the first its error is an instance of; the server raises
# the same class again (``pool.py``), so the client hears the same code as from one runtime.
ERROR_KINDS = {cls.__name__: cls for cls in (SettingsError, InputError, ModelLoadError, GpuOutOfMemory, P2VError)}


class EditActor:
    """``pool.py`` makes it a Ray actor with one GPU, or with ``threads`` CPUs."""

    def __init__(self, name: str, threads: int):
        self.name = name
        self.threads = threads
        self._embeddings: dict = {}  # (model fingerprint, device, dtype, source prompt) -> embedding
        self._schedulers: dict = {}  # (model fingerprint, steps) -> inverse scheduler

    def ready(self) -> dict:
        """Where the actor runs (also: it is started, and alive)."""
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPUs: 0 for a GPU actor, which would leave its
        # CPU side (resizing, decoding, features in host memory) one thread.
        torch.set_num_threads(self.threads or GPU_ACTOR_THREADS)
        return {
            "name": self.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }

    # -- one inversion of any job -------------------------------------------------------------

    def invert_one(self, board) -> bool:
        """Claim and compute one pending inversion of ``board``'s job; False when none is pending."""
        claim = ray.get(board.claim.remote(self.name))
        if claim is None:
            return False
        spec, request, box = claim
        try:
            latent = self._invert(spec, request, box)
        except Exception:  # noqa: BLE001 - the editing actor inverts it itself; the log says why
            log.warning("%s: inversion of frame %d failed:\n%s", self.name, request.index, traceback.format_exc())
            latent = None
        if latent is None:
            ray.get(board.refuse.remote(request.key, self.name))
            return True
        ray.get(board.complete.remote(request.key, latent, self.name))
        return True

    def _invert(self, spec, request, box):
        from ..editor import depth_tensor
        from ..frames import resize_rgb
        from ..inversion import InversionCache, ddim_schedulers, default_cache_dir, embed_prompt, invert_frame
        from ..models import dtype_name, holds_another_depth_pipeline, load_depth_pipeline

        settings = EditSettings.from_wire(spec.settings)
        if holds_another_depth_pipeline(settings.model, settings.device, settings.dtype):
            return None  # not worth dropping the warm model (a queued job may want it) for one inversion
        pipeline, _ = load_depth_pipeline(settings.model, settings.device, settings.dtype)
        if (pipeline.fingerprint, pipeline.device, dtype_name(pipeline.dtype)) != (
            spec.fingerprint,
            spec.device,
            spec.dtype,
        ):
            return None  # another model, device kind or dtype would give another latent
        disk = InversionCache(settings.cache_dir or default_cache_dir())
        cached = disk.load(request.key)
        if cached is not None:
            return cached
        embedding_key = (spec.fingerprint, spec.device, spec.dtype, spec.source_prompt)
        if embedding_key not in self._embeddings:
            self._embeddings = {embedding_key: embed_prompt(pipeline, spec.source_prompt, guided=False)}
        scheduler_key = (spec.fingerprint, settings.steps)
        if scheduler_key not in self._schedulers:
            self._schedulers = {scheduler_key: ddim_schedulers(pipeline, settings.steps)[1]}
        rgb = resize_rgb(ray.get(box[0]), tuple(spec.work_size))
        start = invert_frame(
            pipeline,
            rgb,
            depth_tensor(pipeline, request.model_depth),
            self._embeddings[embedding_key],
            self._schedulers[scheduler_key],
        )
        latent = start.cpu().numpy()
        disk.store(request.key, latent)
        return latent

    # -- one job's edit -----------------------------------------------------------------------

    def edit(self, job: dict, board, skip: int):
        """Stream ``("progress", stage, done, total)``, ``("warning", text)``, ``("depth", index,
        map)``, ``("result", index, rgb)``, then ``("stats", dict)`` and last one of ``("done",)``,
        ``("cancelled",)`` or ``("error", kind, message, public)``."""
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        finished = threading.Event()
        threading.Thread(target=self._watch_cancel, args=(board, cancel, finished), daemon=True).start()
        worker = threading.Thread(target=self._run_edit, args=(job, board, skip, events, cancel), daemon=True)
        worker.start()
        try:
            yield from _coalesced(events)
        finally:
            finished.set()
            cancel.set()  # the server stopped reading: stop editing too
            worker.join(60)

    @staticmethod
    def _watch_cancel(board, cancel: threading.Event, finished: threading.Event) -> None:
        while not finished.wait(POLL / 2):
            try:
                if ray.get(board.cancelled.remote()):
                    cancel.set()
                    return
            except Exception:  # noqa: BLE001 - the board is gone: so is the job
                cancel.set()
                return

    def _run_edit(self, job: dict, board, skip: int, events: queue.Queue, cancel: threading.Event) -> None:
        from ..editor import edit_clip
        from ..models import free_device_memory
        from ..protocol import EditStats

        stats = EditStats()
        ending: tuple = ("done",)
        shared = BoardInversions(board, self.name, cancel)
        try:
            settings = EditSettings.from_wire(job["settings"])
            size = (job["width"], job["height"])
            frames = BoardFrames(board, "frame", job["count"], size, cancel, job["id"])
            depth = BoardFrames(board, "depth", job["count"], size, cancel, job["id"]) if job["has_depth"] else None
            options = {}
            if job.get("send_depth"):
                options["depth_sink"] = lambda index, values: events.put(("depth", index, values))
            for index, image in edit_clip(
                frames,
                settings,
                depth=depth,
                progress=lambda stage, done, total: events.put(("progress", stage, done, total)),
                cancel=cancel,
                stats=stats,
                warn=lambda message: events.put(("warning", str(message))),
                preview=bool(job.get("preview")),
                shared_inversions=shared,
                **options,
            ):
                if index >= skip or job.get("preview"):
                    events.put(("result", index, image))
        except EditCancelled:
            ending = ("cancelled",)
        except USER_ERRORS as exc:
            kind = next(name for name, cls in ERROR_KINDS.items() if isinstance(exc, cls))
            ending = ("error", kind, str(exc), getattr(exc, "public", None))
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which tells the client
            log.error("%s: job %s failed:\n%s", self.name, job.get("id"), traceback.format_exc())
            ending = ("error", "internal", f"{type(exc).__name__}: {exc}", None)
        finally:
            # The job's activations and features go back to the device (the weights stay warm),
            # so the next job's --feature-store auto sees the memory that is really free.
            free_device_memory()
            # Inversions another actor computed came through the shared cache: not this disk's hits.
            stats.inversion_cache_hits -= shared.from_pool
            stats.actor = self.name
            events.put(("stats", stats.to_dict()))
            events.put(ending)
            events.put(None)


def _coalesced(events: queue.Queue):
    """The edit's items until ``None``, with progress thinned to one item per ``PROGRESS_EVERY``
    (a stage's last count is always sent, and before anything that follows it)."""
    pending, last = None, 0.0
    while True:
        timeout = None if pending is None else max(0.0, last + PROGRESS_EVERY - time.monotonic())
        try:
            item = events.get(timeout=timeout)
        except queue.Empty:
            item = "flush"
        if pending is not None and (item == "flush" or item is None or item[0] != "progress" or item[1] != pending[1]):
            yield pending
            pending, last = None, time.monotonic()
        if item is None:
            return
        if item == "flush":
            continue
        if item[0] != "progress":
            yield item
        elif time.monotonic() - last >= PROGRESS_EVERY:
            yield item
            last = time.monotonic()
        else:
            pending = item
