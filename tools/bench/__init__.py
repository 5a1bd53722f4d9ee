"""Data-plane benchmarks: the real ztunnel-py daemons against an Envoy HBONE pair and no mesh."""

from __future__ import annotations
