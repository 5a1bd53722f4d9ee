"""Where a request's CPU goes: py-spy's collapsed stacks of a daemon, split by part of the path.

py-spy (``record --format raw --native``) writes one line per distinct stack: frames from the
root to the leaf separated by ``;``, then the sample count. Each stack is put in one part of
the request path by its innermost frame that names one (leaf first): a syscall leaf is the
kernel's work (split into the write to the application, the write of TLS records to the peer,
reads), OpenSSL's frames are TLS, then our modules and h2 by file. Samples waiting in
``epoll_pwait`` are idle time, left out of the shares.

``us_per_request`` turns the shares into microseconds with a measured CPU time per request
(``tools/bench/cpureq.py``): the samples say how CPU time divides, the meter says how much
there is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IDLE = "idle (waiting in epoll)"
# (part, pattern on one frame), tried on each frame from the leaf up; the first hit wins.
RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        (IDLE, r"^epoll_p?wait "),
        ("kernel: write syscalls", r"^(__)?(write|writev|send|sendmsg|sendto) \(libc"),
        ("kernel: read syscalls", r"^(__)?(read|readv|recv|recvmsg|recvfrom) \(libc"),
        ("TLS: OpenSSL (encrypt, decrypt, records)", r"\((libssl|libcrypto)\.so|^_ssl__|^SSL"),
        ("access log, logging", r"\(logging/|ztunnel_py/telemetry/(access|log)"),
        ("telemetry (metrics, connection records)", r"ztunnel_py/telemetry/|prometheus_client/"),
        ("h2 library (HPACK, control frames, windows)", r"\((h2|hpack|hyperframe)/"),
        ("HBONE framing (hbone/connection.py)", r"ztunnel_py/hbone/"),
        ("HBONE adapter (proxy/transport.py)", r"ztunnel_py/proxy/transport\.py"),
        ("splice (proxy/splice.py)", r"ztunnel_py/proxy/splice\.py"),
        ("connection setup (outbound, inbound, pool, policy)", r"ztunnel_py/(proxy|rbac)/"),
        ("uvloop TLS state machine (SSLProtocol)", r"^SSLProtocol|^SSLObject\.|\(ssl\.py:"),
        ("event loop (uvloop, libuv, asyncio)", r"\((loop\.c|core\.c|stream\.c|linux\.c)|asyncio/"),
    )
)
OTHER = "other (interpreter, allocator, start-up code)"
# Which write a write-syscall sample is, from a frame further up its stack.
WRITE_TO_APP = "kernel: write to the application (TCP)"
WRITE_TO_PEER = "kernel: write of TLS records to the peer"


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """(frames root to leaf, samples) per line of a py-spy raw (collapsed) file."""
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def classify(frames: Sequence[str]) -> str:
    """The part of the request path a stack (root to leaf) is spending its time in."""
    for frame in reversed(frames):
        for name, pattern in RULES:
            if pattern.search(frame):
                if name == "kernel: write syscalls":
                    return _which_write(frames)
                return name
    return OTHER


def _which_write(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        if frame.startswith("TcpSide.write") or "TcpSide.write " in frame:
            return WRITE_TO_APP
        if frame.startswith(("SSLProtocol", "HboneProtocol._flush")):
            return WRITE_TO_PEER
    return "kernel: other writes"


@dataclass
class Breakdown:
    parts: Counter[str] = field(default_factory=Counter)
    idle: int = 0

    @property
    def total(self) -> int:
        """Samples that were not idle."""
        return sum(self.parts.values())

    def shares(self) -> list[tuple[str, float]]:
        """(part, share of the busy samples), largest first."""
        total = self.total
        if not total:
            return []
        return [(name, n / total) for name, n in self.parts.most_common()]

    def us_per_request(self, cpu_us: float) -> list[tuple[str, float]]:
        """Each part's microseconds of a request that costs ``cpu_us`` of CPU in all."""
        return [(name, share * cpu_us) for name, share in self.shares()]

    def merge(self, other: Breakdown) -> Breakdown:
        return Breakdown(self.parts + other.parts, self.idle + other.idle)


def breakdown(stacks: Iterable[tuple[Sequence[str], int]]) -> Breakdown:
    out = Breakdown()
    for frames, count in stacks:
        part = classify(frames)
        if part == IDLE:
            out.idle += count
        else:
            out.parts[part] += count
    return out


def table(columns: Sequence[tuple[str, Breakdown, float]]) -> list[str]:
    """Markdown: one row per part, one column per (label, breakdown, CPU us per request)."""
    names = list(dict.fromkeys(n for _, b, _ in columns for n, _ in b.shares()))
    head = "| part of the request path | " + " | ".join(f"{label}, us" for label, _, _ in columns)
    lines = [head + " |", "| --- |" + " --- |" * len(columns)]
    per = [dict(b.us_per_request(cpu)) for _, b, cpu in columns]
    for name in names:
        cells = [f"{p.get(name, 0.0):.1f}" for p in per]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = [f"**{cpu:.1f}**" for _, _, cpu in columns]
    lines.append("| **all (CPU time per request)** | " + " | ".join(totals) + " |")
    return lines
