"""Shared settings of the property-based fuzzers in ``tests/fuzz``.

CI runs each fuzzer for ``FUZZ_EXAMPLES`` inputs (200 by default: a few seconds each). The
long run is the same tests with more inputs, e.g.::

    ZT_FUZZ_EXAMPLES=200000 python3 -m pytest tests/fuzz -q -p no:cacheprovider

Every fuzzer states the one property a parser fed by a peer or an operator must have: on any
input it returns a value or raises its documented error, and nothing else (no other exception,
no hang, no unbounded output).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("ZT_FUZZ_EXAMPLES", "200"))

fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
