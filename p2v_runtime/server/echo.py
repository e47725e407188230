"""The echo job runner: each frame back unchanged, no model; for tests and benchmarks only.

It exercises the wire, cancel and backpressure without a model. Only the hidden process flag
``p2v serve --job-runner echo``, or ``Server(job_runner=echo_job_runner)`` in-process, selects
it: a server started without them runs the real edit, whatever a client sends.

What it does is read from ``key=value`` words in the job's prompt, so tests steer it with an
ordinary setting::

    "echo steps=3 delay=0.05 fail_at=2 warn=frames were resized"

``steps=N``
    fake denoising steps per frame, each reported as progress (1..1000, default 1);
``delay=S``
    seconds each step sleeps (0..1, default 0);
``fail_at=K``
    raise ``InputError`` instead of returning frame K;
``warn=TEXT``
    send TEXT as a warning before the first frame. TEXT runs to the end of the prompt, so it
    may hold spaces (or newlines, which the warning message flattens), and it comes last.

When the client asks for the depth each frame was edited with, the echo "depth" is the frame's
brightness at an eighth of its size (what a model's latent-size depth map would be), in [0, 1].

Other words (such as the leading "echo") are ignored, and so is a value that does not parse;
numbers out of range are clamped.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from ..errors import EditCancelled, InputError

_WARN = re.compile(r"(?:^|\s)warn=(.*)\Z", re.DOTALL)


@dataclass(frozen=True)
class EchoOptions:
    steps: int = 1
    delay: float = 0.0
    fail_at: int | None = None
    warn: str | None = None


def echo_options(prompt: str) -> EchoOptions:
    """The options in ``prompt`` (see the module docstring), bounded."""
    match = _WARN.search(prompt)
    words = prompt[: match.start()] if match else prompt
    values = dict(word.partition("=")[::2] for word in words.split() if "=" in word)
    return EchoOptions(
        steps=int(min(max(_number(values.get("steps"), 1), 1), 1000)),
        delay=min(max(_number(values.get("delay"), 0.0), 0.0), 1.0),
        fail_at=_integer(values.get("fail_at")),
        warn=match.group(1) if match else None,
    )


def echo_job_runner(
    frames, settings, *, depth=None, progress=None, cancel=None, stats=None, warn=None, depth_sink=None, preview=False
):
    """Yield ``(index, frame)`` for every frame, as the options in ``settings.prompt`` say."""
    options = echo_options(settings.prompt)
    if warn is not None and options.warn:
        warn(options.warn)
    count = len(frames)
    started = time.monotonic()
    indices = [settings.anchor_index(count)] if preview else range(count)  # a preview: the anchor only
    edited = len(indices)
    for position, index in enumerate(indices):
        image = frames.read(index)
        if depth is not None:
            depth.read(index)
        if options.fail_at == index:
            raise InputError(f"echo job told to fail at frame {index}")
        if depth_sink is not None:
            depth_sink(index, _brightness_eighth(image))
        for step in range(options.steps):
            if cancel is not None and cancel.is_set():
                raise EditCancelled(position)
            if options.delay:
                time.sleep(options.delay)
            if progress is not None:
                progress("edit", position * options.steps + step + 1, edited * options.steps)
        yield index, image
    if stats is not None:
        stats.frames = edited
        stats.model_load_seconds = 0.0
        stats.seconds = time.monotonic() - started


def _brightness_eighth(image):
    import numpy as np

    rgb = np.asarray(image, dtype=np.float32)
    return np.ascontiguousarray(rgb[::8, ::8].mean(axis=2) / 255.0)


def _number(text: str | None, default: float) -> float:
    try:
        value = float(text) if text is not None else default
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def _integer(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
