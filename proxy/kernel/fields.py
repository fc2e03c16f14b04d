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

# Key of the last ``http.request`` message (ASGI extension of Fender's own protocols, HTTP/1.1 and
# HTTP/2) holding the request's trailer fields, already checked and without the fields RFC 9110
# 6.5.1 keeps out of trailers; the data plane passes them to the upstream with the body's end.
TRAILERS: Final = "fender.trailers"

# Never passed from a request's trailers, besides what RFC 9110 6.5.1 keeps out of any trailer section
# (proxy.upstream.connection.NOT_TRAILERS): the fields Fender itself sets or reads in the request head
# (forwarding, request id, deadlines; an upstream that merges trailers into the head must not see a
# client's own X-Forwarded-For), and state and credentials (cookies, proxy authorization). Names with
# the prefix ``fender-`` are dropped too.
PROXY_TRAILERS: Final[frozenset[bytes]] = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"x-request-id",
        b"via",
        b"grpc-timeout",
        b"cookie",
        b"set-cookie",
        b"proxy-authorization",
    }
)
