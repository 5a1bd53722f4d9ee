"""The ``ztunnel-py`` command.

``ztunnel-py run`` starts the daemon (``ztunnel-py proxy ztunnel`` is the same, so the
container args of istio's ztunnel chart work unchanged); ``validate FILE`` checks a local
config file; ``config-dump`` prints the running daemon's state; ``debug dump`` and
``debug bundle`` read its debug views.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import ztunnel_py
from ztunnel_py import config as config_mod
from ztunnel_py.errors import ConfigError, LocalConfigError, ZtunnelError
from ztunnel_py.identity.errors import LocalCaError
from ztunnel_py.telemetry import logging as zlog
from ztunnel_py.xds.local import load_local_config_file

log = logging.getLogger("ztunnel_py")

EXIT_CONFIG = 78  # EX_CONFIG


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ztunnel-py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the node proxy (configured by environment variables)")
    proxy = sub.add_parser(
        "proxy", help="same as run; `proxy ztunnel` is what istio's chart passes"
    )
    proxy.add_argument("kind", choices=["ztunnel"])
    v = sub.add_parser(
        "validate", help="check a local config file (ztunnel's LOCAL_XDS_PATH format)"
    )
    v.add_argument("file", type=Path)
    d = sub.add_parser("config-dump", help="print the running daemon's /config_dump")
    d.add_argument("--admin", help="admin address (default 127.0.0.1:ADMIN_PORT, or :15000)")
    b = sub.add_parser(
        "uninstall-bpf",
        help="detach and unpin this node's BPF programs and maps (BPF_PIN_PATH); stops redirection",
    )
    b.add_argument("--pin-path", type=Path, help="default: BPF_PIN_PATH or /sys/fs/bpf/ztunnel-py")
    admin_help = "admin address (default 127.0.0.1:ADMIN_PORT, or :15000)"
    dbg = sub.add_parser("debug", help="the running daemon's debug views (admin /debug)")
    dbg_sub = dbg.add_subparsers(dest="debug_command", required=True)
    dd = dbg_sub.add_parser("dump", help="print /debug/dump (or some of its sections)")
    dd.add_argument("--section", action="append", default=[], help="e.g. connections, bpf, xds")
    dd.add_argument("--admin", help=admin_help)
    db = dbg_sub.add_parser("bundle", help="write a tar.gz of every debug view, metrics, logs")
    db.add_argument("--admin", help=admin_help)
    db.add_argument(
        "--stats",
        default=f"127.0.0.1:{os.environ.get('STATS_PORT', config_mod.PORT_STATS)}",
        help="metrics address (127.0.0.1:15020)",
    )
    db.add_argument("-o", "--output", type=Path, help="default: ./ztunnel-py-debug-<time>.tar.gz")
    db.add_argument("--log", type=Path, action="append", default=[], help="a log file to add")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in {"run", "proxy"}:
        return _run()
    if args.command == "validate":
        return _validate(args.file)
    if args.command == "config-dump":
        return _config_dump(args.admin)
    if args.command == "debug":
        return _debug(args)
    if args.command == "uninstall-bpf":
        return _uninstall_bpf(args.pin_path)
    print(f"ztunnel-py {ztunnel_py.__version__}")
    return 0


def _run() -> int:
    try:
        cfg = config_mod.from_env()
    except ConfigError as e:
        print(f"ztunnel-py: {e}", file=sys.stderr)
        return EXIT_CONFIG
    levels = zlog.configure(cfg.log_level, json_format=cfg.log_format is config_mod.LogFormat.JSON)
    from ztunnel_py.app import App

    async def main_async() -> int:
        return await App(cfg, levels=levels).run()

    try:
        return _run_loop(main_async())
    except LocalConfigError as e:
        log.error("invalid local config: %s", e)
        return EXIT_CONFIG
    except LocalCaError as e:
        log.error("cannot use the local CA: %s", e)
        return EXIT_CONFIG
    except ZtunnelError as e:  # e.g. REDIRECT_MODE=ebpf on a kernel or host that cannot
        log.error("cannot start: %s", e)
        return EXIT_CONFIG
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """uvloop when installed (2-4x asyncio's socket throughput), else plain asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))


def _validate(path: Path) -> int:
    try:
        batch = load_local_config_file(path)
    except LocalConfigError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    print(
        f"ok: {path}: {len(batch.workloads)} workloads, {len(batch.services)} services, "
        f"{len(batch.policies)} policies"
    )
    return 0


def _uninstall_bpf(pin_path: Path | None) -> int:
    """Pinned programs outlive the daemon on purpose (pods fail closed); this removes them."""
    from ztunnel_py.bpf.loader import BpfLoader  # loads libbpf: only for this command

    path = pin_path or config_mod.bpf_pin_path_from_env()
    if not path.exists():
        print(f"nothing pinned at {path}")
        return 0
    try:
        BpfLoader(pin_path=path, cgroup_path=Path("/")).uninstall()
    except OSError as e:
        print(f"cannot remove {path}: {e}", file=sys.stderr)
        return 1
    print(f"removed the BPF programs and maps pinned at {path}")
    return 0


def _admin_address(admin: str | None) -> str:
    """``--admin``, else 127.0.0.1 and the admin port the daemon reads from the environment."""
    return admin or f"127.0.0.1:{config_mod.admin_port_from_env()}"


def _debug(args: argparse.Namespace) -> int:
    from ztunnel_py import debug_client

    try:
        admin = _admin_address(args.admin)
    except ConfigError as e:
        print(f"ztunnel-py: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.debug_command == "dump":
        return debug_client.dump(admin, args.section)
    return debug_client.bundle(admin, args.stats, args.output, args.log)


def _config_dump(admin: str | None) -> int:
    try:
        admin = _admin_address(admin)
    except ConfigError as e:
        print(f"ztunnel-py: {e}", file=sys.stderr)
        return EXIT_CONFIG
    url = f"http://{admin}/config_dump"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.load(resp)
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot reach the admin port at {url}: {e}; is ztunnel-py running?", file=sys.stderr)
        return 1
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
