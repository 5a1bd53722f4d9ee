"""The ztunnel-py demo: start the daemon on the example mesh and show what it holds."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ztunnel_py.testing.daemon import http, run_daemon

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ztunnel-py-demo-") as tmp:
        env = {"LOCAL_XDS_PATH": str(ROOT / "examples/localhost.yaml"), "LOCAL_CA_DIR": f"{tmp}/ca"}
        with run_daemon(env, log_dir=Path(tmp), wait="ready") as d:
            dump = d.config_dump()
            print(f"ztunnel-py is ready (admin {d.admin}, metrics {d.stats}/metrics)")
            print(f"workloads: {[w['name'] for w in dump['workloads']]}")
            print(f"services:  {[s['hostname'] for s in dump['services']]}")
            print(f"policies:  {[p['namespace'] + '/' + p['name'] for p in dump['policies']]}")
            print("\n/config_dump:")
            json.dump(dump, sys.stdout, indent=2)
            print()
            http(f"{d.admin}/quitquitquit", method="POST")
            return d.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
