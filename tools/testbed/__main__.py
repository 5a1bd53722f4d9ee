"""``python -m tools.testbed up|down|status``: the testbed from the command line (root)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools.testbed.bed import DEFAULT_STATE_DIR, Testbed, TestbedError, TestbedOptions
from tools.testbed.plan import IP_FAMILIES, PlanError, make_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.testbed", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a testbed")
    up.add_argument("--tag", default="tb", help="names carry zttb-<tag>- (1-8 of a-z0-9)")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--pods", type=int, default=2, help="pods per node")
    up.add_argument(
        "--ip-family",
        choices=IP_FAMILIES,
        default="ipv4",
        help="ipv4, ipv6 (IPv6 only) or dual (dual stack); see tools/testbed/plan.py",
    )
    up.add_argument("--iptables", action="store_true", help="install istio-cni's in-pod rules")
    up.add_argument("--app", choices=["python", "nginx", "none"], default="python")
    up.add_argument("--config", help="where to write the local config YAML")
    down = sub.add_parser("down", help="tear a testbed down (also after a crash)")
    down.add_argument("--tag", help="default: every testbed in the state dir")
    status = sub.add_parser("status", help="print what is up, as JSON")
    status.add_argument("--tag")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            plan = make_plan(args.tag, args.nodes, args.pods, ip_family=args.ip_family)
            bed = Testbed(
                plan,
                TestbedOptions(iptables=args.iptables, app=args.app, config_path=args.config),
                state_dir=args.state_dir,
            )
            bed.up()
            print(json.dumps(bed.status(), indent=2))
            print(f"local config: {bed.config_path}", file=sys.stderr)
        elif args.command == "down":
            tags = [args.tag] if args.tag else Testbed.tags(args.state_dir)
            for tag in tags:
                for item in Testbed.load(tag, state_dir=args.state_dir).down():
                    print(f"removed {item}")
        else:
            tags = [args.tag] if args.tag else Testbed.tags(args.state_dir)
            print(
                json.dumps(
                    [Testbed.load(t, state_dir=args.state_dir).status() for t in tags], indent=2
                )
            )
    except (TestbedError, PlanError) as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
