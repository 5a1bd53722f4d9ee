"""The compiled BPF objects (``bpf/out``): loaded with their maps pinned by name and shared.

Every object pins its maps under one ``maps_dir``, so the cgroup programs and each pod's
sk_lookup instance use the same maps, and a restarted daemon reuses the pinned ones. libbpf
refuses a pinned map whose type, sizes or flags differ: that is ``IncompatiblePinnedState``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.errors import BpfError, IncompatiblePinnedState, LibbpfError
from ztunnel_py.bpf.libbpf import BpfObject
from ztunnel_py.bpf.maps import LibbpfMap

DEFAULT_OBJECT_DIR = Path(__file__).resolve().parents[2] / "bpf" / "out"


class ObjectFiles:
    """Loads the objects of ``object_dir`` against the pinned maps of ``maps_dir``."""

    def __init__(self, object_dir: Path, maps_dir: Path, *, pin_path: Path) -> None:
        self.object_dir = object_dir
        self.maps_dir = maps_dir
        self.pin_path = pin_path  # named in errors about the pinned state

    def path(self, name: str) -> Path:
        path = self.object_dir / name
        if not path.is_file():
            raise BpfError(
                f"BPF object {path} is missing: build it with `make -C bpf` "
                "(clang, libbpf-dev) or install a package that ships bpf/out"
            )
        return path

    def load(self, name: str, rodata: dict[str, bytes] | None = None) -> BpfObject:
        """Open and load object file ``name``, its ``.rodata`` variables set first."""
        obj = BpfObject(self.path(name), pin_root_path=self.maps_dir)
        try:
            if rodata:
                set_rodata(obj, rodata)
            obj.load()
        except LibbpfError as e:
            obj.close()
            if "couldn't reuse pinned map" in e.log:
                reason = next(
                    line for line in e.log.splitlines() if "couldn't reuse pinned map" in line
                )
                raise IncompatiblePinnedState(str(self.pin_path), reason.strip()) from e
            raise
        return obj

    def pinned_version(self) -> bool:
        """Whether a previous daemon's configured maps are pinned (and of this build's ABI)."""
        version_pin = self.maps_dir / t.MAP_VERSION
        others = [p.name for p in self.maps_dir.iterdir()] if self.maps_dir.exists() else []
        if not version_pin.exists():
            if others:
                raise IncompatiblePinnedState(
                    str(self.pin_path), f"maps {sorted(others)} are pinned without {t.MAP_VERSION}"
                )
            return False
        version_map = LibbpfMap.open_pinned(t.MAP_VERSION, version_pin)
        try:
            raw = version_map.lookup(struct.pack("=I", 0))
        finally:
            version_map.close()
        found = t.ZtVersion.from_buffer_copy(raw).abi_version
        if found == 0:
            return False  # created but never configured: a crash during the first start
        if found != t.ZT_ABI_VERSION:
            raise IncompatiblePinnedState(
                str(self.pin_path),
                f"its maps have ABI version {found}, this build uses {t.ZT_ABI_VERSION}",
            )
        return True

    def open_maps(self) -> dict[str, LibbpfMap]:
        """Every pinned map of this build, opened from its pin (the kernel splice's are not)."""
        return {
            name: LibbpfMap.open_pinned(name, self.maps_dir / name)
            for name, spec in t.MAP_SPECS.items()
            if spec.pinned
        }


def set_rodata(obj: BpfObject, values: dict[str, bytes]) -> None:
    rodata = next((m for m in obj.maps() if m.name.endswith(".rodata")), None)
    if rodata is None:
        raise BpfError(f"{obj.path} has no .rodata section for {sorted(values)}")
    data = bytearray(rodata.initial_value())
    for name, value in values.items():
        var = t.RODATA_VARS[name]
        if len(value) != var.size:
            raise ValueError(f"{name} is {var.size} bytes, got {len(value)}")
        data[var.offset : var.offset + var.size] = value
    rodata.set_initial_value(bytes(data))
