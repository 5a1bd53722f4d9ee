"""IP address and prefix types, shared by every layer (the bottom of the import order)."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ZonedAddressError(ValueError):
    """An address with an IPv6 zone (``fe80::1%eth0``) where ztunnel takes a plain IP."""


def parse_ip(text: str) -> IPAddress:
    """An IP address as ztunnel's configuration reads one (Rust's ``IpAddr``): every textual
    form ``ipaddress`` takes (zero-compressed, upper case, ``::ffff:a.b.c.d``, which stays
    IPv6) except a zone: ``fe80::1%eth0`` is refused, where ``ipaddress`` would keep it."""
    if "%" in text:
        raise ZonedAddressError(
            f"{text!r} has a zone (%...): write the address without it ({text.split('%', 1)[0]})"
        )
    return ipaddress.ip_address(text)


def parse_network(text: str) -> IPNetwork:
    """A CIDR as ztunnel reads one, host bits allowed (``10.0.0.1/24`` is 10.0.0.0/24); a zone
    is refused as in ``parse_ip``."""
    if "%" in text:
        raise ZonedAddressError(f"{text!r} has a zone (%...): a CIDR cannot carry one")
    return ipaddress.ip_network(text, strict=False)
