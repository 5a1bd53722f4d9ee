"""The pure halves of the debug views: sections, secret scrubbing, stack formats."""

from __future__ import annotations

import pytest

from ztunnel_py.admin import debug, stacks

KEY = "-----BEGIN EC PRIVATE KEY-----\nMHcC...\n-----END EC PRIVATE KEY-----\n"


def test_secrets_are_scrubbed_wherever_they_are() -> None:
    doc = {
        "config": {"authToken": "/var/run/secrets/tokens/istio-token", "xdsHeaders": {}},
        "headers": {"Authorization": "Bearer abc", "cookie": "s=1", "accept": "json"},
        "nested": [{"privateKey": "x"}, {"private_key_pem": "y"}, {"note": KEY}],
        "bytes": KEY.encode(),
        "netnsCookie": 4096,  # a kernel cookie is no HTTP cookie
        "secretTtlS": 86400,  # a duration, not a secret
        "password": None,  # nothing to hide
    }
    out = debug.redact(doc)
    assert out["config"]["authToken"] == debug.REDACTED
    assert out["headers"] == {
        "Authorization": debug.REDACTED,
        "cookie": debug.REDACTED,
        "accept": "json",
    }
    assert out["nested"] == [
        {"privateKey": debug.REDACTED},
        {"private_key_pem": debug.REDACTED},
        {"note": debug.REDACTED},
    ]
    assert out["bytes"] == debug.REDACTED
    assert (out["netnsCookie"], out["secretTtlS"], out["password"]) == (4096, 86400, None)
    assert "PRIVATE KEY" not in repr(out)


def test_sections_are_parsed_in_dump_order() -> None:
    assert debug.parse_sections([]) == list(debug.SECTIONS)
    assert debug.parse_sections(["runtime,build", "bpf"]) == ["build", "bpf", "runtime"]
    with pytest.raises(debug.UnknownSection, match="unknown section nope"):
        debug.parse_sections(["build,nope"])


def test_a_failing_section_shows_its_error_and_the_rest_stays() -> None:
    def broken() -> object:
        raise RuntimeError("map gone")

    out = debug.gather({"build": lambda: {"v": 1}, "bpf": broken}, ["build", "bpf", "xds"])
    assert out == {"build": {"v": 1}, "bpf": {"error": "RuntimeError: map gone"}, "xds": None}


def test_certificate_summary_drops_the_pem_bodies() -> None:
    entry = {
        "identity": "spiffe://td/ns/a/sa/b",
        "state": "Available",
        "certChain": [{"pem": "LS0t", "serialNumber": "1"}],
        "rootCerts": [{"pem": "LS0t", "serialNumber": "2"}],
    }
    (out,) = debug.certificate_summary([entry])
    assert out["certChain"] == [{"serialNumber": "1"}] and out["rootCerts"] == [
        {"serialNumber": "2"}
    ]


def test_collapsed_and_speedscope_formats() -> None:
    samples = {("main", "serve", "dump"): 3, ("main", "idle"): 1}
    assert stacks.collapsed(samples) == "main;idle 1\nmain;serve;dump 3\n"
    doc = stacks.speedscope(samples, interval_s=0.01, name="p")
    names = [f["name"] for f in doc["shared"]["frames"]]
    profile = doc["profiles"][0]
    assert [[names[i] for i in s] for s in profile["samples"]] == [
        ["main", "idle"],
        ["main", "serve", "dump"],
    ]
    assert profile["weights"] == pytest.approx([0.01, 0.03]) and profile[
        "endValue"
    ] == pytest.approx(0.04)


def test_frame_names_are_short_and_fold_safe() -> None:
    name = stacks.frame_name("A.b;c", "/srv/x/ztunnel_py/app.py", 7)
    assert name == "A.b,c (ztunnel_py/app.py:7)"
    assert stacks.frame_name("run", "/usr/lib/python3.11/asyncio/runners.py", 1) == (
        "run (asyncio/runners.py:1)"
    )
