"""*Download Models*: the local runtime fetches its models before the first edit, with progress.

A first edit would otherwise start with a multi-GB download. This runs the runtime's own
``p2v models fetch --json-progress`` with the runtime's Python in a thread and reads its one JSON
object a line (plan, total, progress, done, interrupted, error) into :attr:`ModelFetchTask.text`
and :attr:`ModelFetchTask.progress` for the preferences panel. Cancel interrupts the fetch, which
keeps the files it finished (the next fetch takes the rest). No bpy here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

from .errors import P2VAddonError
from .runtime_process import NO_WINDOW, resolve_python

_task: ModelFetchTask | None = None


def current_task() -> ModelFetchTask | None:
    return _task


def start_task(task: ModelFetchTask) -> ModelFetchTask:
    global _task
    _task = task
    task.start()
    return task


def reset(timeout: float = 10.0) -> None:
    """Stop a running fetch and forget it (the add-on is being disabled)."""
    global _task
    if _task is not None and _task.state == "running":
        _task.cancel()
        _task.join(timeout)
    _task = None


def _gb(size) -> str:
    return f"{(size or 0) / 1e9:.2f} GB"


class ModelFetchTask:
    """``python -m p2v_runtime.cli models fetch`` for ``settings`` (a dict with model, captioner,
    dtype and device), in a thread."""

    def __init__(self, python: str, settings: dict, *, python_hint: str = "the path in the Pix2Video preferences"):
        self.python = python
        self.python_hint = python_hint
        self.settings = dict(settings)
        self.state = "idle"  # running, done, failed, cancelled
        self.text = "Waiting"
        self.progress = 0.0
        self.message = ""
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    def command(self, python: str) -> list[str]:
        s = self.settings
        return [
            python, "-m", "p2v_runtime.cli", "models", "fetch", "--json-progress",
            "--model", s["model"], "--captioner", s["captioner"], "--dtype", s["dtype"], "--device", s["device"],
        ]  # fmt: skip

    def start(self) -> None:
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name="p2v-fetch-models", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT if os.name != "nt" else signal.SIGTERM)  # the fetch stops cleanly

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state != "running"

    def _run(self) -> None:
        error = ""
        try:
            python = resolve_python(self.python, self.python_hint)
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
            self._proc = subprocess.Popen(
                self.command(python), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                env=env, creationflags=NO_WINDOW,
            )  # fmt: skip
            if self._cancel.is_set():
                self.cancel()
            for raw in self._proc.stdout:
                error = self._read(raw.decode("utf-8", "replace")) or error
            code = self._proc.wait()
            tail = self._proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            if self._cancel.is_set() or code == 130:
                self._end("cancelled", "Download stopped; the files already fetched stay (download again for the rest)")
            elif code != 0:
                reason = error or (tail[-1] if tail else f"exit status {code}")
                self._end("failed", f"Download failed: {reason}")
            else:
                self.progress = 1.0
                self._end("done", "Models ready: " + self.text)
        except P2VAddonError as exc:
            self._end("failed", str(exc))
        except OSError as exc:
            self._end("failed", f"Cannot run {self.python}: {exc.strerror or exc}")

    def _read(self, line: str) -> str:
        """Take one progress line; return an error message when it is one."""
        try:
            event = json.loads(line)
        except ValueError:
            return ""
        if not isinstance(event, dict):
            return ""
        kind = event.get("event")
        if kind == "total":
            self.text = f"{_gb(event.get('download_bytes'))} to download ({_gb(event.get('free_bytes'))} free)"
        elif kind == "progress":
            done, total = event.get("done") or 0, event.get("total") or 0
            self.progress = done / total if total else 0.0
            left = event.get("seconds_left")
            rate = (event.get("rate") or 0) / 1e6
            self.text = f"{event.get('model')}: {_gb(done)} of {_gb(total)}, {rate:.1f} MB/s" + (
                f", {left:.0f} s left" if isinstance(left, (int, float)) else ""
            )
        elif kind == "done":
            self.text = f"{event.get('model')} ({event.get('dtype')}) in {event.get('folder')}"
        elif kind == "error":
            return str(event.get("message", ""))
        return ""

    def _end(self, state: str, message: str) -> None:
        self.message = message
        self.state = state
