"""A real headless browser (Debian's ``chromium``) for tests of the admin pages.

``screenshot`` renders a URL to a PNG; ``dump_dom`` returns the DOM after the page loaded;
``png_summary`` reads a PNG's size and how many distinct colours it holds (enough to tell a
rendered page from a blank one) with the standard library only.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 60


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (tools/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="ztpy-chromium-") as profile:
        return subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",  # tests run as root, where chromium's sandbox refuses to start
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=True,
        )


def screenshot(url: str, out: Path, *, width: int = 1280, height: int = 900) -> Path:
    _run(url, f"--screenshot={out}", f"--window-size={width},{height}", "--hide-scrollbars")
    return out


def dump_dom(url: str) -> str:
    return _run(url, "--dump-dom").stdout


@dataclass(frozen=True)
class PngSummary:
    width: int
    height: int
    colours: int  # distinct pixel values (capped at 4096)


def png_summary(path: Path) -> PngSummary:
    """Width, height and distinct colours of an 8-bit RGB/RGBA PNG (what chromium writes)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", header[:10])
    if depth != 8 or colour_type not in (2, 6):
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour_type})")
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    colours: set[bytes] = set()
    previous = bytearray(stride)
    for row in range(height):
        start = row * (stride + 1)
        line = _unfilter(
            raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, channels
        )
        for x in range(0, stride, channels * 7):  # every 7th pixel is plenty
            colours.add(bytes(line[x : x + channels]))
        if len(colours) >= 4096:
            break
        previous = line
    return PngSummary(width, height, len(colours))


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> bytearray:
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = prev[i]
        up_left = prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
        elif kind == 4:
            p = left + up - up_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
            pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
            line[i] = (line[i] + pred) & 0xFF
    return line
