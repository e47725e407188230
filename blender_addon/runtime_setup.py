"""Making the runtime's environment ("Set up runtime") and checking a runtime, in background threads.

:class:`SetupTask` makes a virtual environment with a chosen Python and pip-installs the runtime
into it, in a thread, with progress, a log and cancel: first torch, the build chosen for this
machine (``torch_build.py``: PyPI's default Linux torch is a 2.5 GB CUDA build even without a
GPU), then the runtime with its other dependencies. The UI reads the one set-up task and the last
check's text from here (:func:`current_task`, :func:`check_text`); no bpy in this module.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import threading

from . import torch_build
from .errors import P2VAddonError
from .runtime_process import NO_WINDOW, check_python, describe_check, resolve_python, venv_python

# The torch version a Python has, without importing torch (fast; empty output when there is none).
TORCH_VERSION_SNIPPET = (
    "import importlib.metadata as m\ntry:\n    print(m.version('torch'))\nexcept m.PackageNotFoundError:\n    pass\n"
)
# pip's "Downloading torch-2.5.1+cpu-...whl (174.7 MB)" lines (with or without a URL before the name).
_DOWNLOADING = re.compile(r"^\s*Downloading \S+ \((\d+(?:\.\d+)?) (GB|MB|kB|bytes)\)\s*$")
_UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "bytes": 1.0}

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

    ``packages`` is what pip installs (e.g. the bundled wheel with ``[runtime]``). With
    ``detect_torch`` (the operator) or a ``machine`` (the tests' fake one), torch is installed
    first as its own step, from the index :func:`torch_build.choose_torch` picks for the machine;
    a ``torch_index_url`` (the preference) always wins. :attr:`announcement` says which build and
    about how much it downloads, before pip starts (it is also the log's first line). Without
    either, torch comes with the runtime's dependencies (or not at all with ``--no-deps``).
    Progress is ``step/steps`` plus the latest pip line; the whole output goes to ``log_path``
    and the last lines to :attr:`lines`.
    """

    def __init__(
        self,
        base_python: str,
        venv_dir: str,
        packages: list[str],
        *,
        torch_index_url: str = "",
        detect_torch: bool = False,
        machine: torch_build.Machine | None = None,
        pip_args: list[str] | None = None,
        log_path: str = "",
        env: dict | None = None,
    ):
        self.base_python = base_python
        self.venv_dir = venv_dir
        self.packages = list(packages)
        self.torch_index_url = torch_index_url.strip()
        self.detect_torch = detect_torch or machine is not None
        self.machine = machine
        self.torch: torch_build.TorchChoice | None = None  # the build chosen, once the thread has
        self.announcement = ""  # "Installing torch, CPU build (no NVIDIA driver found), about 0.2 GB"
        self.pip_args = list(pip_args or [])
        self.log_path = log_path or os.path.join(venv_dir + "-setup.log")
        self.env = dict(env or {})
        self.lines: collections.deque = collections.deque(maxlen=200)
        self.step = 0
        self.steps = 3 + bool(self.torch_index_url or self.detect_torch)
        self.stage = "waiting"
        self.state = "idle"  # running, done, failed, cancelled
        self.result: dict = {}
        self.message = ""
        self._cancel = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._log = None
        self._downloaded = 0.0  # bytes pip said it downloaded in the current command

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

    def _choose_torch(self) -> torch_build.TorchChoice | None:
        """The torch build to install first (probing the machine here, in the thread: nvidia-smi
        may take seconds), or None when torch just comes with the runtime's dependencies."""
        if not (self.detect_torch or self.torch_index_url):
            return None
        machine = self.machine
        if machine is None:  # the preference's URL wins: then the platform is all there is to know
            machine = torch_build.this_platform() if self.torch_index_url else torch_build.probe_machine()
        return torch_build.choose_torch(machine, self.torch_index_url)

    def _run(self) -> None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "w", encoding="utf-8")
            self.stage = "Choosing the torch build"
            self.torch = self._choose_torch()
            if self.torch is not None:
                self.announcement = self.torch.announcement()
                self._say(self.announcement)
                self._say(f"   from {self.torch.index_url or 'PyPI (the default index)'}; sizes are estimates")
                for note in self.torch.details:
                    self._say(f"   {note}")
            base = resolve_python(self.base_python)
            self.stage = "Creating the virtual environment"
            self._run_stage([base, "-m", "venv", self.venv_dir])
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
            pins = []
            if self.torch is not None:
                self.stage = "Installing torch"
                pins = self._install_torch(pip)
            self.stage = "Installing the runtime"
            self._run_stage([*pip, *self.packages, *pins])
            self.stage = "Checking the runtime"
            self._say(f"== {self.stage}")
            info = check_python(self.python)
            self.result = info
            self.step += 1
            if "error" in info:
                raise P2VAddonError(f"The runtime was installed but does not work: {info['error']}")
            self.message = f"Runtime ready: {describe_check(info)}{self._device_warning(info)}"
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

    def _run_stage(self, command: list[str]) -> None:
        self._say(f"== {self.stage}: {' '.join(command)}")
        self._run_command(command)
        self.step += 1

    def _install_torch(self, pip: list[str]) -> list[str]:
        """Install the chosen torch build; return the pin that keeps it while the runtime installs.

        A torch of another build already in the venv (an earlier set-up's CUDA build, say) is
        removed first: pip would count it as satisfying ``torch`` and keep it. The pin
        (``torch==2.5.1+cpu``) makes pip fail clearly rather than swap in PyPI's default build
        when a dependency wants a newer torch than the chosen index has.
        """
        choice = self.torch
        before = self._torch_version()
        if before and choice.label is not None and _label(before) != choice.label:
            command = [self.python, "-m", "pip", "uninstall", "--yes", "torch"]
            self._say(f"== Removing torch {before}, another build than the one chosen: {' '.join(command)}")
            self._run_command(command)
        index = ["--index-url", choice.index_url] if choice.index_url else []
        self._run_stage([*pip, "torch", *index])
        after = self._torch_version()
        got = f", {self._downloaded / 1e9:.2f} GB downloaded" if self._downloaded else ""
        self._say(f"torch {after or '(version not readable)'} installed{got}")
        return [f"torch=={after}"] if after else []

    def _torch_version(self) -> str:
        """The torch version in the venv ("2.5.1+cpu"), empty when none or it cannot tell."""
        try:
            done = subprocess.run(
                [self.python, "-c", TORCH_VERSION_SNIPPET],
                capture_output=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                creationflags=NO_WINDOW,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        lines = done.stdout.decode("utf-8", "replace").split()
        return lines[-1] if done.returncode == 0 and lines else ""

    def _device_warning(self, info: dict) -> str:
        """A GPU build that finds no GPU says so: the set-up worked but the edits will run on the CPU."""
        family = torch_build.build_family(self.torch.label) if self.torch is not None else ""
        if family in ("cuda", "rocm") and not str(info.get("device", "")).startswith("cuda"):
            return f" (the {family.upper()} build is installed but torch finds no GPU: see the log)"
        return ""

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _run_command(self, command: list[str]) -> None:
        if self._cancel.is_set():
            raise _SetupCancelled()
        self._downloaded = 0.0
        try:
            self._proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                creationflags=NO_WINDOW,
            )
        except OSError as exc:
            raise P2VAddonError(f"Cannot run {command[0]}: {exc.strerror or exc}") from None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._say(line)
                size = _DOWNLOADING.match(line)
                if size:
                    self._downloaded += float(size.group(1)) * _UNITS[size.group(2)]
        code = self._proc.wait()
        if self._cancel.is_set():
            raise _SetupCancelled()
        if code != 0:
            last = next((line for line in reversed(self.lines) if line.strip() and not line.startswith("==")), "")
            raise P2VAddonError(f"{self.stage} failed (exit status {code}): {last[:300]}; log: {self.log_path}")


def _label(version: str) -> str:
    """The local version label of a torch version: "+cpu" of "2.5.1+cpu", "" of "2.5.1"."""
    return "+" + version.split("+", 1)[1] if "+" in version else ""


class _SetupCancelled(Exception):
    pass
