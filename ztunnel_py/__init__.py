"""ztunnel-py: a node proxy for Istio ambient mode."""

from __future__ import annotations

__version__ = "0.1.0"
