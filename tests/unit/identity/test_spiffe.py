"""SPIFFE identity parsing: exactly spiffe://<td>/ns/<ns>/sa/<sa>, with reasons on refusal."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel_py.identity.errors import InvalidSpiffeId
from ztunnel_py.identity.spiffe import Identity

# Names as Kubernetes and trust domains allow them, plus a few characters ztunnel lets through.
_part = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-._~"),
    min_size=1,
    max_size=40,
)


def test_parse_and_str():
    ident = Identity.parse("spiffe://cluster.local/ns/default/sa/bookinfo-productpage")
    assert ident == Identity("cluster.local", "default", "bookinfo-productpage")
    assert str(ident) == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


@given(_part, _part, _part)
def test_round_trip_from_parts(td, ns, sa):
    ident = Identity(td, ns, sa)
    assert Identity.parse(str(ident)) == ident


@given(_part, _part, _part)
def test_round_trip_from_string(td, ns, sa):
    text = f"spiffe://{td}/ns/{ns}/sa/{sa}"
    assert str(Identity.parse(text)) == text


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("http://cluster.local/ns/a/sa/b", "does not start with spiffe://"),
        ("spiffe://cluster.local/ns/a/sa", "4 path segments"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "6 path segments"),
        ("spiffe://cluster.local/namespace/a/sa/b", "second segment is 'namespace'"),
        ("spiffe://cluster.local/ns/a/serviceaccount/b", "fourth segment is 'serviceaccount'"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "contains '?'"),
        ("spiffe://cluster.local/ns/a b/sa/b", "contains ' '"),
        ("", "does not start with spiffe://"),
    ],
)
def test_refusals_say_why(value, reason):
    with pytest.raises(InvalidSpiffeId) as info:
        Identity.parse(value)
    assert reason in str(info.value)
    assert "spiffe://<trust domain>/ns/<namespace>/sa/<service account>" in str(info.value)


@given(st.text(max_size=60))
def test_parse_never_raises_anything_else(text):
    try:
        ident = Identity.parse(text)
    except InvalidSpiffeId:
        return
    assert str(ident) == text


def test_constructor_refuses_parts_that_would_not_round_trip():
    with pytest.raises(InvalidSpiffeId, match="namespace 'a/b' contains '/'"):
        Identity("cluster.local", "a/b", "sa")


def test_identities_order_and_hash():
    a = Identity("td", "ns", "a")
    b = Identity("td", "ns", "b")
    assert sorted([b, a]) == [a, b]
    assert {a, Identity("td", "ns", "a")} == {a}
