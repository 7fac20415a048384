"""Checks of PNG files written by the plotting tests, without an image library."""

from __future__ import annotations

import struct
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Return a PNG file's (width, height) in pixels; fail when it is not a complete PNG file."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} does not start with the PNG signature"
    assert data[12:16] == b"IHDR", f"{path} does not start with an IHDR chunk"
    assert data[-8:-4] == b"IEND", f"{path} does not end with an IEND chunk, so it is truncated"
    width, height = struct.unpack(">II", data[16:24])
    return width, height
