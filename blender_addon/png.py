"""A PNG writer in the standard library: 8-bit RGB or 16-bit grey, rows top to bottom, atomic.

The edited frames (and, when asked, the depth each was edited with) arrive as raw bytes on a
worker thread, where bpy must not be used; zlib and a few chunk headers are all a PNG needs.
"""

from __future__ import annotations

import array
import math
import os
import struct
import sys
import zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_rgb(rgb, width: int, height: int, level: int = 6) -> bytes:
    """PNG bytes of ``width`` x ``height`` RGB pixels (``height * width * 3`` bytes, top row first)."""
    view = memoryview(rgb).cast("B") if not isinstance(rgb, (bytes, bytearray)) else rgb
    stride = width * 3
    if len(view) != stride * height:
        raise ValueError(f"{len(view)} bytes is not a {width}x{height} RGB image")
    return _encode(view, width, height, stride, colour_type=2, bit_depth=8, level=level)


def encode_grey16(values01, width: int, height: int, level: int = 6) -> bytes:
    """PNG bytes of ``width`` x ``height`` float32 values in [0, 1] (little-endian, top row first) as
    16-bit grey: what the runtime's ``--save-depth`` writes (NaN 0, values clipped, rounded to even)."""
    values = array.array("f")
    values.frombytes(bytes(values01))
    if len(values) != width * height:
        raise ValueError(f"{len(values)} values is not a {width}x{height} image")
    if sys.byteorder == "big":
        values.byteswap()
    grey = array.array("H", (0 if math.isnan(v) else round(min(1.0, max(0.0, v)) * 65535.0) for v in values))
    if sys.byteorder == "little":
        grey.byteswap()  # PNG samples are big-endian
    return _encode(memoryview(grey.tobytes()), width, height, width * 2, colour_type=0, bit_depth=16, level=level)


def _encode(view, width: int, height: int, stride: int, *, colour_type: int, bit_depth: int, level: int) -> bytes:
    raw = b"".join(b"\x00" + bytes(view[row * stride : (row + 1) * stride]) for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)  # no interlace
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")


def write_rgb(path: str, rgb, width: int, height: int) -> None:
    """Write an RGB PNG so that ``path`` either does not exist or holds the whole image."""
    write_atomically(path, encode_rgb(rgb, width, height))


def write_grey16(path: str, values01, width: int, height: int) -> None:
    """Write a 16-bit grey PNG of [0, 1] values, whole or not at all."""
    write_atomically(path, encode_grey16(values01, width, height))


def write_atomically(path: str, data: bytes) -> None:
    """``path`` either does not exist or holds all of ``data`` (temp file, then rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
