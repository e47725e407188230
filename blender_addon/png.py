"""A PNG writer in the standard library: 8-bit RGB, rows top to bottom, written atomically.

The edited frames arrive as raw RGB bytes on a worker thread, where bpy must not be used; zlib
and a few chunk headers are all a PNG needs.
"""

from __future__ import annotations

import os
import struct
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
    raw = b"".join(b"\x00" + bytes(view[row * stride:(row + 1) * stride]) for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bit, RGB, no interlace
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")


def write_rgb(path: str, rgb, width: int, height: int) -> None:
    """Write a PNG so that ``path`` either does not exist or holds the whole image (temp file, then rename)."""
    data = encode_rgb(rgb, width, height)
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
