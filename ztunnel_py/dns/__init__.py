"""ztunnel's DNS proxy: mesh names answered from the xDS state, the rest forwarded upstream.

``resolver`` (what the mesh answers), ``messages`` (dnspython in and out) and ``resolvconf``
are pure; ``forwarder``, ``server`` and ``proxy`` are the asyncio adapters around them.
"""
