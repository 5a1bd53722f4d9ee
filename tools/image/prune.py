"""Image build step: drop the generated protobuf modules the daemon never imports.

``xds-protos`` ships every Envoy API (over 100 MB of ``*_pb2.py``); the daemon uses a handful.
Import every module of the installed ztunnel_py (the test fakes are not installed), then
delete each ``*_pb2*.py`` under the proto packages that is not in ``sys.modules``, and every
package directory none of whose modules was imported. An import that was missed fails with a
plain ModuleNotFoundError naming it.
Run with the image's venv Python, after ``pip install``.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import sys
from pathlib import Path

PROTO_PACKAGES = ("envoy", "udpa", "xds", "validate", "xds_protos")


def import_production_modules() -> None:
    import ztunnel_py

    for info in pkgutil.walk_packages(ztunnel_py.__path__, "ztunnel_py."):
        if info.name.endswith("__main__"):  # importing it would run the daemon
            continue
        importlib.import_module(info.name)


def prune(site: Path) -> tuple[int, int]:
    removed = kept = 0
    for package in PROTO_PACKAGES:
        root = site / package
        if not root.is_dir():
            continue
        for path in root.rglob("*_pb2*.py"):
            module = ".".join(path.relative_to(site).with_suffix("").parts)
            if module in sys.modules:
                kept += 1
                continue
            path.unlink()
            removed += 1
    # Packages left with no module the daemon imports go whole (thousands of directories).
    needed = {site.joinpath(*name.split(".")) for name in sys.modules}
    for package in PROTO_PACKAGES:
        root = site / package
        if not root.is_dir():
            continue
        for directory in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=False):
            if directory.is_dir() and directory.name != "__pycache__" and directory not in needed:
                shutil.rmtree(directory)
    for cache in site.rglob("__pycache__"):
        for pyc in cache.glob("*_pb2*.pyc"):
            if not (cache.parent / (pyc.name.split(".")[0] + ".py")).exists():
                pyc.unlink()
    return removed, kept


def main() -> int:
    import_production_modules()
    import envoy

    site = Path(envoy.__path__[0]).parent
    removed, kept = prune(site)
    print(f"prune: kept {kept} protobuf modules the daemon imports, removed {removed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
