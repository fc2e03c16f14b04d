"""HTTP field names that mean something to a proxy itself, in one place (RFC 9110 7.6.1).

Hop-by-hop fields describe one connection, never the message: a proxy drops them on the way
through (the server protocol for what a client sends, the header rules of the data plane, the
cache for what it stores).
"""

from __future__ import annotations

from typing import Final

HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
