"""``ztunnel-py debug dump`` and ``ztunnel-py debug bundle``: the admin's debug views from a shell.

``dump`` prints ``/debug/dump`` (or some sections of it). ``bundle`` writes one ``.tar.gz`` for
a bug report: every debug section, ``/config_dump``, a metrics scrape, the daemon's recent log
lines and any log files given, plus a manifest saying what could not be fetched (a bundle is
still written when the daemon answers only in part). Secrets never reach it: the daemon scrubs
its views before they leave.
"""

from __future__ import annotations

import datetime
import io
import json
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIMEOUT_S = 30.0


class AdminUnreachable(Exception):
    pass


def fetch(url: str, timeout: float = TIMEOUT_S) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local admin)
            return bytes(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        raise AdminUnreachable(f"{url}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise AdminUnreachable(f"cannot reach {url}: {e}; is ztunnel-py running?") from None


def dump(admin: str, sections: Sequence[str]) -> int:
    query = f"?section={','.join(sections)}" if sections else ""
    try:
        body = fetch(f"http://{admin}/debug/dump{query}")
    except AdminUnreachable as e:
        print(f"ztunnel-py: {e}", file=sys.stderr)
        return 1
    doc: dict[str, Any] = json.loads(body)
    json.dump(doc[sections[0]] if len(sections) == 1 else doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def bundle(admin: str, stats: str, output: Path | None, log_files: Sequence[Path]) -> int:
    stamp = datetime.datetime.now(tz=datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    output = output or Path(f"ztunnel-py-debug-{stamp}.tar.gz")
    members: dict[str, bytes] = {}
    problems: list[str] = []
    sources = {
        "debug.json": f"http://{admin}/debug/dump",
        "config_dump.json": f"http://{admin}/config_dump",
        "logs.json": f"http://{admin}/debug/logs",
        "metrics.txt": f"http://{stats}/metrics",
    }
    for name, url in sources.items():
        try:
            members[name] = fetch(url)
        except AdminUnreachable as e:
            problems.append(str(e))
    for path in log_files:
        try:
            members[f"logs/{path.name}"] = path.read_bytes()
        except OSError as e:
            problems.append(f"cannot read {path}: {e}")
    if not members:
        print(
            "ztunnel-py: nothing could be collected:\n  " + "\n  ".join(problems), file=sys.stderr
        )
        return 1
    manifest = {
        "created": stamp,
        "admin": admin,
        "stats": stats,
        "files": sorted(members),
        "problems": problems,
    }
    members["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    with tarfile.open(output, "w:gz") as tar:
        now = time.time()
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(f"ztunnel-py-debug-{stamp}/{name}")
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    print(f"wrote {output} ({len(members)} files)")
    for problem in problems:
        print(f"  missing: {problem}", file=sys.stderr)
    return 0
