"""Making the runtime's environment ("Set up runtime") and checking a runtime, in background threads.

:class:`SetupTask` makes a virtual environment with a chosen Python and pip-installs the runtime
into it, in a thread, with progress, a log and cancel. The UI reads the one set-up task and the
last check's text from here (:func:`current_task`, :func:`check_text`); no bpy in this module.
"""

from __future__ import annotations

import collections
import os
import subprocess
import threading

from .errors import P2VAddonError
from .runtime_process import NO_WINDOW, check_python, describe_check, resolve_python, venv_python

_task: SetupTask | None = None
_check = {"text": "", "thread": None}


def current_task() -> SetupTask | None:
    """The set-up started last (running or finished), if any."""
    return _task


def start_task(task: SetupTask) -> SetupTask:
    global _task
    _task = task
    task.start()
    return task


def check_text() -> str:
    return _check["text"]


def set_check_text(text: str) -> None:
    _check["text"] = text


def check_running() -> bool:
    thread = _check["thread"]
    return thread is not None and thread.is_alive()


def start_check(target, *args) -> threading.Thread:
    """Run ``target(*args)`` (which reports through :func:`set_check_text`) in a thread."""
    _check["text"] = "Checking..."
    thread = threading.Thread(target=target, args=args, name="p2v-check", daemon=True)
    _check["thread"] = thread
    thread.start()
    return thread


def reset(timeout: float = 10.0) -> None:
    """Stop a running set-up and forget the state (the add-on is being disabled)."""
    global _task
    if _task is not None and _task.state == "running":
        _task.cancel()
        _task.join(timeout)
    _task = None
    _check["text"] = ""


class SetupTask:
    """Create a venv with ``base_python`` and pip-install the runtime into it, in a thread.

    ``packages`` is what pip installs (e.g. the bundled wheel with ``[runtime]``); a torch index
    URL installs torch from there first (CUDA or ROCm builds). Progress is ``step/steps`` plus the
    latest pip line; the whole output goes to ``log_path`` and the last lines to :attr:`lines`.
    """

    def __init__(
        self,
        base_python: str,
        venv_dir: str,
        packages: list[str],
        *,
        torch_index_url: str = "",
        pip_args: list[str] | None = None,
        log_path: str = "",
        env: dict | None = None,
    ):
        self.base_python = base_python
        self.venv_dir = venv_dir
        self.packages = list(packages)
        self.torch_index_url = torch_index_url.strip()
        self.pip_args = list(pip_args or [])
        self.log_path = log_path or os.path.join(venv_dir + "-setup.log")
        self.env = dict(env or {})
        self.lines: collections.deque = collections.deque(maxlen=200)
        self.step = 0
        self.steps = 3 + bool(self.torch_index_url)
        self.stage = "waiting"
        self.state = "idle"  # running, done, failed, cancelled
        self.result: dict = {}
        self.message = ""
        self._cancel = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._log = None

    @property
    def python(self) -> str:
        return venv_python(self.venv_dir)

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.steps)

    def start(self) -> None:
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name="p2v-setup", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state != "running"

    def _say(self, text: str) -> None:
        self.lines.append(text)
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()

    def _run(self) -> None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "w", encoding="utf-8")
            base = resolve_python(self.base_python)
            steps = [("Creating the virtual environment", [base, "-m", "venv", self.venv_dir])]
            pip = [
                self.python,
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                *self.pip_args,
            ]
            if self.torch_index_url:
                steps.append(("Installing torch", [*pip, "torch", "--index-url", self.torch_index_url]))
            steps.append(("Installing the runtime", [*pip, *self.packages]))
            for stage, command in steps:
                self.stage = stage
                self._say(f"== {stage}: {' '.join(command)}")
                self._run_command(command)
                self.step += 1
            self.stage = "Checking the runtime"
            self._say(f"== {self.stage}")
            info = check_python(self.python)
            self.result = info
            self.step += 1
            if "error" in info:
                raise P2VAddonError(f"The runtime was installed but does not work: {info['error']}")
            self.message = f"Runtime ready: {describe_check(info)}"
            self.state = "done"
        except _SetupCancelled:
            self.message = "Set-up cancelled"
            self.state = "cancelled"
        except P2VAddonError as exc:
            self.message = str(exc)
            self.state = "failed"
        except Exception as exc:  # noqa: BLE001 - keep the UI informed whatever happens
            self.message = f"Set-up failed: {type(exc).__name__}: {exc}"
            self.state = "failed"
        finally:
            self._say(self.message)
            if self._log is not None:
                self._log.close()
                self._log = None

    def _run_command(self, command: list[str]) -> None:
        if self._cancel.is_set():
            raise _SetupCancelled()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            self._proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                creationflags=NO_WINDOW,
            )
        except OSError as exc:
            raise P2VAddonError(f"Cannot run {command[0]}: {exc.strerror or exc}") from None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._say(line)
        code = self._proc.wait()
        if self._cancel.is_set():
            raise _SetupCancelled()
        if code != 0:
            last = next((line for line in reversed(self.lines) if line.strip() and not line.startswith("==")), "")
            raise P2VAddonError(f"{self.stage} failed (exit status {code}): {last[:300]}; log: {self.log_path}")


class _SetupCancelled(Exception):
    pass
