"""Map access: the ``MapOps`` protocol the reconciler writes through, and ``LibbpfMap``.

Keys and values are raw bytes laid out as ``bpf/include/zt_maps.h`` says (``_types`` has the
ctypes view). Deleting a missing key succeeds, as the reconciler expects; looking one up raises
``KeyNotFound``. ``testing.bpf.FakeMapOps`` is the dict-backed stand-in for tests.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ztunnel_py.bpf import _types, libbpf
from ztunnel_py.bpf.errors import KeyNotFound, LibbpfError, MapFull

__all__ = ["KeyNotFound", "LibbpfMap", "MapFull", "MapOps"]


class MapOps(Protocol):
    """One BPF map, as the reconciler and the dump see it."""

    name: str

    def update(self, key: bytes, value: bytes) -> None:
        """Insert or replace (atomic per key for the programs that read it)."""
        ...

    def delete(self, key: bytes) -> None:
        """Remove the entry; a missing key is success."""
        ...

    def lookup(self, key: bytes) -> bytes:
        """The value; ``KeyNotFound`` when there is none."""
        ...

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry (entries removed during the walk are skipped)."""
        ...


class LibbpfMap:
    """A kernel map behind an fd we own (from a loaded object or a pinned path)."""

    def __init__(self, name: str, fd: int, *, spec: _types.MapSpec | None = None) -> None:
        self.name = name
        self.fd = fd
        self.spec = spec or _types.MAP_SPECS[name]
        self.key_size = self.spec.key_size
        self.value_size = self.spec.value_size

    @classmethod
    def open_pinned(cls, name: str, path: Path) -> LibbpfMap:
        return cls(name, libbpf.obj_get(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, the map's are {self.key_size}")

    def update(self, key: bytes, value: bytes) -> None:
        self._check_key(key)
        if len(value) != self.value_size:
            raise ValueError(
                f"{self.name}: value is {len(value)} bytes, the map's are {self.value_size}"
            )
        err = libbpf.map_update(self.fd, key, value)
        if err in {errno.E2BIG, errno.ENOSPC}:
            raise MapFull(self.name, self.spec.max_entries)
        if err:
            raise LibbpfError("bpf_map_update_elem", err, self.name)

    def update_socket(self, key: bytes, sock_fd: int) -> None:
        """SOCKHASH/SOCKMAP: the value written is the socket's fd."""
        self.update(key, sock_fd.to_bytes(self.value_size, "little"))

    def delete(self, key: bytes) -> None:
        self._check_key(key)
        err = libbpf.map_delete(self.fd, key)
        if err and err != errno.ENOENT:
            raise LibbpfError("bpf_map_delete_elem", err, self.name)

    def lookup(self, key: bytes) -> bytes:
        self._check_key(key)
        err, value = libbpf.map_lookup(self.fd, key, self._lookup_size())
        if err == errno.ENOENT:
            raise KeyNotFound(self.name, key)
        if err:
            raise LibbpfError("bpf_map_lookup_elem", err, self.name)
        return value

    def lookup_per_cpu(self, key: bytes) -> list[bytes]:
        """A per-CPU map's value, one slot per possible CPU."""
        raw = self.lookup(key)
        slot = _round8(self.value_size)
        return [raw[i : i + self.value_size] for i in range(0, len(raw), slot)]

    def _lookup_size(self) -> int:
        if self.spec.map_type == libbpf.BPF_MAP_TYPE_PERCPU_ARRAY:
            return _round8(self.value_size) * libbpf.num_possible_cpus()
        return self.value_size

    def keys(self) -> Iterator[bytes]:
        key: bytes | None = None
        while True:
            err, next_key = libbpf.map_next_key(self.fd, key, self.key_size)
            if err == errno.ENOENT:
                return
            if err:
                raise LibbpfError("bpf_map_get_next_key", err, self.name)
            yield next_key
            key = next_key

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            try:
                yield key, self.lookup(key)
            except KeyNotFound:
                continue  # removed by a program since the walk


def _round8(n: int) -> int:
    return (n + 7) & ~7
