"""SPIFFE workload identities in Istio's one shape: ``spiffe://<td>/ns/<ns>/sa/<sa>``.

Pure: no I/O. ``Identity.parse`` refuses anything else and says why, so a bad SAN or a bad
xDS field produces a message an operator can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel_py.identity.errors import InvalidSpiffeId

URI_PREFIX = "spiffe://"

# Characters that would make the string mean something else as a URI, or that no Kubernetes
# or Istio name can contain.
_FORBIDDEN = frozenset("/?#%@:") | frozenset(chr(c) for c in range(0x21)) | {"\x7f"}


def _check_part(what: str, value: str) -> str | None:
    if not value:
        return f"the {what} is empty"
    bad = sorted({ch for ch in value if ch in _FORBIDDEN})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad)
        return f"the {what} {value!r} contains {shown}"
    return None


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        for what, value in (
            ("trust domain", self.trust_domain),
            ("namespace", self.namespace),
            ("service account", self.service_account),
        ):
            reason = _check_part(what, value)
            if reason is not None:
                raise InvalidSpiffeId(
                    f"{URI_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}",
                    reason,
                )

    @classmethod
    def parse(cls, value: str) -> Identity:
        if not value.startswith(URI_PREFIX):
            raise InvalidSpiffeId(value, "it does not start with spiffe://")
        parts = value[len(URI_PREFIX) :].split("/")
        if len(parts) != 5:
            raise InvalidSpiffeId(
                value, f"it has {len(parts)} path segments after spiffe://, not 5"
            )
        td, ns_key, ns, sa_key, sa = parts
        if ns_key != "ns":
            raise InvalidSpiffeId(value, f"the second segment is {ns_key!r}, not 'ns'")
        if sa_key != "sa":
            raise InvalidSpiffeId(value, f"the fourth segment is {sa_key!r}, not 'sa'")
        return cls(td, ns, sa)  # __post_init__ checks the parts; the id it reports is ``value``

    def __str__(self) -> str:
        return f"{URI_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
