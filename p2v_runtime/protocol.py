"""The wire format between the Blender add-on (or any client) and ``p2v serve``.

Standard library only: the add-on vendors this file verbatim next to its client, and importing it
must never pull in numpy or torch. ``docs/protocol.md`` is the prose version of this module.

Every message is::

    +-------+---------+----------------+-----------------+---------------------+-----------+
    | "P2V" | version | header length  | payload length  | header: UTF-8 JSON  | payload   |
    | 3 B   | 1 B     | 4 B, uint32 BE | 8 B, uint64 BE  | object with "type"  | raw bytes |
    +-------+---------+----------------+-----------------+---------------------+-----------+

Nothing on the wire is unpickled or evaluated: headers are plain JSON checked field by field
against :data:`SCHEMAS`, payloads are raw pixels whose length must equal what the header's
``shape`` and ``dtype`` imply. Every length is checked against the limits before a buffer of
that size exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Protocol

PROTOCOL_VERSION = 1
MAGIC = b"P2V"
PREFIX = struct.Struct(">3sBIQ")  # magic, version, header length, payload length
PREFIX_SIZE = PREFIX.size  # 16

# Limits, checked before allocating. A frame of the largest allowed size (8K UHD) as float32
# depth is the largest payload; the header carries settings and stats, never pixels.
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAME_SIDE = 8192
MAX_FRAME_PIXELS = 7680 * 4320
MAX_FRAMES = 100_000
MAX_PAYLOAD_BYTES = MAX_FRAME_PIXELS * 4
MAX_STRING = 16 * 1024  # any single string field
# ``depth_used`` maps are at the model's latent size: at most 4096 / 8 pixels a side.
MAX_DEPTH_USED_BYTES = 512 * 512 * 4
DEFAULT_WINDOW = 8  # frames a client may have in flight (sent, not yet "received")

# Payload element types, all little-endian on the wire.
DTYPE_SIZES = {"uint8": 1, "float32": 4}

# Error codes. ``fatal`` in the error message says whether the connection is closed after it.
E_BAD_MAGIC = "bad_magic"
E_VERSION = "version"
E_HEADER_TOO_LARGE = "header_too_large"
E_PAYLOAD_TOO_LARGE = "payload_too_large"
E_BAD_HEADER = "bad_header"
E_UNKNOWN_TYPE = "unknown_type"
E_UNEXPECTED = "unexpected_type"
E_BAD_LENGTH = "bad_length"
E_BAD_SHAPE = "bad_shape"
E_LIMIT = "limit"
E_ORDER = "order"
E_TRUNCATED = "truncated"
E_TIMEOUT = "timeout"
E_NOT_AUTHENTICATED = "not_authenticated"
E_AUTH = "auth"
E_BUSY = "busy"
E_TOO_MANY = "too_many_connections"
E_SHUTTING_DOWN = "shutting_down"
E_DISK = "disk_full"
E_SETTINGS = "settings"
E_INPUT = "input"
E_MODEL_LOAD = "model_load"
E_GPU_OOM = "gpu_oom"
E_EDIT_FAILED = "edit_failed"
E_INTERNAL = "internal"
E_TLS = "tls"

ERROR_CODES = (
    E_BAD_MAGIC,
    E_VERSION,
    E_HEADER_TOO_LARGE,
    E_PAYLOAD_TOO_LARGE,
    E_BAD_HEADER,
    E_UNKNOWN_TYPE,
    E_UNEXPECTED,
    E_BAD_LENGTH,
    E_BAD_SHAPE,
    E_LIMIT,
    E_ORDER,
    E_TRUNCATED,
    E_TIMEOUT,
    E_NOT_AUTHENTICATED,
    E_AUTH,
    E_BUSY,
    E_TOO_MANY,
    E_SHUTTING_DOWN,
    E_DISK,
    E_SETTINGS,
    E_INPUT,
    E_MODEL_LOAD,
    E_GPU_OOM,
    E_EDIT_FAILED,
    E_INTERNAL,
    E_TLS,
)


class ProtocolError(Exception):
    """The peer broke the wire format, or the exchange cannot go on; ``code`` names why."""

    def __init__(self, code: str, message: str, *, fatal: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


class RemoteError(ProtocolError):
    """The other side answered with an ``error`` message."""

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class ConnectionLost(ProtocolError):
    """The connection closed or failed; ``results_received`` results had arrived before that."""

    def __init__(self, message: str, results_received: int = 0):
        super().__init__("connection_lost", message)
        self.results_received = results_received


# --- what an edit reads and what it reports ----------------------------------------------------


class Frames(Protocol):
    """A clip as an edit reads it: ``edit_clip``, ``edit_on_server`` and the server's spool.

    One interface, so the same frames object works for a local edit and a remote one. Frames are
    HxWx3 uint8 RGB (depth: HxW float32), as numpy arrays or any buffer-protocol object.
    """

    def __len__(self) -> int: ...

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        ...

    @property
    def description(self) -> str:
        """Where the frames come from, for messages."""
        ...

    def read(self, index: int) -> Any:
        """Frame ``index`` (0-based)."""
        ...


@dataclasses.dataclass
class EditStats:
    """What an edit did and cost, the same type on every path.

    ``edit_clip`` fills one locally; the server fills one per job and sends ``to_dict()`` in
    ``done``; ``edit_on_server`` fills the caller's from that. :meth:`from_dict` ignores keys it
    does not know and leaves missing ones at their defaults, so clients and servers of different
    versions still read each other's stats.
    """

    frames: int = 0
    steps: int = 0
    unet_calls: int = 0
    unet_calls_inversion: int = 0
    unet_calls_edit: int = 0
    inversion_cache_hits: int = 0
    feature_cache_bytes: int = 0  # peak bytes of recorded self-attention features, wherever they are kept
    feature_store: str = ""  # where they were kept: "gpu" (the compute device) or "cpu" (host memory)
    seconds: float = 0.0
    seconds_per_frame: float | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    depth_source: str = "estimate"
    source_prompt: str = ""
    device: str = ""
    dtype: str = ""
    model_load_seconds: float = 0.0
    working_size: tuple[int, int] | None = None
    bytes_in: int = 0  # received for the job (frames, depth, headers); 0 for a local edit
    bytes_out: int = 0  # sent for the job up to its ``done``; 0 for a local edit
    # On a pool (p2v serve --ray): the actor that ran the sequential edit, how many DDIM inversions
    # each actor computed for the job, and how often the job moved to another actor after one died.
    actor: str = ""
    pool_inversions: dict[str, int] = dataclasses.field(default_factory=dict)
    pool_restarts: int = 0

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["working_size"] = list(self.working_size) if self.working_size else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> EditStats:
        return cls().update(values)

    def update(self, values: dict) -> EditStats:
        """Take the values of the keys this class knows (a ``done`` message's stats); return self."""
        for field in dataclasses.fields(self):
            if field.name in values:
                setattr(self, field.name, values[field.name])
        if isinstance(self.working_size, list):  # JSON has no tuples
            self.working_size = tuple(self.working_size)
        return self


# --- message schemas ---------------------------------------------------------------------------

_REQ, _OPT = True, False
# field -> (kind, required). Kinds: "str", "int", "bool", "num", "obj", "shape".
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    # client -> server
    "hello": {"token": ("str", _REQ), "protocol": ("int", _REQ), "client": ("str", _OPT)},
    "job": {
        "settings": ("obj", _REQ),
        "frames": ("int", _REQ),
        "width": ("int", _REQ),
        "height": ("int", _REQ),
        "depth": ("bool", _REQ),
        "send_depth": ("bool", _OPT),
        "preview": ("bool", _OPT),
        "queue": ("bool", _OPT),
    },
    "frame": {"index": ("int", _REQ), "shape": ("shape", _REQ), "dtype": ("str", _REQ)},
    "depth": {"index": ("int", _REQ), "shape": ("shape", _REQ), "dtype": ("str", _REQ)},
    "cancel": {},
    "ping": {"t": ("num", _OPT)},
    "shutdown": {"token": ("str", _REQ)},
    # server -> client
    "hello_ok": {
        "protocol": ("int", _REQ),
        "server": ("str", _REQ),
        "pid": ("int", _REQ),
        "busy": ("bool", _REQ),
        "limits": ("obj", _OPT),
    },
    "job_ok": {"job": ("str", _REQ), "frames": ("int", _REQ), "window": ("int", _REQ)},
    "received": {"index": ("int", _REQ)},
    "queued": {"position": ("int", _REQ)},
    "progress": {"stage": ("str", _REQ), "done": ("int", _REQ), "total": ("int", _REQ)},
    "warning": {"message": ("str", _REQ)},
    "result": {"index": ("int", _REQ), "shape": ("shape", _REQ), "dtype": ("str", _REQ)},
    "depth_used": {"index": ("int", _REQ), "shape": ("shape", _REQ), "dtype": ("str", _REQ)},
    "done": {"frames": ("int", _REQ), "stats": ("obj", _REQ)},
    "cancelled": {"frames_done": ("int", _REQ)},
    "error": {"code": ("str", _REQ), "message": ("str", _REQ), "fatal": ("bool", _REQ)},
    "pong": {"t": ("num", _OPT)},
    "bye": {},
}
CLIENT_TYPES = frozenset({"hello", "job", "frame", "depth", "cancel", "ping", "shutdown"})
SERVER_TYPES = frozenset(SCHEMAS) - CLIENT_TYPES
# Types that carry a payload, with their fixed element type and channel count (None: HxW).
PAYLOAD_TYPES = {
    "frame": ("uint8", 3),
    "result": ("uint8", 3),
    "depth": ("float32", None),
    "depth_used": ("float32", None),
}

_INT_MAX = 2**63 - 1


class Message:
    """One decoded message: its type, its JSON header (a dict) and its raw payload."""

    __slots__ = ("type", "header", "payload")

    def __init__(self, header: dict, payload=b""):
        self.type = header["type"]
        self.header = header
        self.payload = payload

    def __getitem__(self, key):
        return self.header[key]

    def get(self, key, default=None):
        return self.header.get(key, default)

    def __repr__(self) -> str:
        return f"Message({self.header!r}, <{len(self.payload)} bytes>)"


# --- encoding ----------------------------------------------------------------------------------


def encode_head(header: dict, payload_len: int = 0) -> bytes:
    """Prefix plus JSON header for ``header``; the payload (if any) is sent after it as is."""
    data = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(
            E_HEADER_TOO_LARGE, f"header of {len(data)} bytes is over the {MAX_HEADER_BYTES} byte limit"
        )
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(data), payload_len) + data


def pack(header: dict, payload=b"") -> bytes:
    """A whole message as one bytes object (tests and small messages)."""
    return encode_head(header, len(payload)) + bytes(payload)


def frame_header(kind: str, index: int, width: int, height: int) -> dict:
    """Header of a ``frame``, ``depth`` or ``result`` message for an image of width x height."""
    dtype, channels = PAYLOAD_TYPES[kind]
    shape = [height, width] if channels is None else [height, width, channels]
    return {"type": kind, "index": index, "shape": shape, "dtype": dtype}


def error_header(code: str, message: str, fatal: bool) -> dict:
    return {"type": "error", "code": code, "message": one_line(message), "fatal": bool(fatal)}


def one_line(text: str) -> str:
    """Whitespace runs to single spaces, at most 2000 characters: messages a user reads."""
    text = " ".join(str(text).split())
    return text if len(text) <= 2000 else text[:1997] + "..."


# --- decoding and validation -------------------------------------------------------------------


def parse_prefix(
    data: bytes, *, max_header: int = MAX_HEADER_BYTES, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[int, int]:
    """Check the fixed 16-byte prefix; return (header length, payload length)."""
    if len(data) != PREFIX_SIZE:
        raise ProtocolError(E_TRUNCATED, f"message prefix is {len(data)} bytes, expected {PREFIX_SIZE}")
    magic, version, header_len, payload_len = PREFIX.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(E_BAD_MAGIC, "not a p2v message (bad magic bytes)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            E_VERSION,
            f"peer speaks p2v protocol {version}, this side speaks {PROTOCOL_VERSION}: "
            "update the add-on or the runtime so they match",
        )
    if header_len == 0:
        raise ProtocolError(E_BAD_HEADER, "empty message header")
    if header_len > max_header:
        raise ProtocolError(E_HEADER_TOO_LARGE, f"header of {header_len} bytes is over the {max_header} byte limit")
    if payload_len > max_payload:
        raise ProtocolError(E_PAYLOAD_TOO_LARGE, f"payload of {payload_len} bytes is over the {max_payload} byte limit")
    return header_len, payload_len


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def parse_header(data: bytes) -> dict:
    """Decode and validate a JSON header against :data:`SCHEMAS`; return it as a dict."""
    try:
        text = bytes(data).decode("utf-8")
        header = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(E_BAD_HEADER, f"message header is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(E_BAD_HEADER, "message header is not a JSON object")
    kind = header.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(E_BAD_HEADER, 'message header has no "type" string')
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}")
    for name, (field_kind, required) in schema.items():
        if name not in header:
            if required:
                raise ProtocolError(E_BAD_HEADER, f"{kind} message lacks field {name!r}")
            continue
        _check_field(kind, name, field_kind, header[name])
    if kind in PAYLOAD_TYPES:
        _check_image_fields(kind, header)
    return header


def _check_field(kind: str, name: str, field_kind: str, value) -> None:
    ok = True
    if field_kind == "str":
        ok = isinstance(value, str) and len(value) <= MAX_STRING
    elif field_kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and -_INT_MAX <= value <= _INT_MAX
    elif field_kind == "bool":
        ok = isinstance(value, bool)
    elif field_kind == "num":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif field_kind == "obj":
        ok = isinstance(value, dict)
    elif field_kind == "shape":
        ok = (
            isinstance(value, list)
            and 2 <= len(value) <= 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
    if not ok:
        raise ProtocolError(E_BAD_HEADER, f"{kind} message has a bad {name!r} field")


def _check_image_fields(kind: str, header: dict) -> None:
    dtype, channels = PAYLOAD_TYPES[kind]
    if header["dtype"] != dtype:
        raise ProtocolError(E_BAD_HEADER, f"{kind} payload must be {dtype}, got {str(header['dtype'])[:20]!r}")
    shape = header["shape"]
    want = 2 if channels is None else 3
    if len(shape) != want or (channels is not None and shape[2] != channels):
        raise ProtocolError(
            E_BAD_SHAPE,
            f"{kind} shape must be {'[height, width]' if channels is None else '[height, width, 3]'}, got {shape}",
        )
    height, width = shape[0], shape[1]
    check_frame_size(width, height)
    if not 0 <= header["index"] < MAX_FRAMES:
        raise ProtocolError(E_LIMIT, f"{kind} index {header['index']} is outside 0..{MAX_FRAMES - 1}")


def check_frame_size(width: int, height: int) -> None:
    """Raise unless width x height is within the frame limits."""
    if not (1 <= width <= MAX_FRAME_SIDE and 1 <= height <= MAX_FRAME_SIDE):
        raise ProtocolError(E_LIMIT, f"frame size {width}x{height} is outside 1..{MAX_FRAME_SIDE} per side")
    if width * height > MAX_FRAME_PIXELS:
        raise ProtocolError(E_LIMIT, f"frame size {width}x{height} is over the {MAX_FRAME_PIXELS} pixel limit")


def payload_size(header: dict) -> int:
    """Bytes of payload a validated header implies: product of its shape times its dtype size."""
    if header["type"] not in PAYLOAD_TYPES:
        return 0
    size = DTYPE_SIZES[header["dtype"]]
    for dim in header["shape"]:
        size *= dim
    return size


def check_payload_length(header: dict, payload_len: int) -> int:
    """Raise ``bad_length`` unless the announced payload length is what the header implies."""
    expected = payload_size(header)
    if payload_len != expected:
        raise ProtocolError(
            E_BAD_LENGTH,
            f"{header['type']} payload is announced as {payload_len} bytes, its shape and dtype need {expected}",
        )
    return expected


def decode(
    data: bytes, *, max_header: int = MAX_HEADER_BYTES, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[Message, int]:
    """Decode the first whole message in ``data``; return it and the bytes it used.

    The in-memory twin of :func:`read_message` (tests, fuzzing, buffers). Raises
    ``ProtocolError("truncated")`` when ``data`` ends before the message does.
    """
    view = memoryview(data)
    if len(view) < PREFIX_SIZE:
        raise ProtocolError(E_TRUNCATED, "data ends inside the message prefix")
    header_len, payload_len = parse_prefix(bytes(view[:PREFIX_SIZE]), max_header=max_header, max_payload=max_payload)
    end_header = PREFIX_SIZE + header_len
    if len(view) < end_header:
        raise ProtocolError(E_TRUNCATED, "data ends inside the message header")
    header = parse_header(view[PREFIX_SIZE:end_header])
    check_payload_length(header, payload_len)
    end = end_header + payload_len
    if len(view) < end:
        raise ProtocolError(E_TRUNCATED, "data ends inside the message payload")
    return Message(header, bytes(view[end_header:end])), end


# --- socket helpers ----------------------------------------------------------------------------


def recv_exact_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` from ``sock``; ``truncated`` on end of stream, ``timeout`` on a stall.

    The socket's own timeout is the stall limit: each ``recv`` must make progress within it.
    With ``deadline`` (a ``time.monotonic()`` value) the whole read must also end by then.
    """
    got = 0
    total = len(view)
    while got < total:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError(E_TIMEOUT, f"peer did not finish the message in time ({got} of {total} bytes)")
            sock.settimeout(left)
        try:
            n = sock.recv_into(view[got:], total - got)
        except TimeoutError:
            raise ProtocolError(E_TIMEOUT, f"peer stopped sending mid-message ({got} of {total} bytes)") from None
        if n == 0:
            raise ProtocolError(E_TRUNCATED, f"connection closed mid-message ({got} of {total} bytes)")
        got += n


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    recv_exact_into(sock, memoryview(buf))
    return buf


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay for the small control messages (buffer sizes stay with the kernel's autotuning)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def wait_readable(sock: socket.socket, timeout: float | None) -> bool:
    """True when a read on ``sock`` would not block (data or end of stream) within ``timeout``.

    A TLS socket may hold decrypted bytes that the operating system no longer shows as readable:
    those count first.
    """
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return True
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


def read_head(
    sock: socket.socket, *, max_header: int = MAX_HEADER_BYTES, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[dict, int, int] | None:
    """Read prefix and header of the next message: (header, payload length, bytes read so far).

    None on a clean end of stream before the first byte. The payload is left on the socket so
    the caller can check its length against what it expects (the job's frame shape) before
    allocating anything for it.
    """
    prefix = bytearray(PREFIX_SIZE)
    view = memoryview(prefix)
    try:
        first = sock.recv_into(view, PREFIX_SIZE)
    except TimeoutError:
        raise ProtocolError(E_TIMEOUT, "peer sent nothing within the read timeout") from None
    if first == 0:
        return None
    if first < PREFIX_SIZE:
        recv_exact_into(sock, view[first:])
    header_len, payload_len = parse_prefix(bytes(prefix), max_header=max_header, max_payload=max_payload)
    header = parse_header(recv_exact(sock, header_len))
    check_payload_length(header, payload_len)
    return header, payload_len, PREFIX_SIZE + header_len


def read_message(sock: socket.socket, *, max_payload: int = MAX_PAYLOAD_BYTES) -> Message | None:
    """Read one whole message (header checked before the payload buffer is made)."""
    head = read_head(sock, max_payload=max_payload)
    if head is None:
        return None
    header, payload_len, _ = head
    return Message(header, recv_exact(sock, payload_len) if payload_len else b"")


SEND_CHUNK = 1024 * 1024


def send_all(sock: socket.socket, data) -> None:
    """Send all of ``data``; the socket's timeout bounds a stall, never the whole transfer.

    Each ``send`` waits at most the socket's timeout for room and sends what fits, so a peer that
    reads slowly but steadily is served however long the data takes; only a peer that takes
    nothing for the timeout raises ``TimeoutError``. (``sendall`` applies its timeout to the whole
    call: a 1 MiB piece to a client reading 40 kB/s would fail a 30 s limit.)
    """
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    sent, total = 0, len(view)
    while sent < total:
        sent += sock.send(view[sent : sent + SEND_CHUNK])


def send_message(sock: socket.socket, header: dict, payload=None) -> int:
    """Send one message; return the bytes written. ``payload`` is any bytes-like object."""
    if payload is None:
        data = encode_head(header)
        send_all(sock, data)
        return len(data)
    view = memoryview(payload)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    head = encode_head(header, len(view))
    if len(view) <= 65536:
        send_all(sock, head + view.tobytes())
    else:
        send_all(sock, head)
        send_all(sock, view)
    return len(head) + len(view)


# --- TLS ---------------------------------------------------------------------------------------


def tls_client_context(cafile: str) -> ssl.SSLContext:
    """Verify the runtime's certificate against ``cafile`` (and its name against the host asked for)."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def tls_server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """The runtime's side: its certificate chain and key; TLS 1.2 or later, no renegotiation."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0) | ssl.OP_NO_TICKET
    try:
        context.num_tickets = 0  # TLS 1.3 session tickets would arrive as unread records
    except (AttributeError, ValueError):
        pass
    context.load_cert_chain(certfile, keyfile, password=_no_password)  # never a prompt on the terminal
    return context


def _no_password():
    raise ValueError("the TLS key is encrypted: give the runtime an unencrypted key file (mode 0600)")


class TLSSocket:
    """A TLS connection one thread reads while another writes (the runtime's reader and writer).

    OpenSSL does not allow two threads in one connection at once, so every TLS call runs under a
    lock, non-blocking; the waiting for the network happens outside it. The methods are the
    subset of ``socket.socket`` the protocol uses, with the same timeout semantics: ``timeout``
    bounds each wait for progress, ``TimeoutError`` when it passes, ``None`` waits for ever.
    """

    _SLICE = 0.25  # longest single wait, so a state another thread changed is seen soon
    _CHUNK = 64 * 1024

    def __init__(self, tls: ssl.SSLSocket, timeout: float | None = None):
        tls.setblocking(False)
        self._tls = tls
        self._lock = threading.Lock()
        self._timeout = timeout

    @classmethod
    def wrap(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        deadline: float | None = None,
        stop=None,
    ) -> TLSSocket:
        """Wrap a connected socket and finish the handshake by ``deadline`` (``stop()``: give up)."""
        timeout = sock.gettimeout()
        tls = context.wrap_socket(
            sock, server_side=server_side, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        wrapped = cls(tls, timeout)
        wrapped._io(tls.do_handshake, deadline, stop)
        return wrapped

    def _io(self, operation, deadline: float | None, stop=None):
        while True:
            with self._lock:
                try:
                    return operation()
                except ssl.SSLWantReadError:
                    want_read = True
                except ssl.SSLWantWriteError:
                    want_read = False
            if stop is not None and stop():
                raise TimeoutError("stopped")
            wait = self._SLICE
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                wait = min(wait, left)
            fd = self._tls.fileno()
            if fd < 0:
                raise OSError("the connection is closed")
            select.select([fd] if want_read else [], [] if want_read else [fd], [], wait)

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        nbytes = nbytes or len(view)
        try:
            return self._io(lambda: self._tls.recv_into(view, nbytes), self._deadline())
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0  # the peer closed (with or without TLS close_notify)

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        n = self.recv_into(buffer, size)
        return bytes(buffer[:n])

    def send(self, data) -> int:
        chunk = memoryview(data).cast("B")[: self._CHUNK]
        return self._io(lambda: self._tls.send(chunk), self._deadline())

    def sendall(self, data) -> None:
        send_all(self, data)

    def pending(self) -> int:
        with self._lock:
            return self._tls.pending()

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def fileno(self) -> int:
        return self._tls.fileno()

    def setsockopt(self, *args) -> None:
        self._tls.setsockopt(*args)

    def getpeername(self):
        return self._tls.getpeername()

    def shutdown(self, how: int) -> None:
        # The plain socket's shutdown: SSLSocket.shutdown would also drop the TLS state, and a
        # reader in another thread would then read ciphertext as if it were the protocol.
        socket.socket.shutdown(self._tls, how)

    def close(self) -> None:
        self._tls.close()
