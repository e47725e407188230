"""The sidecar runtime: start it, keep it warm between jobs, connect to it, stop it.

No bpy here (the worker thread and the set-up task use this module). The add-on holds at most one
local runtime process (the "one runtime connection" of docs/design.md) in :data:`_runtime`:

* started with the runtime Python as ``python -m p2v_runtime.cli serve --unix PATH --idle-timeout S``
  where the platform has Unix sockets (Linux, macOS: PATH is in a new folder only this user can
  enter, and the socket is mode 0600, so other local users cannot even connect), else (Windows)
  ``serve --port 0`` on 127.0.0.1; the token is made here and passed in ``P2V_TOKEN`` (never on
  the command line); the socket or port comes from the ready line on its stdout; its stderr goes
  to a log file;
* reused while it runs with the same Python, so models stay loaded between jobs;
* never outlives Blender: it exits on its own after ``--idle-timeout`` seconds unused, the add-on
  stops it on unregister and at exit, and on Linux it also gets SIGTERM when Blender dies
  (``PR_SET_PDEATHSIG``, set by a two-line bootstrap before the runtime's own ``main``).

A remote runtime (host, port, token, and the CA certificate when it serves TLS; or a ``unix:PATH``
host) is only connected to, never started or stopped.
:func:`check_python` reports what a runtime Python has (``p2v_runtime`` version, torch and the
device it finds) without importing torch here. Making a runtime environment is
``runtime_setup.py``'s job.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .errors import P2VAddonError

try:
    from ._vendor import client as wire_client
    from ._vendor import protocol as wire
except ImportError:  # pragma: no cover - a checkout where scripts/build_addon.py has not run
    wire_client = wire = None

READY_TIMEOUT = 120.0  # first start on a cold disk: Python, then the runtime's imports
DEFAULT_IDLE_TIMEOUT = 900.0
_IS_LINUX = sys.platform.startswith("linux")
UNIX_SOCKETS = hasattr(socket, "AF_UNIX") and os.name != "nt"  # the local runtime listens on one where it can
UNIX_PREFIX = "unix:"
_MAX_SOCKET_PATH = 100  # sun_path holds 104 (macOS) to 108 (Linux) bytes
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)

# Run by the runtime Python on Linux before the server starts: SIGTERM when the parent (Blender)
# goes away, even when it is killed; then exactly ``python -m p2v_runtime.cli serve ...``.
_BOOTSTRAP = (
    "import ctypes, os, runpy, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "sys.argv = ['p2v'] + sys.argv[2:]\n"
    "runpy.run_module('p2v_runtime.cli', run_name='__main__', alter_sys=True)\n"
)

# What a runtime Python has; one line of JSON. Torch is imported there, never in Blender.
CHECK_SNIPPET = r"""
import json, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import p2v_runtime
    info["p2v_runtime"] = getattr(p2v_runtime, "__version__", "?")
except Exception as exc:
    info["error"] = "p2v_runtime is not installed in this Python (%s)" % exc
else:
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["device"] = "cuda (%s)" % torch.cuda.get_device_name(0)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            info["device"] = "mps"
        else:
            info["device"] = "cpu"
    except Exception as exc:
        info["error"] = "torch cannot be imported (%s)" % exc
print(json.dumps(info))
"""


def require_wire() -> None:
    if wire_client is None:
        raise P2VAddonError(
            "The add-on's vendored protocol is missing: run scripts/build_addon.py (or install the built extension zip)"
        )


@dataclass
class RuntimeConfig:
    """Where the runtime is: a local Python to start, or a running one to connect to."""

    mode: str = "LOCAL"  # LOCAL or REMOTE
    python: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    token: str = ""
    tls_ca: str = ""  # a remote runtime's CA certificate (PEM): connect with TLS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    log_dir: str = ""
    env: dict = field(default_factory=dict)  # extra environment for a local runtime
    serve_args: tuple = ()  # extra `p2v serve` arguments for a local runtime (tests: --job-runner echo)
    # Where the user sets what a message asks to fix: the preferences in Blender, options headless.
    python_hint: str = "the path in the Pix2Video preferences"
    server_hint: str = "the host and port of the running runtime in the Pix2Video preferences"
    token_hint: str = "the token in the Pix2Video preferences"
    tls_hint: str = "the CA certificate in the Pix2Video preferences"

    @property
    def where(self) -> str:
        """The remote runtime's address: ``host:port``, or the ``unix:PATH`` given as its host."""
        return address_of(self.host, self.port)

    def describe(self) -> str:
        return f"the runtime at {self.where}" if self.mode == "REMOTE" else f"the local runtime ({self.python})"


def address_of(host: str, port: int) -> str:
    if host.startswith(UNIX_PREFIX):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_client(host: str, port: int, token: str, *, tls_ca: str = "", timeout: float, connect_timeout: float):
    """A connected, authenticated client of the runtime at ``host`` (``unix:PATH`` or a TCP host) and ``port``."""
    if host.startswith(UNIX_PREFIX):
        return wire_client.Client(
            None,
            0,
            token,
            unix_path=host[len(UNIX_PREFIX) :],
            timeout=timeout,
            connect_timeout=connect_timeout,
            name="pix2video-blender",
        )
    return wire_client.Client(
        host,
        port,
        token,
        tls_ca=tls_ca or None,
        timeout=timeout,
        connect_timeout=connect_timeout,
        name="pix2video-blender",
    )


def venv_python(folder: str) -> str:
    """The interpreter of a virtual environment folder."""
    if os.name == "nt":
        return os.path.join(folder, "Scripts", "python.exe")
    return os.path.join(folder, "bin", "python")


def resolve_python(path: str, hint: str = "the path in the Pix2Video preferences") -> str:
    """An absolute path to an existing Python, or a :class:`P2VAddonError` that says what to do."""
    if not path:
        raise P2VAddonError(
            "No runtime Python is set: use Preferences > Add-ons > Pix2Video > Set up runtime, "
            "or give the path of a Python that has p2v_runtime installed"
        )
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        expanded = venv_python(expanded)
    found = expanded if os.path.isfile(expanded) else shutil.which(expanded)
    if not found:
        raise P2VAddonError(f"The runtime Python {path} is not found: check {hint}")
    if not os.access(found, os.X_OK):
        raise P2VAddonError(f"The runtime Python {found} is not executable")
    return os.path.abspath(found)


class RuntimeProcess:
    """One ``p2v serve`` subprocess."""

    def __init__(
        self, python: str, idle_timeout: float, log_path: str, env: dict | None = None, serve_args: tuple = ()
    ):
        self.python = python
        self.idle_timeout = idle_timeout
        self.log_path = log_path
        self.env = dict(env or {})
        self.serve_args = tuple(serve_args)
        self.token = secrets.token_urlsafe(32)
        self.host = "127.0.0.1"  # or unix:PATH, once ready
        self.port: int | None = None  # 0 for a Unix socket, once ready
        self.socket_dir: str | None = None  # the private folder of its Unix socket
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._log_handle = None

    def start(self) -> None:
        """Launch the process (returns at once; :meth:`wait_ready` waits for its ready line).

        Called on Blender's main thread, whose lifetime the Linux parent-death signal follows.
        """
        env = dict(os.environ)
        env.update(self.env)
        env["P2V_TOKEN"] = self.token
        env.setdefault("PYTHONUNBUFFERED", "1")
        for name in ("PYTHONHOME", "PYTHONPATH"):  # Blender's own Python settings must not leak in
            env.pop(name, None)
        serve = ["serve", *self._listen_args(), "--idle-timeout", f"{self.idle_timeout:g}", *self.serve_args]
        if _IS_LINUX:
            args = [self.python, "-c", _BOOTSTRAP, str(os.getpid()), *serve]
        else:
            args = [self.python, "-m", "p2v_runtime.cli", *serve]
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        self._log_handle = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log_handle,
                env=env,
                creationflags=NO_WINDOW,
            )
        except OSError as exc:
            self._log_handle.close()
            raise P2VAddonError(f"Cannot start the runtime Python {self.python}: {exc.strerror or exc}") from None
        threading.Thread(target=self._read_stdout, name="p2v-runtime-stdout", daemon=True).start()

    def _listen_args(self) -> list[str]:
        """A Unix socket in a new private folder where there are Unix sockets; else a free port on 127.0.0.1."""
        if UNIX_SOCKETS:
            folder = tempfile.mkdtemp(prefix="p2v-")  # mode 0700: only this user can reach the socket
            path = os.path.join(folder, "runtime.sock")
            if len(path.encode()) <= _MAX_SOCKET_PATH:
                self.socket_dir = folder
                return ["--unix", path]
            os.rmdir(folder)
        return ["--host", "127.0.0.1", "--port", "0"]

    def _read_stdout(self) -> None:
        proc = self.proc
        try:
            for line in proc.stdout:
                self._lines.put(line.decode("utf-8", "replace").strip())
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    def wait_ready(self, cancel: threading.Event | None = None, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the ready line; raise with the reason (from the log) when the process ends first."""
        if self.port is not None:
            return
        deadline = time.monotonic() + timeout
        while True:
            if cancel is not None and cancel.is_set():
                raise P2VAddonError("Cancelled while the runtime was starting")
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise P2VAddonError(f"The runtime did not start within {timeout:g} s; its log: {self.log_path}")
            try:
                line = self._lines.get(timeout=min(0.2, left))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                raise P2VAddonError(self.startup_failure())
            try:
                ready = json.loads(line)
            except ValueError:
                continue
            if isinstance(ready, dict) and ready.get("event") == "ready":
                if ready.get("protocol") != wire.PROTOCOL_VERSION:
                    self.stop()
                    raise P2VAddonError(
                        f"The runtime speaks protocol {ready.get('protocol')}, the add-on {wire.PROTOCOL_VERSION}: "
                        "update the runtime (Set up runtime) or the add-on so they match"
                    )
                if ready.get("unix"):
                    self.host, self.port = UNIX_PREFIX + str(ready["unix"]), 0
                else:
                    self.host = str(ready.get("host") or "127.0.0.1")
                    self.port = int(ready["port"])
                return

    def startup_failure(self) -> str:
        """One line on why the process ended before it was ready."""
        log = self.log_tail()
        if "No module named" in log and "p2v_runtime" in log:
            return (
                f"The runtime Python {self.python} does not have p2v_runtime installed: use Set up runtime "
                "in the Pix2Video preferences, or pip install the runtime into that Python"
            )
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "no output")
        code = self.proc.returncode if self.proc is not None else None
        return f"The runtime stopped while starting (exit status {code}): {last.strip()[:300]}; log: {self.log_path}"

    def log_tail(self, limit: int = 8192) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - limit))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def exit_status(self, wait: float = 0.0) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(wait) if wait else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the runtime to shut down (frees its GPU memory); terminate, then kill, if it will not."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if self.port is not None and wire_client is not None:
                try:
                    with open_client(self.host, self.port, self.token, timeout=2.0, connect_timeout=2.0) as client:
                        client.shutdown(self.token)
                except Exception:  # noqa: BLE001 - best effort: the process is stopped below anyway
                    pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        if proc is not None and proc.stdout is not None:
            try:
                proc.stdout.close()
            except OSError:
                pass
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self.socket_dir is not None and (proc is None or proc.poll() is not None):
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None


_runtime: RuntimeProcess | None = None
_lock = threading.Lock()


def current() -> RuntimeProcess | None:
    """The local runtime process when it is running."""
    with _lock:
        return _runtime if _runtime is not None and _runtime.alive() else None


def ensure_local(config: RuntimeConfig) -> RuntimeProcess:
    """The warm local runtime for ``config.python``, started now if there is none (main thread)."""
    global _runtime
    require_wire()
    python = resolve_python(config.python, config.python_hint)
    with _lock:
        running = _runtime
        if (
            running is not None
            and running.alive()
            and running.python == python
            and running.env == dict(config.env)
            and running.serve_args == tuple(config.serve_args)
        ):
            return running
    if running is not None:
        running.stop()
    log_dir = config.log_dir or os.path.join(os.path.expanduser("~"), ".cache", "p2v")
    process = RuntimeProcess(
        python, config.idle_timeout, os.path.join(log_dir, "runtime.log"), config.env, config.serve_args
    )
    process.start()
    with _lock:
        _runtime = process
    return process


def release() -> bool:
    """Stop the local runtime (frees its memory); True when one was running."""
    global _runtime
    with _lock:
        process, _runtime = _runtime, None
    if process is None:
        return False
    was_alive = process.alive()
    process.stop()
    return was_alive


atexit.register(release)


def connect(config: RuntimeConfig, process: RuntimeProcess | None, cancel: threading.Event | None = None):
    """An open :class:`Client` to the runtime (worker thread): the local ``process`` or the remote one."""
    require_wire()
    tls_ca = ""
    if config.mode == "REMOTE":
        host, port, token, tls_ca = config.host.strip(), int(config.port), config.token, config.tls_ca
        if not host or not (host.startswith(UNIX_PREFIX) or 0 < port < 65536):
            raise P2VAddonError(f"Set {config.server_hint}")
        if tls_ca and host.startswith(UNIX_PREFIX):
            tls_ca = ""  # a Unix socket is local: no TLS to check
    else:
        process.wait_ready(cancel)
        host, port, token = process.host, process.port, process.token
    where = address_of(host, port)
    try:
        return open_client(host, port, token, tls_ca=tls_ca, timeout=60.0, connect_timeout=10.0)
    except wire.RemoteError as exc:
        if exc.code == wire.E_AUTH:
            raise P2VAddonError(f"The runtime at {where} refused the token: check {config.token_hint}") from None
        if exc.code == getattr(wire, "E_TLS", "tls"):
            raise P2VAddonError(
                f"The runtime at {where} speaks TLS: set {config.tls_hint} to the CA certificate that signed its "
                "certificate"
            ) from None
        raise P2VAddonError(f"The runtime at {where} refused the connection: {exc.message}") from None
    except wire.ConnectionLost as exc:
        message = exc.message
        if message.startswith("cannot connect to the runtime at "):
            message = message.split(": ", 1)[-1]
        raise P2VAddonError(f"Cannot connect to the runtime at {where}: {message}") from None
    except (wire.ProtocolError, OSError, ValueError) as exc:
        raise P2VAddonError(f"Cannot talk to the runtime at {where}: {getattr(exc, 'message', None) or exc}") from None


def check_python(python: str, timeout: float = 300.0) -> dict:
    """What ``python`` has, as a dict (``device`` or ``error``); torch is imported only in that process."""
    try:
        python = resolve_python(python)
    except P2VAddonError as exc:
        return {"error": str(exc)}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    try:
        done = subprocess.run(
            [python, "-c", CHECK_SNIPPET],
            capture_output=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            creationflags=NO_WINDOW,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{python} did not answer within {timeout:g} s"}
    except OSError as exc:
        return {"error": f"cannot run {python}: {exc.strerror or exc}"}
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        info = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return {"error": f"{python} failed (exit status {done.returncode}): {tail[-1] if tail else 'no output'}"}
    return info


def describe_check(info: dict) -> str:
    if "error" in info:
        return info["error"]
    return f"p2v_runtime {info.get('p2v_runtime')}, torch {info.get('torch')}, device {info.get('device')}"
