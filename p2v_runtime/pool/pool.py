"""The pool behind ``p2v serve --ray``: Ray actors, one per device, and the jobs' queue.

Runs in the server process. Jobs wait in arrival order for an idle actor, hearing their place
(``queued``); an actor runs one job's sequential edit at a time; every other idle actor computes
pending inversions of running jobs, one at a time, so a job's inversions spread over the pool
while its edit runs (``board.py``). An actor that dies (a killed worker process, a lost node) is
replaced, and its job goes back to the head of the queue: the next actor resumes from the
inversions already on the board and sends only the frames the client does not have yet (the
chain is deterministic, so they are the frames an undisturbed run makes). A cancelled or
disconnected job leaves the queue, or stops its actor within a step.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import EditCancelled, ModelLoadError, P2VError
from ..settings import EditSettings
from .actor import ERROR_KINDS, EditActor
from .board import JobBoard

log = logging.getLogger("p2v.serve")

MAX_RESTARTS = 3  # a job moves to another actor at most this often before it fails
CANCEL_GRACE = 30.0  # an actor that has not stopped this long after a cancel is killed (and replaced)
ACTOR_START_TIMEOUT = 600.0  # first start of the actors (a fresh node may still be installing)
RETRY_PENDING = 0.25  # seconds before an idle actor asks a job with nothing pending again
MAX_START_FAILURES = 3  # an actor's place that fails to start this often in a row stays empty
PROBE_EVERY = 10.0  # seconds between looks at an idle actor (a dead one is replaced before a job meets it)


class ActorLost(Exception):
    """The actor running a job died."""


class _Slot:
    """One actor and what it is doing: starting, idle, edit (a job), invert (one inversion)."""

    def __init__(self, name: str, handle, started):
        self.name = name
        self.handle = handle
        self.state = "starting"
        self.pending_ref = started  # ready() while starting, invert_one() while inverting
        self.invert_job: _PoolJob | None = None
        self.info: dict = {}
        self.start_failures = 0  # of this place, in a row
        self.seen = time.monotonic()  # when it last answered


class _PoolJob:
    def __init__(self, job_id: str, board, queued: Callable[[int], None] | None):
        self.id = job_id
        self.board = board
        self.queued = queued
        self.position = 0
        self.slot: _Slot | None = None  # set by the dispatcher: the actor that edits it now
        self.next_try = 0.0  # when idle actors may ask its board for pending inversions again
        self.refs: list = []  # its frames in the object store, owned (kept alive) by this process
        self.uploaded = threading.Event()  # every frame is in the object store: it may take an actor
        self.feed_error: str | None = None
        self.done = False


class Pool:
    """Ray actors behind the server; :meth:`job_runner` is the server's job runner."""

    def __init__(self, address: str | None = None, actors: int | None = None, threads: int | None = None):
        self.address = address
        self.wanted_actors = actors
        self.threads = threads
        self._cond = threading.Condition()
        self._slots: list[_Slot] = []
        self._queue: list[_PoolJob] = []
        self._jobs: list[_PoolJob] = []  # every job that has not ended (queued or editing)
        self._names = itertools.count(1)
        self._closed = False
        self._actor_class = None
        self._board_class = None
        self._dispatcher: threading.Thread | None = None

    # -- start and stop -------------------------------------------------------------------------

    def start(self) -> str:
        """Join (``address``) or start (None) the cluster and start the actors; a line for the log."""
        options = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
        env = {name: os.environ[name] for name in ("HF_HUB_OFFLINE", "HF_HOME") if name in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
        try:
            # "local": a new cluster of this machine even where `ray start` runs one (None would join it).
            ray.init(address=self.address or "local", namespace="p2v", **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise P2VError(f"cannot join the Ray cluster at {self.address or 'a new local one'}: {exc}") from None
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        count = self.wanted_actors or gpus or nodes or 1
        if gpus:
            if count > gpus:
                raise P2VError(f"the cluster has {gpus} GPU(s), not enough for {count} actors (one GPU each)")
            self.threads = self.threads or 0
            resources_per_actor = {"num_gpus": 1, "num_cpus": 0}
        else:
            self.threads = self.threads or max(1, cpus // count)
            if count * self.threads > cpus:
                raise P2VError(
                    f"the cluster has {cpus} CPU(s), not enough for {count} actors of {self.threads} thread(s) each"
                )
            resources_per_actor = {"num_cpus": self.threads}
        self._actor_class = ray.remote(**resources_per_actor)(EditActor)
        # Boards live on this node: a job's state is lost only with the server itself.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._board_class = ray.remote(num_cpus=0, scheduling_strategy=here)(JobBoard)
        with self._cond:
            for _ in range(count):
                self._slots.append(self._new_slot())
        deadline = time.monotonic() + ACTOR_START_TIMEOUT
        for slot in list(self._slots):
            left = max(1.0, deadline - time.monotonic())
            try:
                slot.info = ray.get(slot.pending_ref, timeout=left)
            except ray.exceptions.GetTimeoutError:
                raise P2VError(f"actor {slot.name} did not start within {ACTOR_START_TIMEOUT:g} s") from None
            except ray.exceptions.RayError as exc:
                raise P2VError(f"actor {slot.name} could not start: {_first_line(exc)}") from None
            slot.state, slot.pending_ref = "idle", None
            log.info("actor %s: pid %s on %s (%s)", slot.name, slot.info["pid"], slot.info["host"], slot.info["device"])
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="p2v-pool", daemon=True)
        self._dispatcher.start()
        kind = "GPU" if gpus else f"CPU, {self.threads} thread(s) each"
        node = ray.util.get_node_ip_address()
        where = f"a local Ray cluster (node {node})" if self.address is None else f"the Ray cluster at {self.address}"
        return f"pool of {count} actor(s) ({kind}) on {where}"

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join(5)
        if ray.is_initialized():
            ray.shutdown()

    def would_wait(self) -> bool:
        """Whether a job sent now would wait for an actor."""
        with self._cond:
            return bool(self._queue) or not any(slot.state in ("idle", "invert", "probe") for slot in self._slots)

    def actors(self) -> list[dict]:
        """The actors' names, pids, hosts and states (the log, tests)."""
        with self._cond:
            return [{**slot.info, "name": slot.name, "state": slot.state} for slot in self._slots]

    # -- the server's job runner ----------------------------------------------------------------

    def job_runner(
        self,
        frames,
        settings: EditSettings,
        *,
        depth=None,
        progress=None,
        cancel: threading.Event,
        stats,
        warn=None,
        depth_sink=None,
        preview: bool = False,
        queued: Callable[[int], None] | None = None,
        job_id: str = "",
    ):
        """Run one job on the pool; yields ``(index, rgb)`` in frame order like ``edit_clip``."""
        job = _PoolJob(job_id, self._board_class.remote(), queued)
        width, height = frames.size
        spec = {
            "id": job_id,
            "settings": settings.to_wire(),
            "count": len(frames),
            "width": width,
            "height": height,
            "has_depth": depth is not None,
            "preview": preview,
            "send_depth": depth_sink is not None,
        }
        threading.Thread(target=self._feed, args=(job, frames, depth), name=f"p2v-feed-{job_id}", daemon=True).start()
        sent, depth_sent, restarts, ending, tries = 0, set(), 0, None, 0
        try:
            with self._cond:
                self._jobs.append(job)
            front = False
            while ending is None:
                slot = self._wait_for_actor(job, cancel, sent, front)
                log.info("job %s: editing on actor %s (pid %s)", job_id, slot.name, slot.info.get("pid"))
                started = False  # whether this actor sent anything: a loss before that is not the job's
                tries += 1
                try:
                    for item in self._stream(slot, spec, job, sent, cancel):
                        started = True
                        kind = item[0]
                        if kind == "result":
                            if (preview and not sent) or (not preview and item[1] >= sent):
                                yield item[1], item[2]
                                sent += 1
                        elif kind == "progress" and progress is not None:
                            progress(*item[1:])
                        elif kind == "warning" and warn is not None:
                            warn(item[1])
                        elif kind == "depth" and depth_sink is not None and item[1] not in depth_sent:
                            depth_sent.add(item[1])
                            depth_sink(item[1], item[2])
                        elif kind == "stats":
                            stats.update(item[1])
                        elif kind in ("done", "cancelled", "error"):
                            ending = item
                except ActorLost:
                    if cancel.is_set():
                        ending = ("cancelled",)
                        break
                    restarts += started
                    log.warning("job %s: actor %s died after %d frame(s) sent", job_id, slot.name, sent)
                    if restarts > MAX_RESTARTS or tries > MAX_RESTARTS + 2 * len(self._slots):
                        raise P2VError(f"the job lost its actor {tries} times; see the runtime's log") from None
                    front = True  # it waited once already: next free actor
                    continue
                except BaseException:  # left early (a cancel, a hang-up, the server stopping): stop the actor
                    job.board.cancel.remote()
                    raise
                finally:
                    self._after_edit(slot, job)
            stats.pool_restarts = restarts
            stats.pool_inversions = ray.get(job.board.counts.remote())
        finally:
            self._end(job)
        if ending[0] == "cancelled" and job.feed_error:
            raise RuntimeError(f"the job's frames could not be handed to the pool: {job.feed_error}")
        if ending[0] == "cancelled":
            raise EditCancelled(sent)
        if ending[0] == "error":
            _, kind, message, public = ending
            error = ERROR_KINDS.get(kind)
            if error is None:  # a bug, not the user's: the server reports it as an internal error
                raise RuntimeError(f"on actor {stats.actor or '?'}: {message}")
            raise error(message, public) if error is ModelLoadError else error(message)

    def _feed(self, job: _PoolJob, frames, depth) -> None:
        """Put the job's frames into the object store as they are uploaded, and tell its board."""
        try:
            for index in range(len(frames)):
                for kind, source in (("frame", frames), ("depth", depth)):
                    if source is None:
                        continue
                    if job.done:
                        return
                    ref = ray.put(np.ascontiguousarray(source.read(index)))
                    job.refs.append(ref)
                    job.board.add_frame.remote(kind, index, [ref])
            job.uploaded.set()
            with self._cond:
                self._cond.notify_all()
        except EditCancelled:
            pass  # the job ended during the upload
        except Exception as exc:  # noqa: BLE001 - e.g. the object store is full and cannot spill
            log.exception("job %s: handing its frames to the pool failed", job.id)
            job.feed_error = f"{type(exc).__name__}: {_first_line(exc)}"
            job.board.cancel.remote()  # an actor waiting for its frames stops
            with self._cond:
                self._cond.notify_all()

    def _wait_for_actor(self, job: _PoolJob, cancel: threading.Event, sent: int, front: bool) -> _Slot:
        with self._cond:
            if front:
                self._queue.insert(0, job)
            else:
                self._queue.append(job)
            self._tell_positions()
            self._cond.notify_all()
            while job.slot is None:
                gone = self._slots and all(slot.state == "failed" for slot in self._slots)
                if job.feed_error:
                    self._leave_queue(job)
                    raise RuntimeError(f"the job's frames could not be handed to the pool: {job.feed_error}")
                if cancel.is_set() or self._closed or gone:
                    self._leave_queue(job)
                    if gone:
                        raise P2VError("no actor of the pool is running: they failed to start (see the runtime's log)")
                    raise EditCancelled(sent)
                self._cond.wait(0.2)
            slot, job.slot = job.slot, None
            return slot

    def _stream(self, slot: _Slot, spec: dict, job: _PoolJob, skip: int, cancel: threading.Event):
        """The actor's items for this job, cancelling it (and at worst killing it) on ``cancel``."""
        stream = slot.handle.edit.options(num_returns="streaming").remote(spec, job.board, skip)
        cancelled_at = None
        while True:
            if cancel.is_set() and cancelled_at is None:
                cancelled_at = time.monotonic()
                job.board.cancel.remote()
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE:
                log.warning(
                    "job %s: actor %s did not stop within %g s of a cancel; killing it", job.id, slot.name, CANCEL_GRACE
                )
                ray.kill(slot.handle)
                raise ActorLost
            ready, _ = ray.wait([stream], timeout=0.2)
            if not ready:
                continue
            try:
                ref = next(stream)
            except StopIteration:
                return
            try:
                item = ray.get(ref)
            except (RayActorError, ObjectLostError):  # the actor's process, or its node, is gone
                raise ActorLost from None
            yield item

    def _after_edit(self, slot: _Slot, job: _PoolJob) -> None:
        """The actor is free again, or (dead) replaced; what it had taken of the job is pending again."""
        alive = True
        try:
            ray.get(slot.handle.ready.remote(), timeout=30)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            alive = False
        if not alive:
            job.board.release.remote(slot.name)
        with self._cond:
            if alive:
                slot.state = "idle"
            else:
                self._replace(slot)
            self._cond.notify_all()

    def _end(self, job: _PoolJob) -> None:
        job.done = True
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
            self._leave_queue(job)
        try:
            job.board.cancel.remote()  # idle actors stop taking its inversions
        except Exception:  # noqa: BLE001 - Ray is shutting down
            pass
        job.refs.clear()  # its frames leave the object store

    # -- the dispatcher -------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        """Start queued jobs on idle actors; give the other idle actors pending inversions."""
        while True:
            with self._cond:
                if self._closed:
                    return
                waiting = [slot.pending_ref for slot in self._slots if slot.pending_ref is not None]
            try:
                if waiting:
                    ray.wait(waiting, num_returns=1, timeout=0.05)
                else:
                    time.sleep(0.05)
                with self._cond:
                    self._reap()
                    self._assign()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one failure
                log.exception("the pool's dispatcher")
                time.sleep(0.5)

    def _reap(self) -> None:
        """Actors that finished starting or finished an inversion are idle again (or replaced)."""
        for slot in list(self._slots):
            if slot.pending_ref is None:
                continue
            ready, _ = ray.wait([slot.pending_ref], timeout=0)
            if not ready:
                continue
            try:
                value = ray.get(ready[0])
            except RayTaskError as exc:  # the call failed, not the actor (e.g. the job's board is gone)
                log.info("actor %s: %s ended with %s", slot.name, slot.state, _first_line(exc))
                if slot.invert_job is not None:
                    slot.invert_job.board.release.remote(slot.name)
                value = None
            except RayActorError as exc:
                log.warning("actor %s died (while %s): %s", slot.name, slot.state, _first_line(exc))
                if slot.invert_job is not None:
                    slot.invert_job.board.release.remote(slot.name)
                self._replace(slot)
                continue
            except Exception as exc:  # noqa: BLE001 - whatever it was, the inversion is not done
                log.info("actor %s: %s ended with %s", slot.name, slot.state, type(exc).__name__)
                if slot.invert_job is not None:
                    slot.invert_job.board.release.remote(slot.name)
                value = None
            if slot.state == "starting" and not isinstance(value, dict):
                self._replace(slot)
                continue
            if slot.state == "starting":
                slot.info, slot.start_failures = value, 0
                log.info("actor %s: pid %s on %s (%s)", slot.name, value["pid"], value["host"], value["device"])
            elif value is False and slot.invert_job is not None:
                slot.invert_job.next_try = time.monotonic() + RETRY_PENDING
            slot.state, slot.pending_ref, slot.invert_job, slot.seen = "idle", None, None, time.monotonic()
        self._cond.notify_all()

    def _assign(self) -> None:
        """Queued jobs whose frames are all in (in arrival order) to idle actors; then inversions."""
        idle = [slot for slot in self._slots if slot.state == "idle"]
        started = False
        for job in [job for job in self._queue if job.uploaded.is_set()]:
            if not idle:
                break
            slot = idle.pop(0)
            self._queue.remove(job)
            slot.state = "edit"
            job.slot = slot
            started = True
        if started:
            self._tell_positions()
            self._cond.notify_all()
        now = time.monotonic()
        candidates = [job for job in self._jobs if not job.done and job not in self._queue]
        for slot in list(idle):
            ready = [job for job in candidates if job.next_try <= now]
            if not ready:
                break
            idle.remove(slot)
            job = min(ready, key=lambda j: j.next_try)  # the one asked longest ago
            job.next_try = now + RETRY_PENDING / 10  # spread the idle actors over the jobs
            slot.state, slot.invert_job = "invert", job
            slot.pending_ref = slot.handle.invert_one.remote(job.board)
        for slot in idle:  # nothing to do: is it still there?
            if now - slot.seen > PROBE_EVERY:
                slot.state, slot.pending_ref = "probe", slot.handle.ready.remote()

    def _leave_queue(self, job: _PoolJob) -> None:
        """Take ``job`` out of the queue (if it is there) and tell those behind it their new place."""
        if job in self._queue:
            self._queue.remove(job)
            self._tell_positions()

    def _tell_positions(self) -> None:
        for position, job in enumerate(self._queue, start=1):
            if job.position != position:
                job.position = position
                if job.queued is not None:
                    job.queued(position)

    def _new_slot(self) -> _Slot:
        name = f"actor{next(self._names)}"
        handle = self._actor_class.remote(name, self.threads)
        return _Slot(name, handle, handle.ready.remote())

    def _replace(self, slot: _Slot) -> None:
        """A dead actor's place goes to a new one (its models load again on first use), unless
        actors there keep failing to start (a node without the runtime, say): then it stays empty."""
        if slot not in self._slots:
            return
        index = self._slots.index(slot)
        try:
            ray.kill(slot.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass
        failures = slot.start_failures + 1 if slot.state == "starting" else 0
        if failures >= MAX_START_FAILURES:
            slot.state, slot.pending_ref = "failed", None
            log.error(
                "actor %s: %d actors in a row failed to start in its place; leaving it empty", slot.name, failures
            )
            self._cond.notify_all()
            return
        self._slots[index] = self._new_slot()
        self._slots[index].start_failures = failures
        log.info("actor %s is gone; starting %s in its place", slot.name, self._slots[index].name)


def _first_line(exc: BaseException) -> str:
    """Ray's errors carry tracebacks: the failed call's own error, one line, for a log or a message."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # Ray colours its text for a terminal
    return text.splitlines()[0] if text else type(exc).__name__
