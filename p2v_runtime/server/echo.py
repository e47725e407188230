"""The echo job runner: each frame back unchanged, no model; for tests and benchmarks only."""

from __future__ import annotations

import math
import time

from ..errors import EditCancelled, InputError


def echo_job_runner(frames, settings, *, depth=None, progress=None, cancel=None, stats=None, warn=None):
    """Each frame back unchanged, after ``extra["echo_steps"]`` "steps" of ``extra["echo_delay"]`` s.

    No model: tests and ``scripts/bench_protocol.py`` use it to exercise the wire, cancel and
    backpressure. ``extra["echo_fail_at"] = k`` raises ``InputError`` instead of frame k;
    ``extra["echo_warn"]`` is sent as a warning first.
    """
    extra = settings.extra if isinstance(settings.extra, dict) else {}
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
        stats.frames = count
        stats.model_load_seconds = 0.0
        stats.seconds = time.monotonic() - started


def _number(value, default):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else default
