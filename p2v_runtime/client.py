"""Client for ``p2v serve``: standard library only, so the Blender add-on can vendor it.

The add-on copies this file and ``protocol.py`` side by side into its package; the import below
finds the protocol both there and in ``p2v_runtime``. Frames go out as bytes-like objects
(``bytes``, ``bytearray``, ``memoryview``, or anything with the buffer protocol such as a numpy
array) of ``height * width * 3`` uint8 RGB, depth as ``height * width`` float32 (little-endian).
Results come back as ``bytearray`` objects of the same layout.

Addresses are ``HOST:PORT`` or ``unix:PATH`` (a runtime started with ``p2v serve --unix PATH``).
With ``tls_ca`` (a PEM file of the CA that signed the runtime's certificate) the connection is
TLS, and the runtime's certificate must match the host connected to.

Typical use::

    with Client.connect("127.0.0.1:50123", token) as client:
        for message in client.run_job(settings, frames, width, height):
            if message.type == "result": ...   # message["index"], message.payload
            elif message.type == "progress": ...
        # the last message is "done" (stats) or "cancelled"; an "error" raises RemoteError
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import threading
import time

try:
    from . import protocol as P
except ImportError:  # vendored as plain top-level modules
    import protocol as P  # type: ignore[no-redef]

ConnectionLost = P.ConnectionLost
RemoteError = P.RemoteError
ProtocolError = P.ProtocolError
EditStats = P.EditStats

DEFAULT_PORT_HINT = "HOST:PORT, e.g. 127.0.0.1:50123, or unix:PATH"
UNIX_PREFIX = "unix:"
_POLL = 0.1  # seconds between looks at the cancel flag while waiting for the server
# edit_on_server reports a pool's queue through its progress callback as
# progress(QUEUE_STAGE, position, 0): position 1 is next to start; total 0 (it counts nothing).
QUEUE_STAGE = "queue"


class ServerBusy(RemoteError):
    """The runtime is running another job."""


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to (host, port), with a clear error for anything else."""
    text = address.strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad server address {address!r}: expected {DEFAULT_PORT_HINT}")
    return host, int(port)


def token_from_env(token_file: str | None = None) -> str:
    """The token from ``token_file`` when given, else ``$P2V_TOKEN`` (empty when neither).

    ``OSError`` when the file cannot be read, ``ValueError`` (one line) when the token is not UTF-8 text.
    """
    if token_file:
        with open(token_file, "rb") as handle:
            data = handle.read()
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"the token file {token_file} is not UTF-8 text") from None
    token = os.environ.get("P2V_TOKEN", "").strip()
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("P2V_TOKEN is not UTF-8 text") from None
    return token


class Client:
    """One connection to the runtime. Not for concurrent use, except :meth:`cancel` from any thread."""

    def __init__(
        self,
        host: str | None,
        port: int,
        token: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        name: str = "p2v-client",
        tls_ca: str | None = None,
        unix_path: str | None = None,
    ):
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.timeout = timeout
        self.results_received = 0
        self.server_info: dict = {}
        self._send_lock = threading.RLock()
        self._job_width = self._job_height = 0
        self._cancel_sent = False
        self._closed = False
        if tls_ca and unix_path is not None:
            raise ValueError("a unix: address is local and needs no TLS: drop the CA certificate")
        sock = self._open(connect_timeout)
        if tls_ca:
            sock = self._start_tls(sock, tls_ca, connect_timeout)
        self.sock = sock
        self.sock.settimeout(timeout)
        try:
            self._send({"type": "hello", "token": token, "protocol": P.PROTOCOL_VERSION, "client": name})
            reply = self._expect("hello_ok", timeout)
        except BaseException:
            self.close()
            raise
        self.server_info = reply.header

    def _open(self, connect_timeout: float):
        try:
            if self.unix_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(connect_timeout)
                    sock.connect(self.unix_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to the runtime at {self.where}: {exc.strerror or exc}") from None
        P.tune_socket(sock)
        return sock

    def _start_tls(self, sock, tls_ca: str, connect_timeout: float):
        """The TLS handshake, the runtime's certificate checked against ``tls_ca`` and the host name."""
        try:
            try:
                context = P.tls_client_context(tls_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConnectionLost(
                    f"cannot use the CA certificate {tls_ca}: {getattr(exc, 'strerror', None) or exc}"
                ) from None
            try:
                return P.TLSSocket.wrap(
                    sock,
                    context,
                    server_side=False,
                    server_hostname=self.host,
                    deadline=time.monotonic() + connect_timeout,
                )
            except ssl.SSLCertVerificationError as exc:
                raise ConnectionLost(
                    f"the runtime at {self.where} has a certificate that {tls_ca} does not vouch for: "
                    f"{exc.verify_message or exc.reason}"
                ) from None
            except TimeoutError:
                raise ConnectionLost(
                    f"no TLS handshake with the runtime at {self.where} within {connect_timeout:g} s"
                ) from None
            except (ssl.SSLError, OSError) as exc:
                raise ConnectionLost(
                    f"TLS with the runtime at {self.where} failed ({getattr(exc, 'reason', None) or exc}): is it "
                    "started with --tls-cert?"
                ) from None
        except BaseException:
            sock.close()
            raise

    @classmethod
    def connect(cls, address: str, token: str | None = None, **kwargs) -> Client:
        """A client of ``address`` (``HOST:PORT`` or ``unix:PATH``); the token defaults to ``$P2V_TOKEN``."""
        token = token_from_env() if token is None else token
        text = address.strip()
        if text.startswith(UNIX_PREFIX):
            path = text[len(UNIX_PREFIX) :]
            if not path:
                raise ValueError(f"bad server address {address!r}: expected {DEFAULT_PORT_HINT}")
            return cls(None, 0, token, unix_path=path, **kwargs)
        host, port = parse_address(address)
        return cls(host, port, token, **kwargs)

    @property
    def where(self) -> str:
        if self.unix_path is not None:
            return UNIX_PREFIX + self.unix_path
        return f"[{self.host}]:{self.port}" if ":" in str(self.host) else f"{self.host}:{self.port}"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ------------------------------------------------------------------------------

    def ping(self) -> float:
        """Round trip of a ping, in seconds."""
        started = time.perf_counter()
        self._send({"type": "ping", "t": time.time()})
        self._expect("pong", self.timeout)
        return time.perf_counter() - started

    def submit(
        self,
        settings,
        frames: int,
        width: int,
        height: int,
        depth: bool = False,
        send_depth: bool = False,
        preview: bool = False,
        queue: bool = True,
    ) -> dict:
        """Announce a job; return the ``job_ok`` header (``window``: frames allowed in flight).

        ``send_depth`` asks for a ``depth_used`` message before each result: the depth that frame
        was edited with (what ``--save-depth`` writes). ``preview`` asks for the anchor (frame 0)
        only; the other frames still give the clip's depth range. ``queue`` asks a pool
        (``p2v serve --ray``) for ``queued`` messages while the job waits for a free GPU; a server
        without a queue ignores it.
        """
        header = {
            "type": "job",
            "settings": settings_to_wire(settings),
            "frames": int(frames),
            "width": int(width),
            "height": int(height),
            "depth": bool(depth),
        }
        if send_depth:
            header["send_depth"] = True  # only when asked: older runtimes ignore the field anyway
        if preview:
            header["preview"] = True
        if queue:
            header["queue"] = True
        self._send(header)
        self._job_width, self._job_height = int(width), int(height)
        self.results_received = 0
        self._cancel_sent = False
        return self._expect("job_ok", self.timeout).header

    def send_frame(self, index: int, data, width: int | None = None, height: int | None = None) -> None:
        self._send_image("frame", index, data, width, height)

    def send_depth(self, index: int, data, width: int | None = None, height: int | None = None) -> None:
        self._send_image("depth", index, data, width, height)

    def cancel(self) -> None:
        """Ask the runtime to stop the running job (safe from any thread); it answers ``cancelled``.

        Frames of the job are no longer sent after this, even by a :meth:`run_job` in another thread.
        """
        with self._send_lock:
            self._cancel_sent = True
            self._send({"type": "cancel"}, locked=True)

    def shutdown(self, token: str) -> None:
        """Stop the runtime (it answers ``bye`` and exits)."""
        self._send({"type": "shutdown", "token": token})
        try:
            self._expect("bye", self.timeout)
        except ConnectionLost:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    # --- a whole job ---------------------------------------------------------------------------

    def run_job(
        self,
        settings,
        frames,
        width: int,
        height: int,
        *,
        count: int | None = None,
        depth=None,
        cancel: threading.Event | None = None,
        window: int | None = None,
        send_depth: bool = False,
        preview: bool = False,
    ):
        """Submit a job, stream its frames, and yield what comes back, ending with done/cancelled.

        ``frames`` (and ``depth``) are sequences of bytes-like objects or callables ``f(i)``
        returning one; at most ``window`` frames are sent ahead of the server's ``received``.
        Yields ``queued`` (a pool's place in its queue, see :func:`queue_text`), ``progress``,
        ``warning`` and ``result`` messages (payload: bytearray RGB), with ``send_depth`` also
        ``depth_used`` (payload: HxW float32), then ``done`` or ``cancelled``.
        Setting ``cancel`` sends ``cancel`` and the iteration ends with the ``cancelled`` message
        (or ``done`` if the job finished first). A job error raises :class:`RemoteError` and leaves
        the connection ready for the next job; a lost connection raises :class:`ConnectionLost`
        (results already yielded stay with the caller). Leaving
        the iteration early, or an exception from ``frames``, closes the connection, which
        cancels the job on the server.
        """
        if count is None:
            count = len(frames)
        get_frame = frames if callable(frames) else frames.__getitem__
        get_depth = None if depth is None else (depth if callable(depth) else depth.__getitem__)
        job_ok = self.submit(settings, count, width, height, depth is not None, send_depth, preview)
        window = max(1, min(window or job_ok["window"], job_ok["window"]))
        ended = False  # the server ended the job: the connection can take the next one
        try:
            sent = acked = 0
            cancel_sent = self._cancel_sent
            while True:
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    self.cancel()
                cancel_sent = self._cancel_sent  # also when another thread called cancel()
                if not cancel_sent and sent < count and sent - acked < window:
                    self.send_frame(sent, get_frame(sent), width, height)
                    if get_depth is not None:
                        self.send_depth(sent, get_depth(sent), width, height)
                    sent += 1
                    wait = 0.0  # only take what has already arrived, then send on
                else:
                    wait = _POLL if cancel is not None and not cancel_sent else None
                message = self.next_message(wait)
                if message is None:
                    continue
                kind = message.type
                if kind == "received":
                    acked = max(acked, message["index"] + 1)
                elif kind in ("queued", "progress", "result", "warning", "depth_used"):
                    yield message
                elif kind in ("done", "cancelled"):
                    ended = True
                    yield message
                    return
                elif kind != "pong":
                    raise ProtocolError(P.E_UNEXPECTED, f"unexpected {kind} message during a job from {self.where}")
        except RemoteError as exc:
            ended = not exc.fatal
            raise
        finally:
            if not ended:
                # Abandoned (the caller stopped iterating, a frame could not be read, the link
                # failed): closing the connection makes the server cancel the job.
                self.close()

    # --- reading -------------------------------------------------------------------------------

    def next_message(self, timeout: float | None = None) -> P.Message | None:
        """The next message, or None if none starts within ``timeout`` (None: wait for ever).

        ``error`` messages raise :class:`RemoteError` (:class:`ServerBusy` for ``busy``).
        """
        if self._closed:
            raise self._lost("the connection was closed on this side")
        try:
            if not P.wait_readable(self.sock, timeout):
                return None
            limit = (
                max(self._job_width * self._job_height * 3, P.MAX_DEPTH_USED_BYTES)
                if self._job_width
                else P.MAX_PAYLOAD_BYTES
            )
            head = P.read_head(self.sock, max_payload=limit)
            if head is None:
                raise self._lost("the runtime closed the connection")
            header, payload_len, _ = head
            if header["type"] not in P.SERVER_TYPES:
                raise ProtocolError(P.E_UNEXPECTED, f"the runtime sent a {header['type']} message")
            payload = b""
            if payload_len:
                if header["type"] == "depth_used":
                    if payload_len > P.MAX_DEPTH_USED_BYTES:
                        raise ProtocolError(P.E_BAD_SHAPE, f"depth_used of shape {header['shape']} is over the limit")
                elif header["type"] != "result" or header["shape"] != [self._job_height, self._job_width, 3]:
                    raise ProtocolError(
                        P.E_BAD_SHAPE,
                        f"result of shape {header.get('shape')} for a {self._job_width}x{self._job_height} job",
                    )
                payload = P.recv_exact(self.sock, payload_len)
        except ConnectionLost:
            raise
        except P.ProtocolError as exc:
            if exc.code in (P.E_TRUNCATED,):
                raise self._lost(exc.message) from None
            raise
        except (OSError, ValueError) as exc:  # ValueError: the socket was closed by another thread
            raise self._lost(f"connection error: {getattr(exc, 'strerror', None) or exc}") from None
        message = P.Message(header, payload)
        if message.type == "result":
            self.results_received += 1
        elif message.type == "error":
            cls = ServerBusy if header["code"] == P.E_BUSY else RemoteError
            raise cls(header["code"], header["message"], fatal=header["fatal"])
        return message

    def _expect(self, kind: str, timeout: float) -> P.Message:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            message = self.next_message(max(0.0, left))
            if message is None:
                raise ConnectionLost(
                    f"no {kind} from the runtime at {self.where} within {timeout:g} s", self.results_received
                )
            if message.type == kind:
                return message
            if message.type in ("progress", "received", "pong", "warning", "queued"):
                continue
            raise ProtocolError(P.E_UNEXPECTED, f"expected {kind} from the runtime, got {message.type}")

    def _lost(self, why: str) -> ConnectionLost:
        return ConnectionLost(
            f"lost the connection to the runtime at {self.where} after {self.results_received} result frame(s): {why}",
            self.results_received,
        )

    # --- writing -------------------------------------------------------------------------------

    def _send_image(self, kind: str, index: int, data, width, height) -> None:
        width = self._job_width if width is None else int(width)
        height = self._job_height if height is None else int(height)
        header = P.frame_header(kind, index, width, height)
        view = _as_bytes_view(data)
        expected = P.payload_size(header)
        if view.nbytes != expected:
            raise ValueError(
                f"{kind} {index} has {view.nbytes} bytes; {width}x{height} {header['dtype']} needs {expected}"
            )
        with self._send_lock:
            if not self._cancel_sent:  # checked under the lock: never a frame after our cancel
                self._send(header, view, locked=True)

    def _send(self, header: dict, payload=None, *, locked: bool = False) -> None:
        if self._closed:
            raise self._lost("the connection was closed on this side")
        try:
            if locked:
                P.send_message(self.sock, header, payload)
            else:
                with self._send_lock:
                    P.send_message(self.sock, header, payload)
        except OSError as exc:
            # The server may have said why before closing: report its error if one is waiting.
            reason = self._pending_error()
            if reason is not None:
                raise reason from None
            raise self._lost(f"sending failed: {exc.strerror or exc}") from None

    def _pending_error(self) -> RemoteError | None:
        try:
            while P.wait_readable(self.sock, 0.2):
                head = P.read_head(self.sock)
                if head is None:
                    return None
                header, payload_len, _ = head
                if payload_len:
                    return None
                if header["type"] == "error":
                    return RemoteError(header["code"], header["message"], fatal=header["fatal"])
        except (OSError, ValueError, P.ProtocolError):
            return None
        return None


def queue_text(position: int) -> str:
    """What a front end shows for a job waiting in a pool's queue (``queued {position}``)."""
    if position <= 1:
        return "queued, next to start"
    return f"queued, {position - 1} ahead"


def settings_to_wire(settings) -> dict:
    """The ``job`` message's settings: an ``EditSettings`` (the fields the runtime uses) or a plain dict."""
    if hasattr(settings, "to_wire"):
        settings = settings.to_wire()
    return dict(settings)


def _as_bytes_view(data) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if (view.ndim != 1 or view.format != "B") else view


# --- front ends ---------------------------------------------------------------------------------


def edit_on_server(
    address: str,
    frames: P.Frames,
    settings,
    *,
    depth: P.Frames | None = None,
    progress=None,
    cancel=None,
    stats: P.EditStats | None = None,
    token: str | None = None,
    warn=None,
    depth_sink=None,
    preview: bool = False,
    tls_ca: str | None = None,
) -> RemoteEdit:
    """``edit_clip`` run by a server: same arguments, iterates ``(index, image)`` in order.

    ``frames``/``depth`` are the :class:`protocol.Frames` objects ``edit_clip`` takes.
    Images are numpy arrays when numpy is importable, else ``bytearray`` RGB. The server's
    ``done`` stats fill ``stats``, an :class:`EditStats` (a new one when not given), which is
    also the returned object's ``.stats``: what ``edit_clip(..., stats=)`` does locally.
    The server's warnings go to ``warn(message)`` (default: stderr, as ``edit_clip`` does), and
    with ``depth_sink`` each frame's depth (latent size, [0, 1]) to ``depth_sink(index, depth)``;
    ``preview`` edits the anchor only, as ``edit_clip`` does. On a pool (``p2v serve --ray``) a
    job waiting for a GPU is reported as ``progress("queue", position, 0)`` (1: next to start;
    :func:`queue_text` says it in words). The
    token is ``token`` or ``$P2V_TOKEN``; ``tls_ca`` makes the connection TLS (see :class:`Client`).
    Errors are raised as the matching ``P2VError`` when
    ``p2v_runtime`` is importable (a cancel as ``EditCancelled``), else as :class:`ProtocolError`.
    """
    options = dict(
        depth=depth,
        progress=progress,
        cancel=cancel,
        token=token,
        warn=warn,
        depth_sink=depth_sink,
        preview=preview,
        tls_ca=tls_ca,
    )
    return RemoteEdit(address, frames, settings, stats, options)


class RemoteEdit:
    """The iterator :func:`edit_on_server` returns; ``.stats`` holds the server's stats when done."""

    def __init__(self, address, frames, settings, stats: P.EditStats | None, options: dict):
        self.stats: P.EditStats = P.EditStats() if stats is None else stats
        self._iterator = self._run(address, frames, settings, **options)

    def __iter__(self) -> RemoteEdit:
        return self

    def __next__(self):
        return next(self._iterator)

    def close(self) -> None:
        """Stop early: closing the connection cancels the job on the server."""
        self._iterator.close()

    def _run(self, address, frames, settings, *, depth, progress, cancel, token, warn, depth_sink, preview, tls_ca):
        width, height = frames.size
        count = len(frames)
        try:
            import numpy as np
        except ImportError:
            np = None

        def frame_bytes(index):
            image = frames.read(index)
            return image if np is None else np.ascontiguousarray(image, dtype=np.uint8)

        def depth_bytes(index):
            values = depth.read(index)
            return values if np is None else np.ascontiguousarray(values, dtype="<f4")

        try:
            client = Client.connect(address, token, tls_ca=tls_ca)
        except (ProtocolError, ValueError, OSError) as exc:
            raise _as_p2v_error(exc) from None
        with client:
            try:
                for message in client.run_job(
                    settings,
                    frame_bytes,
                    width,
                    height,
                    count=count,
                    depth=None if depth is None else depth_bytes,
                    cancel=cancel,
                    send_depth=depth_sink is not None,
                    preview=preview,
                ):
                    if message.type == "progress":
                        if progress is not None:
                            progress(message["stage"], message["done"], message["total"])
                    elif message.type == "queued":
                        if progress is not None:
                            progress(QUEUE_STAGE, message["position"], 0)
                    elif message.type == "warning":
                        if warn is not None:
                            warn(message["message"])
                        else:
                            print(f"p2v: {message['message']}", file=sys.stderr)
                    elif message.type == "result":
                        image = message.payload
                        if np is not None:
                            image = np.frombuffer(image, dtype=np.uint8).reshape(height, width, 3)
                        yield message["index"], image
                    elif message.type == "depth_used" and depth_sink is not None:
                        values = message.payload
                        if np is not None:
                            values = np.frombuffer(values, dtype="<f4").reshape(message["shape"])
                        depth_sink(message["index"], values)
                    elif message.type == "done":
                        self.stats.update(message["stats"])
                    elif message.type == "cancelled":
                        raise _cancelled(message["frames_done"])
            except ProtocolError as exc:
                raise _as_p2v_error(exc) from None


def _cancelled(frames_done: int) -> Exception:
    try:
        from .errors import EditCancelled
    except ImportError:
        return RemoteError("cancelled", f"cancelled after {frames_done} frame(s)", fatal=False)
    return EditCancelled(frames_done)


def _as_p2v_error(exc: Exception) -> Exception:
    """The runtime's own error classes for a remote failure, so ``p2v edit --server`` reads the same."""
    try:
        from . import errors
        from .settings import SettingsError
    except ImportError:
        return exc
    code = getattr(exc, "code", None)
    message = str(exc) if not isinstance(exc, ProtocolError) else exc.message
    cls = {
        P.E_SETTINGS: SettingsError,
        P.E_INPUT: errors.InputError,
        P.E_MODEL_LOAD: errors.ModelLoadError,
        P.E_GPU_OOM: errors.GpuOutOfMemory,
    }.get(code, errors.P2VError)
    if isinstance(exc, ValueError) and not isinstance(exc, ProtocolError):
        cls = errors.InputError
    error = cls(message if cls is not errors.P2VError else f"runtime server: {message}")
    error.code = code
    return error


def add_ping_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="runtime host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="runtime port (the ready line's port)")
    parser.add_argument(
        "--server", metavar="ADDRESS", default=None, help="the runtime's address instead: HOST:PORT or unix:PATH"
    )
    parser.add_argument("--token-file", default=None, help="file holding the token (default: $P2V_TOKEN)")
    parser.add_argument(
        "--tls-ca", metavar="FILE", default=None, help="connect with TLS, trusting the runtime's certificate by this CA"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the runtime (default 5)")


def ping_main(args) -> int:
    """``p2v ping``: exit 0 and print the round trip when the runtime answers, else 1 with the reason."""
    address = getattr(args, "server", None)
    if address is None:
        if args.port is None:
            print("p2v ping: give --port (the ready line's port) or --server ADDRESS", file=sys.stderr)
            return 2
        address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    try:
        token = token_from_env(getattr(args, "token_file", None))
    except OSError as exc:
        print(f"p2v ping: cannot read --token-file: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"p2v ping: {exc}", file=sys.stderr)
        return 1
    try:
        with Client.connect(
            address,
            token,
            timeout=args.timeout,
            connect_timeout=args.timeout,
            name="p2v-ping",
            tls_ca=getattr(args, "tls_ca", None),
        ) as client:
            seconds = client.ping()
            server = client.server_info.get("server", "p2v runtime")
    except RemoteError as exc:
        hint = " (set P2V_TOKEN or --token-file)" if exc.code == P.E_AUTH else ""
        print(f"p2v ping: {address}: {exc.message}{hint}", file=sys.stderr)
        return 1
    except (ProtocolError, OSError, ValueError) as exc:
        print(f"p2v ping: {address}: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    print(f"pong from {address} ({server}, protocol {P.PROTOCOL_VERSION}): round trip {seconds * 1000:.2f} ms")
    return 0
