"""What the installed daemon carries: its packages, without the test fakes."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_package_leaves_the_test_fakes_out() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    rules = find["find"]
    # setuptools' own discovery with our include/exclude: what a wheel or install would carry.
    packages = find_namespace_packages(
        where=str(ROOT), include=rules["include"], exclude=rules.get("exclude", ())
    )
    assert {"ztunnel_py", "ztunnel_py.proxy", "ztunnel_py.protos"} <= set(packages)
    assert [p for p in packages if p.startswith("ztunnel_py.testing")] == []
