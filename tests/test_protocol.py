"""The wire format on its own: framing, validation, limits, and the stdlib-only rule."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2v_runtime import protocol as P

ROOT = Path(__file__).resolve().parents[1]


def prefix(header_len: int, payload_len: int = 0, magic: bytes = P.MAGIC, version: int = P.PROTOCOL_VERSION) -> bytes:
    return P.PREFIX.pack(magic, version, header_len, payload_len)


def raw(header_bytes: bytes, payload: bytes = b"", **kw) -> bytes:
    return prefix(len(header_bytes), len(payload), **kw) + header_bytes + payload


def code_of(data: bytes) -> str:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(data)
    return info.value.code


VALID_HEADERS = [
    {"type": "hello", "token": "t", "protocol": 1},
    {"type": "hello", "token": "t", "protocol": 1, "client": "blender 4.2"},
    {"type": "job", "settings": {"prompt": "x"}, "frames": 3, "width": 4, "height": 2, "depth": False},
    {"type": "cancel"},
    {"type": "ping"},
    {"type": "ping", "t": 1.5},
    {"type": "shutdown", "token": "t"},
    {"type": "hello_ok", "protocol": 1, "server": "p2v", "pid": 1, "busy": False, "limits": {}},
    {"type": "job_ok", "job": "1-1", "frames": 3, "window": 8},
    {"type": "received", "index": 0},
    {"type": "progress", "stage": "edit", "done": 1, "total": 50},
    {"type": "done", "frames": 3, "stats": {"model_load_seconds": 0.0}},
    {"type": "cancelled", "frames_done": 2},
    {"type": "error", "code": "busy", "message": "busy", "fatal": False},
    {"type": "pong"},
    {"type": "bye"},
]


@pytest.mark.parametrize("header", VALID_HEADERS, ids=lambda h: h["type"])
def test_round_trip_of_every_message_without_payload(header):
    data = P.pack(header)
    message, used = P.decode(data + b"trailing")
    assert used == len(data)
    assert message.header == header and message.type == header["type"] and message.payload == b""


@pytest.mark.parametrize("kind", ["frame", "result", "depth"])
def test_round_trip_of_payload_messages(kind):
    header = P.frame_header(kind, 7, width=5, height=3)
    size = P.payload_size(header)
    assert size == 5 * 3 * (4 if kind == "depth" else 3)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    message, used = P.decode(P.pack(header, payload))
    assert (
        message.payload == payload
        and message["index"] == 7
        and used == P.PREFIX_SIZE + len(json.dumps(header, separators=(",", ":"))) + size
    )


def test_the_set_of_types_matches_the_docs():
    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    for kind in P.SCHEMAS:
        assert f"`{kind}`" in doc, kind
    for code in P.ERROR_CODES:
        assert f"`{code}`" in doc, code
    assert P.CLIENT_TYPES | P.SERVER_TYPES == set(P.SCHEMAS)
    assert not P.CLIENT_TYPES & P.SERVER_TYPES


def test_prefix_is_sixteen_big_endian_bytes():
    data = P.encode_head({"type": "ping"}, payload_len=0)
    assert data[:4] == b"P2V\x01"
    assert struct.unpack(">I", data[4:8])[0] == len(data) - 16
    assert struct.unpack(">Q", data[8:16])[0] == 0


@pytest.mark.parametrize(
    "data, code",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", P.E_BAD_MAGIC),
        (prefix(10, magic=b"XYZ") + b"{}" * 5, P.E_BAD_MAGIC),
        (raw(b'{"type":"ping"}', version=2), P.E_VERSION),
        (raw(b'{"type":"ping"}', version=0), P.E_VERSION),
        (prefix(P.MAX_HEADER_BYTES + 1), P.E_HEADER_TOO_LARGE),
        (prefix(2**32 - 1), P.E_HEADER_TOO_LARGE),
        (prefix(15, P.MAX_PAYLOAD_BYTES + 1) + b'{"type":"ping"}', P.E_PAYLOAD_TOO_LARGE),
        (prefix(15, 2**64 - 1) + b'{"type":"ping"}', P.E_PAYLOAD_TOO_LARGE),
        (prefix(0), P.E_BAD_HEADER),
        (raw(b"{not json"), P.E_BAD_HEADER),
        (raw(b"\xff\xfe\x00"), P.E_BAD_HEADER),
        (raw(b"[1, 2]"), P.E_BAD_HEADER),
        (raw(b'"ping"'), P.E_BAD_HEADER),
        (raw(b'{"kind":"ping"}'), P.E_BAD_HEADER),
        (raw(b'{"type":5}'), P.E_BAD_HEADER),
        (raw(b'{"type":"exec"}'), P.E_UNKNOWN_TYPE),
        (raw(b'{"type":"hello","protocol":1}'), P.E_BAD_HEADER),
        (raw(b'{"type":"hello","token":1,"protocol":1}'), P.E_BAD_HEADER),
        (raw(b'{"type":"hello","token":"t","protocol":true}'), P.E_BAD_HEADER),
        (raw(b'{"type":"hello","token":"t","protocol":1.0}'), P.E_BAD_HEADER),
        (raw(b'{"type":"ping","t":NaN}'), P.E_BAD_HEADER),
        (raw(b'{"type":"ping","t":Infinity}'), P.E_BAD_HEADER),
        (raw(b'{"type":"job","settings":[],"frames":1,"width":1,"height":1,"depth":false}'), P.E_BAD_HEADER),
        (raw(b"[" * 5000 + b"]" * 5000), P.E_BAD_HEADER),
        (raw(b'{"type":"ping","t":' + b"9" * 5000 + b"}"), P.E_BAD_HEADER),
        (raw(b'{"type":"ping"}', b"x"), P.E_BAD_LENGTH),
        (raw(b'{"type":"frame","index":0,"shape":[2,2,3],"dtype":"uint8"}', b"x" * 11), P.E_BAD_LENGTH),
        (raw(b'{"type":"frame","index":0,"shape":[2,2,3],"dtype":"uint8"}', b"x" * 13), P.E_BAD_LENGTH),
        (raw(b'{"type":"frame","index":0,"shape":[2,2,4],"dtype":"uint8"}', b"x" * 16), P.E_BAD_SHAPE),
        (raw(b'{"type":"frame","index":0,"shape":[2,2],"dtype":"uint8"}', b"x" * 4), P.E_BAD_SHAPE),
        (raw(b'{"type":"frame","index":0,"shape":[2,2,3,1],"dtype":"uint8"}'), P.E_BAD_HEADER),
        (raw(b'{"type":"frame","index":0,"shape":[2,2,3],"dtype":"float64"}'), P.E_BAD_HEADER),
        (raw(b'{"type":"frame","index":0,"shape":[2,"2",3],"dtype":"uint8"}'), P.E_BAD_HEADER),
        (raw(b'{"type":"frame","index":-1,"shape":[2,2,3],"dtype":"uint8"}', b"x" * 12), P.E_LIMIT),
        (raw(b'{"type":"frame","index":0,"shape":[0,2,3],"dtype":"uint8"}'), P.E_LIMIT),
        (raw(b'{"type":"frame","index":0,"shape":[-2,-2,3],"dtype":"uint8"}', b"x" * 12), P.E_LIMIT),
        (raw(b'{"type":"frame","index":0,"shape":[9000,2,3],"dtype":"uint8"}'), P.E_LIMIT),
        (raw(b'{"type":"depth","index":0,"shape":[8000,8000],"dtype":"float32"}'), P.E_LIMIT),
        (raw(b'{"type":"depth","index":0,"shape":[2,2],"dtype":"uint8"}'), P.E_BAD_HEADER),
        (P.pack({"type": "ping"})[:10], P.E_TRUNCATED),
        (P.pack({"type": "ping"})[:20], P.E_TRUNCATED),
        (P.pack(P.frame_header("frame", 0, 2, 2), b"x" * 12)[:-1], P.E_TRUNCATED),
    ],
)
def test_malformed_messages_raise_protocol_errors(data, code):
    assert code_of(data) == code


def test_frame_size_limits():
    P.check_frame_size(P.MAX_FRAME_SIDE, 1)
    P.check_frame_size(7680, 4320)
    for width, height in [(0, 1), (1, 0), (P.MAX_FRAME_SIDE + 1, 1), (8192, 8192), (-1, -1)]:
        with pytest.raises(P.ProtocolError) as info:
            P.check_frame_size(width, height)
        assert info.value.code == P.E_LIMIT
    assert P.MAX_PAYLOAD_BYTES >= 7680 * 4320 * 4


def test_encode_refuses_headers_over_the_limit():
    with pytest.raises(P.ProtocolError) as info:
        P.encode_head({"type": "job", "settings": {"prompt": "x" * P.MAX_HEADER_BYTES}})
    assert info.value.code == P.E_HEADER_TOO_LARGE
    with pytest.raises(ValueError):
        P.encode_head({"type": "ping", "t": float("nan")})


def test_error_messages_are_one_line():
    header = P.error_header("input", "line one\nline two\n\n" + "x" * 5000, True)
    assert "\n" not in header["message"] and len(header["message"]) <= 2000


def test_nothing_is_allocated_for_announced_sizes():
    """A prefix announcing a 16 EiB payload or a 4 GiB header costs nothing to reject."""
    announcing = [prefix(15, 2**64 - 1) + b'{"type":"ping"}', prefix(2**32 - 1, 0), prefix(1000, 2**40)]
    tracemalloc.start()
    try:
        for data in announcing * 100:
            with pytest.raises(P.ProtocolError):
                P.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_socket_helpers_over_a_socket_pair():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(2)
        sent = P.send_message(a, P.frame_header("frame", 3, 4, 2), bytes(24))
        P.send_message(a, {"type": "ping", "t": 1.0})
        assert sent == len(P.pack(P.frame_header("frame", 3, 4, 2), bytes(24)))
        first = P.read_message(b)
        second = P.read_message(b)
        assert first["index"] == 3 and first.payload == bytes(24)
        assert second.type == "ping" and second["t"] == 1.0
        # A message cut off mid-payload: a stall is a timeout, a close is "truncated".
        a.sendall(P.pack(P.frame_header("frame", 0, 4, 2), bytes(24))[:-5])
        b.settimeout(0.2)
        with pytest.raises(P.ProtocolError) as info:
            P.read_message(b)
        assert info.value.code == P.E_TIMEOUT
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(2)
        a.sendall(P.pack(P.frame_header("frame", 0, 4, 2), bytes(24))[:-5])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(P.ProtocolError) as info:
            P.read_message(b)
        assert info.value.code == P.E_TRUNCATED
    c, d = socket.socketpair()
    with c, d:
        c.close()
        assert P.read_message(d) is None  # clean end of stream between messages


def test_send_message_accepts_buffers_of_any_shape():
    array_like = memoryview(bytearray(2 * 3 * 3)).cast("B", (2, 3, 3))
    a, b = socket.socketpair()
    with a, b:
        P.send_message(a, P.frame_header("result", 0, 3, 2), array_like)
        assert P.read_message(b).payload == bytes(18)


# --- property tests ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# Arbitrary bytes, and arbitrary bytes behind a valid prefix that announces their length (plain
# random bytes almost never get past the magic).
arbitrary_messages = st.one_of(
    st.binary(max_size=200),
    st.builds(raw, st.binary(max_size=120), st.binary(max_size=60)),
    st.builds(
        lambda header, payload, cut: raw(header, payload)[:cut],
        st.binary(max_size=120),
        st.binary(max_size=60),
        st.integers(0, 200),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arbitrary_messages)
def test_arbitrary_bytes_either_decode_or_raise_protocol_error(data):
    try:
        P.decode(data)
    except P.ProtocolError as exc:
        assert exc.code in P.ERROR_CODES


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(P.SCHEMAS)),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    st.binary(max_size=64),
)
def test_arbitrary_headers_either_validate_or_raise_protocol_error(kind, fields, payload):
    header = dict(fields, type=kind)
    data = raw(json.dumps(header).encode(), payload)
    try:
        message, _ = P.decode(data)
    except P.ProtocolError as exc:
        assert exc.code in P.ERROR_CODES
    else:
        assert message.type == kind
        assert len(message.payload) == P.payload_size(message.header)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(0, P.MAX_FRAMES - 1),
    st.sampled_from(["frame", "result", "depth"]),
)
def test_any_allowed_frame_round_trips(width, height, index, kind):
    header = P.frame_header(kind, index, width, height)
    payload = os.urandom(P.payload_size(header))
    message, used = P.decode(P.pack(header, payload))
    assert message.payload == payload and message.header == header


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, P.MAX_HEADER_BYTES, P.MAX_HEADER_BYTES + 1])),
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, P.MAX_PAYLOAD_BYTES, P.MAX_PAYLOAD_BYTES + 1])),
    st.one_of(st.just(P.MAGIC), st.binary(min_size=3, max_size=3)),
    st.one_of(st.just(P.PROTOCOL_VERSION), st.integers(0, 255)),
)
def test_any_prefix_is_checked_before_use(header_len, payload_len, magic, version):
    # Accepted exactly when magic, version and both lengths are within the limits, and then the
    # lengths are the announced ones; a random magic alone would (almost) never reach acceptance.
    data = P.PREFIX.pack(magic, version, header_len, payload_len)
    usable = (
        magic == P.MAGIC
        and version == P.PROTOCOL_VERSION
        and 0 < header_len <= P.MAX_HEADER_BYTES
        and payload_len <= P.MAX_PAYLOAD_BYTES
    )
    if usable:
        assert P.parse_prefix(data) == (header_len, payload_len)
    else:
        with pytest.raises(P.ProtocolError) as info:
            P.parse_prefix(data)
        assert info.value.code in P.ERROR_CODES


# --- the stats every edit path reports ----------------------------------------------------------


def test_edit_stats_round_trip_through_json():
    stats = P.EditStats(frames=3, steps=2, seconds=1.5, working_size=(64, 32), bytes_in=10, device="cpu")
    values = json.loads(json.dumps(stats.to_dict()))
    assert values["working_size"] == [64, 32] and values["bytes_out"] == 0
    assert P.EditStats.from_dict(values) == stats


def test_edit_stats_from_an_older_or_newer_peer():
    stats = P.EditStats.from_dict({"frames": 4, "a_future_counter": 7, "working_size": [8, 8]})
    assert stats == P.EditStats(frames=4, working_size=(8, 8))
    assert stats.update({"bytes_in": 5, "other": None}) is stats and stats.bytes_in == 5 and stats.frames == 4


# --- stdlib only, and vendorable ----------------------------------------------------------------


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        nodes = [node]
        if isinstance(node, ast.Try):
            nodes = node.body + [n for h in node.handlers for n in h.body]
        for item in nodes:
            if isinstance(item, ast.Import):
                names.update(alias.name.split(".")[0] for alias in item.names)
            elif isinstance(item, ast.ImportFrom):
                names.add("." * item.level + (item.module or ""))
    return names


@pytest.mark.parametrize("name", ["protocol.py", "client.py"])
def test_protocol_and_client_import_only_the_standard_library(name):
    imports = _module_level_imports(ROOT / "p2v_runtime" / name)
    allowed_local = {".", "protocol", "__future__"}
    for module in imports:
        assert module in sys.stdlib_module_names or module in allowed_local, f"{name} imports {module}"


def test_importing_protocol_and_client_loads_neither_numpy_nor_torch():
    code = (
        "import sys, p2v_runtime.protocol, p2v_runtime.client; "
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_vendored_copies_work_in_a_package_and_as_top_level_modules(tmp_path):
    package = tmp_path / "p2v_addon_vendored"
    package.mkdir()
    (package / "__init__.py").write_text("")
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("protocol.py", "client.py"):
        shutil.copy(ROOT / "p2v_runtime" / name, package / name)
        shutil.copy(ROOT / "p2v_runtime" / name, flat / name)
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from p2v_addon_vendored import client
        assert client.P.__name__ == "p2v_addon_vendored.protocol", client.P.__name__
        sys.path.insert(0, sys.argv[2])
        import client as flat_client
        assert flat_client.P.__name__ == "protocol"
        assert "p2v_runtime" not in sys.modules and "numpy" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(flat)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
