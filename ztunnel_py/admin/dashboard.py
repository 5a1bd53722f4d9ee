"""``/`` on the admin port: a page with every endpoint and the node at a glance. Pure.

Like ztunnel's dashboard it lists the admin endpoints; it also shows this node's pods, their
live connections and the authorization policies, from the same data the debug views serve.
Every value is HTML-escaped (pod names and policy names come from the cluster).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from ztunnel_py.admin.debug import EXTRA_VIEWS, SECTIONS

ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/config_dump", "workloads, services, policies, certificates, workloadState (istioctl)"),
    ("/debug", "index of the debug views (JSON)"),
    *((f"/debug/{name}", text) for name, text in {**SECTIONS, **EXTRA_VIEWS}.items()),
    ("/logging", "POST: current levels; ?level=ztunnel::proxy=debug,info to change; ?reset"),
    ("/quitquitquit", "POST: drain connections and exit"),
)

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin-top: 0.4em; background: #fff; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #2f5d8a; color: #fff; } tr:nth-child(even) td { background: #eef3f8; }
.up { color: #1b7f3b; font-weight: bold; } .pending { color: #b36b00; font-weight: bold; }
.muted { color: #777; } code { font-size: 0.95em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(*, version: str, facts: Mapping[str, Any], stats_port: int, ready_port: int) -> str:
    """The page. ``facts``: ``node``; ``pods`` (``/debug/pods``); ``connections`` (workload uid
    -> {"inbound": [...], "outbound": [...]}); ``policies`` (as in ``/config_dump``)."""
    node: str = facts.get("node") or ""
    pods: Sequence[Mapping[str, Any]] = facts.get("pods") or []
    connections: Mapping[str, Mapping[str, Sequence[Any]]] = facts.get("connections") or {}
    policies: Sequence[Mapping[str, Any]] = facts.get("policies") or []
    pod_rows = []
    for pod in pods:
        state = str(pod.get("state") or "")
        conns = connections.get(str(pod.get("workload") or ""), {})
        pod_rows.append(
            [
                _e(f"{pod.get('namespace')}/{pod.get('name')}"),
                f'<span class="{_e(state.lower())}">{_e(state)}</span>',
                _e(", ".join(pod.get("ips") or [])),
                _e(pod.get("serviceAccount") or ""),
                _e(len(conns.get("inbound", []))),
                _e(len(conns.get("outbound", []))),
            ]
        )
    conn_rows = [
        [
            _e(uid),
            _e(direction),
            _e(c.get("src")),
            _e(c.get("actualDst")),
            _e(c.get("originalDst") or ""),
            _e(c.get("protocol")),
        ]
        for uid, lists in sorted(connections.items())
        for direction in ("inbound", "outbound")
        for c in lists.get(direction, [])
    ]
    policy_rows = [
        [
            _e(f"{p.get('namespace')}/{p.get('name')}"),
            _e(p.get("action")),
            _e(p.get("scope")),
            _e(len(p.get("rules") or [])),
            _e("yes" if p.get("dryRun") else ""),
        ]
        for p in policies
    ]
    endpoint_rows = [[f'<a href="{_e(path)}">{_e(path)}</a>', _e(text)] for path, text in ENDPOINTS]
    pods_table = _table(
        ["pod", "state", "IPs", "service account", "inbound", "outbound"],
        pod_rows,
        "no pod enrolled on this node",
    )
    conns_table = _table(
        ["workload", "direction", "source", "destination", "original destination", "protocol"],
        conn_rows,
        "no live connection",
    )
    policies_table = _table(
        ["policy", "action", "scope", "rules", "dry run"], policy_rows, "no authorization policy"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ztunnel-py admin</title><style>{_STYLE}</style></head>
<body>
<h1>ztunnel-py {_e(version)}</h1>
<p class="muted">node {_e(node or "(NODE_NAME unset)")} &middot; metrics on :{stats_port}/metrics
&middot; readiness on :{ready_port}/healthz/ready</p>
<h2 id="pods">Pods ({len(pod_rows)})</h2>
{pods_table}
<h2 id="connections">Connections ({len(conn_rows)})</h2>
{conns_table}
<h2 id="policies">Authorization policies ({len(policy_rows)})</h2>
{policies_table}
<h2 id="endpoints">Endpoints</h2>
{_table(["path", "what"], endpoint_rows, "")}
</body></html>
"""
