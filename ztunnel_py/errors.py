"""The root of ztunnel-py's error hierarchy and the cross-cutting error categories.

Each package adds its own subclasses (``xds.errors``, ``identity.errors``, ...). Messages are
written for operators: they say what was wrong and, where one exists, what to do about it.
"""

from __future__ import annotations


class ZtunnelError(Exception):
    """Base class for every error ztunnel-py raises on purpose."""


class ConfigError(ZtunnelError):
    """An environment variable (or config field) has a value we cannot use."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"invalid {name}={value!r}: expected {expected}")


# An error may quote what it refused; a hostile document must not make it megabytes long.
MAX_ERROR_CHARS = 1024


def truncate(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters truncated)"


class LocalConfigError(ZtunnelError):
    """A local-config (``LOCAL_XDS_PATH``) document is invalid at ``path``."""

    def __init__(self, path: str, reason: str, *, source: str = "") -> None:
        path, reason = truncate(path, 256), truncate(reason)
        self.path = path
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {reason}")


class ConversionError(ZtunnelError):
    """An xDS resource could not be turned into our model; it becomes a NACK entry."""

    def __init__(self, resource_name: str, reason: str) -> None:
        self.resource_name = resource_name
        self.reason = reason
        super().__init__(f"{resource_name}: {reason}")


class UnsupportedFeature(ZtunnelError):
    """The kernel (or platform) lacks something a mode needs."""

    def __init__(self, name: str, hint: str = "") -> None:
        self.name = name
        self.hint = hint
        super().__init__(f"unsupported: {name}" + (f" ({hint})" if hint else ""))
