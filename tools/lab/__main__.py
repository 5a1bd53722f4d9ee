"""Run the Istio lab until Ctrl-C: ``python -m tools.lab [--control-plane-only]`` (root).

Without options: the control plane plus a 2-node testbed with one ztunnel-py per node, as the
tests use it. ``--control-plane-only``: etcd, kube-apiserver and istiod alone (no root needed).
Prints the kubeconfig and istiod's address; everything is removed on exit.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from tools.lab.controlplane import ControlPlane
from tools.lab.mesh import LabMesh, LabOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.lab", description=__doc__)
    parser.add_argument("--control-plane-only", action="store_true")
    parser.add_argument("--redirect", choices=["iptables", "ebpf"], default="iptables")
    args = parser.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    work = Path(tempfile.mkdtemp(prefix="ztunnel-py-lab-"))
    if args.control_plane_only:
        cp = ControlPlane(work)
        cp.start()
        lab = None
    else:
        lab = LabMesh(LabOptions(redirect=args.redirect), work)
        lab.up()
        cp = lab.cp
    try:
        print(f"kubeconfig: {cp.kubeconfig}")
        print(f"istiod:     {cp.istiod_address} (debug {cp.istiod_debug_url})")
        print(f"start-up:   {cp.timings}")
        if lab is not None:
            for name, daemon in lab.daemons.items():
                print(f"{name}: ztunnel-py admin {daemon.admin}")
        print("running; Ctrl-C to stop", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        if lab is not None:
            lab.down()
        else:
            cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
