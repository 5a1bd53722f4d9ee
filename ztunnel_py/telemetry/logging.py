"""Logging setup: ztunnel's level syntax (``RUST_LOG``) and formats (text, ``LOG_FORMAT=json``).

Structured fields travel in ``extra={"fields": {...}}``; the text format renders them as
``key=value`` after the message (as ztunnel's tracing output does), the JSON format as keys of
the one object per line. A span (``extra={"span": Span}``, the access log's ``inbound{id=..}``)
follows the target in text, as ztunnel writes it, and is one nested object in JSON.
Targets use ztunnel's names where they exist (``access`` for access
logs) and our module names otherwise; ``ztunnel::proxy=debug`` is read as ``ztunnel_py.proxy``
and ``/logging`` shows it back as ``ztunnel::proxy``.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ztunnel_py.log_levels import LEVELS, ROOT_TARGET, display_target, parse_level_spec
from ztunnel_py.telemetry.access_log import Span

_NAMES = {v: k for k, v in LEVELS.items() if k != "warning"}
logging.addLevelName(5, "TRACE")

# Targets ztunnel users know that are not module names of ours.
_EXTRA_TARGETS = ("access",)


class LevelController:
    """Reads and changes levels at run time (``/logging`` on the admin port)."""

    def __init__(self, initial_spec: str) -> None:
        self._initial = initial_spec
        self._targets: dict[str, int] = {}
        self.spec = initial_spec  # the spec applied last
        self.followers: list[Callable[[str], None]] = []  # e.g. data-plane worker processes
        self.apply(initial_spec)

    def apply(self, spec: str) -> None:
        default, targets = parse_level_spec(spec)
        self.spec = spec
        for follow in self.followers:
            follow(spec)
        for name in self._targets:
            if name not in targets:
                logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger(ROOT_TARGET).setLevel(default)
        for name in _EXTRA_TARGETS:
            logging.getLogger(name).setLevel(default)
        for name, level in targets.items():
            logging.getLogger(name).setLevel(level)
        self._targets = targets

    def reset(self) -> None:
        self.apply(self._initial)

    def describe(self) -> str:
        default = logging.getLogger(ROOT_TARGET).level
        parts = [_NAMES.get(default, str(default))]
        parts += [
            f"{display_target(t)}={_NAMES.get(lvl, str(lvl))}"
            for t, lvl in sorted(self._targets.items())
        ]
        return ",".join(parts)


def _timestamp(record: logging.LogRecord) -> str:
    """``2024-01-02T03:04:05.123456Z``, as ztunnel's tracing writes it."""
    ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return ts.isoformat(timespec="microseconds").replace("+00:00", "Z")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] = getattr(record, "fields", None) or {}
        kv = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        span = _span(record)
        scope = record.name
        if span is not None:
            inner = " ".join(f"{k}={_text_value(v)}" for k, v in span.fields.items())
            scope += f":{span.name}{{{inner}}}"
        line = (
            f"{_timestamp(record)}  {_NAMES.get(record.levelno, record.levelname).upper():5}"
            f" {scope}:"
            f" {record.getMessage()}"
        )
        if kv:
            line += " " + kv
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "level": _NAMES.get(record.levelno, record.levelname.lower()),
            "time": _timestamp(record),
            "scope": record.name,
            "message": record.getMessage(),
        }
        fields: Mapping[str, Any] = getattr(record, "fields", None) or {}
        for k, v in fields.items():
            obj[k] = v if isinstance(v, int | float | bool | type(None)) else str(v)
        span = _span(record)
        if span is not None:
            obj[span.name] = dict(span.fields)
        if record.exc_info:
            obj["error_trace"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"))


def _span(record: logging.LogRecord) -> Span | None:
    span = getattr(record, "span", None)
    return span if isinstance(span, Span) else None


def configure(spec: str, *, json_format: bool, stream: TextIO | None = None) -> LevelController:
    """Install our handler on the root logger and return the run-time level controller."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_format else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # third-party libraries stay quiet unless asked
    return LevelController(spec)
