"""The generated ctypes layouts agree with the sizes BTF gave the generator (no root)."""

from __future__ import annotations

import ctypes

import pytest

from ztunnel_py.bpf import _types as t


@pytest.mark.parametrize("name", sorted(t.STRUCTS))
def test_types_sizeof_matches_btf(name: str) -> None:
    assert ctypes.sizeof(t.STRUCTS[name]) == t.SIZEOF[name]
    assert getattr(t, f"SIZEOF_{name.upper()}") == t.SIZEOF[name]


@pytest.mark.parametrize("name", sorted(t.MAP_SPECS))
def test_types_map_specs_match_struct_sizes(name: str) -> None:
    spec = t.MAP_SPECS[name]
    for c_type, size in ((spec.key_type, spec.key_size), (spec.value_type, spec.value_size)):
        if c_type.startswith("struct "):
            assert t.SIZEOF[c_type.removeprefix("struct ")] == size
    assert spec.name.startswith("zt_")
    assert len(spec.name) <= 15  # the kernel's map name limit
    # The kernel splice's maps belong to one daemon process; every other map is pinned.
    assert spec.pinned != spec.name.startswith("zt_splice_")


def test_types_counters_are_dense() -> None:
    indexes = sorted(v for k, v in vars(t).items() if k.startswith("ZT_CNT_") and k != "ZT_CNT_MAX")
    assert indexes == list(range(t.ZT_CNT_MAX))
    assert t.MAP_SPECS[t.MAP_COUNTERS].max_entries == t.ZT_CNT_MAX


def test_types_programs_live_in_known_objects() -> None:
    assert {spec.object_file for spec in t.PROG_SPECS.values()} <= set(t.OBJECT_FILES)
    assert t.PROG_SPECS[t.PROG_SK_LOOKUP].section == "sk_lookup"
    assert t.RODATA_VARS["zt_pod_netns_cookie"].size == 8
