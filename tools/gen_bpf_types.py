"""Generate ``ztunnel_py/bpf/_types.py`` from the BTF of the compiled BPF objects.

The BPF side (``bpf/include/zt_maps.h``) is the single source of truth for map layouts; this
tool reads the BTF that clang put into ``bpf/out/*.o`` (``bpftool -j btf dump file``) and writes
ctypes Structures, ``SIZEOF_*`` constants, map and program names with their specs, and the
``ZT_*`` integer constants of the header (read with the C preprocessor, since BTF carries no
macros). ``--check`` exits 1 when the committed file differs from what the objects say.

Usage: ``make -C bpf && python tools/gen_bpf_types.py [--check]``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OBJECTS = ROOT / "bpf" / "out"
HEADER = ROOT / "bpf" / "include" / "zt_maps.h"
# Headers whose ZT_* constants are generated too (the kernel splice's layouts are not pinned).
EXTRA_HEADERS = (ROOT / "bpf" / "include" / "zt_splice.h",)
OUTPUT = ROOT / "ztunnel_py" / "bpf" / "_types.py"

_CTYPES_BY_INT = {
    (1, False): "ctypes.c_uint8",
    (2, False): "ctypes.c_uint16",
    (4, False): "ctypes.c_uint32",
    (8, False): "ctypes.c_uint64",
    (1, True): "ctypes.c_int8",
    (2, True): "ctypes.c_int16",
    (4, True): "ctypes.c_int32",
    (8, True): "ctypes.c_int64",
}
_MAP_ATTRS = {
    "type",
    "max_entries",
    "map_flags",
    "key",
    "value",
    "pinning",
    "key_size",
    "value_size",
}


class GenError(Exception):
    pass


@dataclass(frozen=True)
class Member:
    name: str
    ctype: str  # ctypes expression
    offset: int  # bytes
    annotation: str


@dataclass(frozen=True)
class StructDef:
    name: str
    size: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class MapDef:
    name: str
    map_type: int
    key_type: str
    key_size: int
    value_type: str
    value_size: int
    max_entries: int
    flags: int
    pinned: bool


@dataclass(frozen=True)
class ProgDef:
    name: str
    section: str
    object_file: str


@dataclass(frozen=True)
class RodataVar:
    name: str
    object_file: str
    offset: int
    size: int


@dataclass
class Collected:
    structs: dict[str, StructDef] = field(default_factory=dict)
    maps: dict[str, MapDef] = field(default_factory=dict)
    progs: dict[str, ProgDef] = field(default_factory=dict)
    rodata: dict[str, RodataVar] = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- BTF


class Btf:
    def __init__(self, dump: dict[str, Any]) -> None:
        self.types: dict[int, dict[str, Any]] = {t["id"]: t for t in dump["types"]}

    def strip(self, type_id: int) -> dict[str, Any]:
        """Follow typedefs and qualifiers to the underlying type."""
        t = self.types[type_id]
        while t["kind"] in {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}:
            t = self.types[t["type_id"]]
        return t

    def size_of(self, type_id: int) -> int:
        t = self.strip(type_id)
        if t["kind"] in {"INT", "STRUCT", "UNION", "ENUM"}:
            return int(t["size"])
        if t["kind"] == "ARRAY":
            return int(t["nr_elems"]) * self.size_of(t["type_id"])
        raise GenError(f"cannot size BTF kind {t['kind']}")

    def c_name(self, type_id: int) -> str:
        t = self.types[type_id]
        if t["kind"] == "STRUCT":
            return f"struct {t['name']}"
        return str(t["name"])

    def ctype_of(self, type_id: int) -> tuple[str, str]:
        """The ctypes expression and the attribute annotation for a member type."""
        t = self.strip(type_id)
        if t["kind"] == "INT":
            signed = t.get("encoding") == "SIGNED"
            return _CTYPES_BY_INT[(int(t["size"]), signed)], "int"
        if t["kind"] == "ARRAY":
            inner, _ = self.ctype_of(t["type_id"])
            return f"{inner} * {t['nr_elems']}", f"ctypes.Array[{inner}]"
        if t["kind"] == "STRUCT" and t["name"].startswith("zt_"):
            cls = class_name(t["name"])
            return cls, cls
        raise GenError(f"unsupported member type {t['kind']} {t.get('name')}")

    def pointee_array_len(self, type_id: int) -> int:
        """``__uint(name, N)`` is encoded as ``int (*name)[N]``."""
        ptr = self.types[type_id]
        return int(self.types[ptr["type_id"]]["nr_elems"])


def class_name(c_name: str) -> str:
    return "".join(part.capitalize() for part in c_name.split("_"))


def const_name(prefix: str, c_name: str) -> str:
    return prefix + c_name.removeprefix("zt_").upper()


def load_btf(obj: Path) -> Btf:
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        raise GenError("bpftool not found on PATH (Debian package bpftool)")
    proc = subprocess.run(
        [bpftool, "-j", "btf", "dump", "file", str(obj)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise GenError(f"bpftool btf dump {obj}: {proc.stderr.strip()}")
    return Btf(json.loads(proc.stdout))


def collect_object(obj: Path, btf: Btf, out: Collected) -> None:
    symbols = elf_symbols(obj)
    sections = {sym.name: sym.section for sym in symbols if sym.kind == 2}
    for sym in symbols:
        if sym.kind == 1 and sym.section == ".rodata":
            out.rodata[sym.name] = RodataVar(sym.name, obj.name, sym.value, sym.size)
    for t in btf.types.values():
        if t["kind"] == "STRUCT" and t["name"].startswith("zt_"):
            members = []
            for m in t["members"]:
                if m["bits_offset"] % 8:
                    raise GenError(f"struct {t['name']}.{m['name']}: bit fields are not allowed")
                ctype, annotation = btf.ctype_of(m["type_id"])
                members.append(Member(m["name"], ctype, m["bits_offset"] // 8, annotation))
            sdef = StructDef(t["name"], int(t["size"]), tuple(members))
            known = out.structs.setdefault(sdef.name, sdef)
            if known != sdef:
                raise GenError(f"struct {sdef.name} differs between objects; rebuild them all")
        elif t["kind"] == "DATASEC" and t["name"] == ".maps":
            for var in t["vars"]:
                mdef = map_def(btf, var["type_id"])
                known_map = out.maps.setdefault(mdef.name, mdef)
                if known_map != mdef:
                    raise GenError(f"map {mdef.name} differs between objects; rebuild them all")
        elif t["kind"] == "FUNC" and t.get("linkage") == "global":
            section = sections.get(t["name"])
            if section is None:
                raise GenError(f"{obj.name}: no ELF section found for program {t['name']}")
            out.progs[t["name"]] = ProgDef(t["name"], section, obj.name)


def map_def(btf: Btf, var_id: int) -> MapDef:
    var = btf.types[var_id]
    spec = btf.strip(var["type_id"])
    attrs = {m["name"]: m["type_id"] for m in spec["members"]}
    unknown = set(attrs) - _MAP_ATTRS
    if unknown:
        raise GenError(f"map {var['name']}: unsupported attributes {sorted(unknown)}")

    def number(attr: str) -> int:
        return btf.pointee_array_len(attrs[attr]) if attr in attrs else 0

    def typed(attr: str) -> tuple[str, int]:
        """(C name, size) of the key or value; a ring buffer has neither: ("", 0)."""
        if attr not in attrs:
            return "", 0
        type_id = btf.types[attrs[attr]]["type_id"]
        return btf.c_name(type_id), btf.size_of(type_id)

    (key_type, key_size), (value_type, value_size) = typed("key"), typed("value")
    return MapDef(
        name=var["name"],
        map_type=number("type"),
        key_type=key_type,
        key_size=key_size,
        value_type=value_type,
        value_size=value_size,
        max_entries=number("max_entries"),
        flags=number("map_flags"),
        pinned=number("pinning") != 0,
    )


# ---------------------------------------------------------------- ELF (section of each program)


@dataclass(frozen=True)
class Symbol:
    name: str
    section: str
    kind: int  # STT_FUNC 2, STT_OBJECT 1
    value: int  # offset in its section
    size: int


def elf_symbols(obj: Path) -> list[Symbol]:
    """The global symbols of a 64-bit little-endian ELF object, with their section names."""
    data = obj.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GenError(f"{obj}: not a 64-bit little-endian ELF object")
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [
        struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)
    ]

    def strtab(index: int, offset: int) -> str:
        base = headers[index][4] + offset
        return data[base : data.index(b"\0", base)].decode()

    names = [strtab(e_shstrndx, h[0]) for h in headers]
    result: list[Symbol] = []
    for h in headers:
        if h[1] != 2:  # SHT_SYMTAB
            continue
        sh_offset, sh_size, sh_link, sh_entsize = h[4], h[5], h[6], h[9]
        for i in range(sh_size // sh_entsize):
            st_name, st_info, _other, st_shndx, st_value, st_size = struct.unpack_from(
                "<IBBHQQ", data, sh_offset + i * sh_entsize
            )
            if st_info >> 4 == 1 and 0 < st_shndx < len(names):  # STB_GLOBAL, defined
                name = strtab(sh_link, st_name)
                result.append(Symbol(name, names[st_shndx], st_info & 0xF, st_value, st_size))
    return result


# ---------------------------------------------------------------- header constants


def header_constants(header: Path) -> dict[str, int]:
    clang = shutil.which("clang")
    if clang is None:
        raise GenError("clang not found on PATH (needed to read the ZT_* constants)")
    multiarch = subprocess.run(
        [clang, "-print-multiarch"], capture_output=True, text=True, check=False
    ).stdout.strip()
    argv = [clang, "-dM", "-E", "-x", "c", "-target", "bpf", f"-I{header.parent}"]
    if multiarch:
        argv.append(f"-I/usr/include/{multiarch}")
    proc = subprocess.run([*argv, str(header)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GenError(f"clang -dM -E {header}: {proc.stderr.strip()}")
    consts: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        m = re.fullmatch(r"#define (ZT_[A-Z0-9_]+) (0x[0-9a-fA-F]+|\d+)[uUlL]*", line.strip())
        if m:
            consts[m.group(1)] = int(m.group(2), 0)
    return dict(sorted(consts.items()))


# ---------------------------------------------------------------- rendering


def render(col: Collected, consts: dict[str, int]) -> str:
    lines = [
        '"""Map layouts, map and program names of the BPF objects. GENERATED, do not edit.',
        "",
        "Written by tools/gen_bpf_types.py from the BTF of bpf/out/*.o and the ZT_* constants of",
        "bpf/include/zt_maps.h and zt_splice.h. Change a header, rebuild (make -C bpf), then",
        "rerun the tool.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import ctypes",
        "from dataclasses import dataclass",
        "",
        "# --- constants of bpf/include/zt_maps.h and zt_splice.h",
        "",
    ]
    lines += [f"{name} = {value}" for name, value in consts.items()]
    lines += ["", "# --- map keys and values", ""]
    for sdef in order_structs(col.structs):
        cls = class_name(sdef.name)
        lines += [
            "",
            f"class {cls}(ctypes.Structure):",
            f'    """``struct {sdef.name}`` ({sdef.size} bytes)."""',
            "",
        ]
        lines += [f"    {m.name}: {m.annotation}" for m in sdef.members]
        lines += ["", "    _fields_ = ["]
        lines += [f'        ("{m.name}", {m.ctype}),' for m in sdef.members]
        lines += ["    ]", "", ""]
        lines += [f"SIZEOF_{sdef.name.upper()} = {sdef.size}"]
    lines += [
        "",
        "STRUCTS: dict[str, type[ctypes.Structure]] = {",
        *[f'    "{s.name}": {class_name(s.name)},' for s in order_structs(col.structs)],
        "}",
        "SIZEOF: dict[str, int] = {",
        *[f'    "{s.name}": {s.size},' for s in order_structs(col.structs)],
        "}",
        "",
        "# --- maps (pinned by name under <pin path>/maps when ``pinned``)",
        "",
        "",
        "@dataclass(frozen=True, slots=True)",
        "class MapSpec:",
        "    name: str",
        "    map_type: int  # BPF_MAP_TYPE_*",
        "    key_type: str  # C type",
        "    key_size: int",
        "    value_type: str",
        "    value_size: int",
        "    max_entries: int",
        "    flags: int",
        "    pinned: bool",
        "",
        "",
    ]
    for mdef in sorted(col.maps.values(), key=lambda m: m.name):
        lines.append(f'{const_name("MAP_", mdef.name)} = "{mdef.name}"')
    lines += ["", "MAP_SPECS: dict[str, MapSpec] = {"]
    for mdef in sorted(col.maps.values(), key=lambda m: m.name):
        lines += [
            f'    "{mdef.name}": MapSpec(',
            f'        name="{mdef.name}",',
            f"        map_type={mdef.map_type},",
            f'        key_type="{mdef.key_type}",',
            f"        key_size={mdef.key_size},",
            f'        value_type="{mdef.value_type}",',
            f"        value_size={mdef.value_size},",
            f"        max_entries={mdef.max_entries},",
            f"        flags={mdef.flags},",
            f"        pinned={mdef.pinned},",
            "    ),",
        ]
    lines += [
        "}",
        "",
        "# --- programs",
        "",
        "",
        "@dataclass(frozen=True, slots=True)",
        "class ProgSpec:",
        "    name: str",
        "    section: str  # libbpf section name, which sets the program and attach type",
        "    object_file: str  # in bpf/out",
        "",
        "",
    ]
    for pdef in sorted(col.progs.values(), key=lambda p: p.name):
        lines.append(f'{const_name("PROG_", pdef.name)} = "{pdef.name}"')
    lines += ["", "PROG_SPECS: dict[str, ProgSpec] = {"]
    for pdef in sorted(col.progs.values(), key=lambda p: p.name):
        lines.append(
            f'    "{pdef.name}": ProgSpec("{pdef.name}", "{pdef.section}", "{pdef.object_file}"),'
        )
    lines += ["}", f"OBJECT_FILES = ({', '.join(repr(o) for o in col.objects)},)", ""]
    lines += [
        "",
        "@dataclass(frozen=True, slots=True)",
        "class RodataVar:",
        '    """A ``const volatile`` global the loader sets before loading its object."""',
        "",
        "    name: str",
        "    object_file: str",
        "    offset: int  # in the object's .rodata",
        "    size: int",
        "",
        "",
        "RODATA_VARS: dict[str, RodataVar] = {",
    ]
    for var in sorted(col.rodata.values(), key=lambda v: v.name):
        args = f'"{var.name}", "{var.object_file}", {var.offset}, {var.size}'
        lines.append(f'    "{var.name}": RodataVar({args}),')
    lines += ["}", ""]
    return "\n".join(lines)


def order_structs(structs: dict[str, StructDef]) -> list[StructDef]:
    """Dependencies first (a struct member of struct type), then by name."""
    done: dict[str, StructDef] = {}

    def visit(s: StructDef) -> None:
        if s.name in done:
            return
        for m in s.members:
            for dep in structs.values():
                if class_name(dep.name) == m.ctype:
                    visit(dep)
        done[s.name] = s

    for s in sorted(structs.values(), key=lambda s: s.name):
        visit(s)
    return list(done.values())


def self_check(source: str, col: Collected) -> None:
    """ctypes must lay every struct out exactly as BTF says."""
    namespace: dict[str, Any] = {}
    exec(compile(source, str(OUTPUT), "exec"), namespace)
    for sdef in col.structs.values():
        cls = namespace[class_name(sdef.name)]
        if ctypes.sizeof(cls) != sdef.size:
            raise GenError(
                f"ctypes size of {sdef.name} is {ctypes.sizeof(cls)}, BTF says {sdef.size}"
            )
        for m in sdef.members:
            if getattr(cls, m.name).offset != m.offset:
                raise GenError(f"ctypes offset of {sdef.name}.{m.name} differs from BTF")


def generate(objects_dir: Path, header: Path) -> str:
    objs = sorted(objects_dir.glob("*.o"))
    if not objs:
        raise GenError(f"no objects in {objects_dir}: build them first (make -C bpf)")
    col = Collected(objects=[o.name for o in objs])
    for obj in objs:
        collect_object(obj, load_btf(obj), col)
    consts = header_constants(header)
    for extra in EXTRA_HEADERS:
        consts.update(header_constants(extra))
    source = render(col, dict(sorted(consts.items())))
    self_check(source, col)
    ruff = shutil.which("ruff")
    if ruff is not None:  # keep the committed file formatted like the rest of the tree
        proc = subprocess.run(
            [ruff, "format", "--quiet", "--stdin-filename", str(OUTPUT), "-"],
            input=source,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            source = proc.stdout
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the output is stale")
    parser.add_argument("--objects", type=Path, default=DEFAULT_OBJECTS)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    try:
        source = generate(args.objects, HEADER)
    except GenError as e:
        print(f"gen_bpf_types: {e}", file=sys.stderr)
        return 2
    current = args.output.read_text() if args.output.exists() else ""
    if args.check:
        if current != source:
            print(
                f"{args.output} is stale: run `make -C bpf && python tools/gen_bpf_types.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != source:
        args.output.write_text(source)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
