"""The ``/debug`` views: which there are, one document of all of them, secrets kept out. Pure.

The admin server gathers each section from the running parts (plain JSON-able values); this
module names and orders the sections, assembles ``/debug/dump``, turns a section that could not
be gathered into an error entry instead of a failed page, and scrubs anything secret (private
keys, tokens, passwords) whatever section it turned up in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: name -> what it shows, in the order ``/debug/dump`` lists them.
SECTIONS: Mapping[str, str] = {
    "build": "version, Python, event loop, process, uptime",
    "config": "the configuration read from the environment (secrets left out)",
    "xds": "control plane: istiod and the stream, per type versions, nonces, last ACK/NACK"
    " with refused resources, on-demand subscriptions (or the local config file)",
    "certificates": "workload certificates: state, validity, next rotation",
    "pods": "enrolled pods: state, xDS workload, addresses, netns",
    "listeners": "the admin, metrics and readiness servers and every pod's proxy ports",
    "connections": "live connections per workload, and the HBONE connection pools",
    "bpf": "eBPF programs and attach points, every map's content decoded",
    "redirect": "redirect mode and how pods are captured",
    "errors": "the last warnings and errors logged",
    "runtime": "asyncio tasks, event-loop lag, threads, memory",
}

#: Other views under ``/debug`` that are not sections of the dump.
EXTRA_VIEWS: Mapping[str, str] = {
    "dump": "every section above in one JSON document (?section=a,b for some)",
    "logs": "the last log lines the daemon wrote (bounded)",
    "pprof/profile": "CPU profile of the running daemon: ?seconds=1-300 (default 10),"
    " ?format=collapsed (flamegraph.pl, speedscope) or speedscope (JSON)",
    "pprof/heap": "top memory allocations (tracemalloc, started on first use): ?limit=N",
}

REDACTED = "<redacted>"
# Keys whose values are secret wherever they appear, matched on the lower-cased key with
# separators removed (privateKey, private_key and PRIVATE-KEY all count): by their ending, and
# HTTP header names exactly (a netnsCookie is no cookie).
_SECRET_ENDINGS = ("privatekey", "token", "password", "secret", "keypem")
_SECRET_NAMES = frozenset({"authorization", "proxyauthorization", "cookie", "setcookie"})
_PRIVATE_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


class UnknownSection(ValueError):
    pass


def index() -> dict[str, Any]:
    """``/debug``: every view with its path and description."""
    views = [{"path": f"/debug/{n}", "description": d} for n, d in SECTIONS.items()]
    views += [{"path": f"/debug/{n}", "description": d} for n, d in EXTRA_VIEWS.items()]
    return {"views": views}


def parse_sections(requested: Sequence[str]) -> list[str]:
    """``?section=a,b`` (repeatable) -> known section names in dump order; all when empty."""
    names = [n.strip() for item in requested for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise UnknownSection(
            f"unknown section {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}"
        )
    return [n for n in SECTIONS if n in names] if names else list(SECTIONS)


def gather(
    providers: Mapping[str, Callable[[], Any]], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Call each provider; one that fails shows its error instead of hiding the others."""
    out: dict[str, Any] = {}
    for name in names if names is not None else SECTIONS:
        provider = providers.get(name)
        if provider is None:
            out[name] = None  # not part of this daemon (no istiod, no BPF...)
            continue
        try:
            out[name] = redact(provider())
        except Exception as e:  # noqa: BLE001 (a broken view must not break the dump)
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def redact(value: Any) -> Any:
    """A copy of ``value`` with secret keys' values and private-key PEM blocks replaced."""
    if isinstance(value, Mapping):
        return {k: _redact_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and _PRIVATE_PEM.search(value):
        return REDACTED
    if isinstance(value, bytes):
        return REDACTED if _PRIVATE_PEM.search(value.decode("latin-1")) else value.hex()
    return value


def _redact_item(key: str, value: Any) -> Any:
    normalized = re.sub(r"[^a-z]", "", key.lower())
    secret = normalized in _SECRET_NAMES or normalized.endswith(_SECRET_ENDINGS)
    if secret and value not in (None, "", False):
        return REDACTED if value != REDACTED else value
    return redact(value)


def certificate_summary(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``/config_dump`` certificates without the PEM bodies: who, state, serials, validity."""
    out = []
    for entry in entries:
        item = {k: v for k, v in entry.items() if k not in {"certChain", "rootCerts"}}
        for key in ("certChain", "rootCerts"):
            item[key] = [
                {k: v for k, v in cert.items() if k != "pem"} for cert in entry.get(key, [])
            ]
        out.append(item)
    return out
