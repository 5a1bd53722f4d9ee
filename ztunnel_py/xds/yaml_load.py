"""Text of a local config -> plain YAML data, refusing what could exhaust the daemon.

An operator (or whoever can write the watched file) must never be able to make the daemon die
or stall: every document passes these limits before it is turned into Python objects, and each
refusal is a ``LocalConfigError`` that says which limit and where.

* ``MAX_FILE_BYTES``: the file is read up to this size, never further;
* the bytes must be UTF-8 (the error names the byte offset and line);
* ``MAX_DEPTH``: nesting of sequences and mappings (the composer is recursive: 10,000 levels
  would be a ``RecursionError``);
* ``MAX_ALIAS_NODES``: nodes added by expanding aliases, counted with the size of what each
  alias stands for, so a few hundred bytes of nested anchors ("billion laughs") cannot turn
  into hundreds of millions of nodes for the validator to walk and for errors to print; an
  alias inside its own anchor (a cycle) is refused too.

The check is one pass over libyaml's event stream (no objects built), then the document is
loaded with the safe loader (libyaml's when present).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ztunnel_py.errors import MAX_ERROR_CHARS, LocalConfigError

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "MAX_ERROR_CHARS",
    "MAX_FILE_BYTES",
    "load_yaml",
    "read_config_file",
]

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
MAX_ALIAS_NODES = 100_000

_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_EXPLAIN_MAX_CHARS = 1024 * 1024
_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def read_config_file(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The file's text; ``LocalConfigError`` when unreadable, too large or not UTF-8."""
    source = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise LocalConfigError("<file>", f"cannot read: {e.strerror}", source=source) from None
    if len(data) > max_bytes:
        raise LocalConfigError(
            "<file>",
            f"larger than {max_bytes} bytes; split the mesh or raise the limit",
            source=source,
        )
    return decode_utf8(data, source=source)


def decode_utf8(data: bytes, *, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LocalConfigError(
            f"line {line}",
            f"not valid UTF-8 at byte {e.start} ({data[e.start : e.start + 4]!r}); "
            "save the file as UTF-8",
            source=source,
        ) from None


def load_yaml(text: str, *, source: str) -> Any:
    """The document as plain data (``None`` for an empty one), within the limits above."""
    try:
        _check_shape(text)
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 (the safe loader)
    except LocalConfigError as e:
        raise LocalConfigError(e.path, e.reason, source=source) from None
    except yaml.MarkedYAMLError as e:
        e = _clearer_error(text, e)
        mark = e.problem_mark
        where = (
            f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<document>"
        )
        raise LocalConfigError(where, f"not valid YAML: {e.problem}", source=source) from None
    except Exception as e:  # noqa: BLE001 (any failure of the loader only refuses this file)
        raise LocalConfigError(
            "<document>", f"not valid YAML: {type(e).__name__}: {e}", source=source
        ) from None


def _clearer_error(text: str, error: yaml.MarkedYAMLError) -> yaml.MarkedYAMLError:
    """PyYAML's own parser says what it expected where libyaml only says what it did not
    find; it is ~10x slower, so it only re-reads small documents, and only to explain."""
    if _SafeLoader is yaml.SafeLoader or len(text) > _EXPLAIN_MAX_CHARS:
        return error
    try:
        for _ in yaml.parse(text, Loader=yaml.SafeLoader):
            pass
    except yaml.MarkedYAMLError as e:
        return e
    return error


def _check_shape(text: str) -> None:
    """Depth and alias expansion, from the event stream alone."""
    depth = 0
    expanded = 0
    open_nodes: list[list[Any]] = []  # [anchor, nodes so far] per open collection
    sizes: dict[str, int] = {}  # anchor -> nodes it stands for, once complete
    for ev in yaml.parse(text, Loader=_SafeLoader):
        added = 0
        if isinstance(ev, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise LocalConfigError(
                    _where(ev), f"nested deeper than {MAX_DEPTH} levels; flatten the document"
                )
            open_nodes.append([ev.anchor, 1])
            continue
        if isinstance(ev, _CLOSE):
            depth -= 1
            anchor, added = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = added
        elif isinstance(ev, yaml.ScalarEvent):
            added = 1
            if ev.anchor is not None:
                sizes[ev.anchor] = 1
        elif isinstance(ev, yaml.AliasEvent):
            if any(node[0] == ev.anchor for node in open_nodes):
                raise LocalConfigError(_where(ev), f"alias *{ev.anchor} is inside its own anchor")
            added = sizes.get(ev.anchor or "", 1)  # an undefined alias is the loader's error
            expanded += added
            if expanded > MAX_ALIAS_NODES:
                raise LocalConfigError(
                    _where(ev),
                    f"aliases expand to more than {MAX_ALIAS_NODES} nodes; "
                    "write the repeated parts out, or use fewer nested anchors",
                )
        if open_nodes:
            open_nodes[-1][1] += added


def _where(ev: yaml.Event) -> str:
    mark = ev.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<document>"
