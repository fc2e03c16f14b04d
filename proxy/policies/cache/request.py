"""What the client's request headers say to the cache (read in one scan), and the
headers of the request the cache sends upstream in its place."""

from __future__ import annotations

from proxy.grpc import is_grpc
from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.store import Entry

# Request fields the cache reads; everything else is skipped in the one scan.
_INTEREST = frozenset(
    {
        b"cache-control",
        b"pragma",
        b"authorization",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
        b"content-type",  # a gRPC call (application/grpc) is never served from nor stored in the cache
    }
)
# Preconditions only the origin can evaluate (RFC 9111 4.3.2) and range requests: passed through.
# (Every field of _INTEREST not handled by name below is one of these.)
ORIGIN_ONLY = frozenset({b"if-match", b"if-unmodified-since", b"if-range", b"range"})
# Conditional fields removed from a request the cache sends itself (it wants a full response).
CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since"})


class Request:
    """What the client's headers say to the cache, from one scan."""

    __slots__ = (
        "directives",
        "authorized",
        "if_none_match",
        "if_modified_since",
        "conditional",
        "origin_only",
    )

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        cc: list[bytes] | None = None
        pragma = False
        self.authorized = False
        self.if_none_match: bytes | None = None
        self.if_modified_since: bytes | None = None
        self.origin_only = False
        interest = _INTEREST
        for name, value in headers:
            if name not in interest:
                continue
            if name == b"cache-control":
                if cc is None:
                    cc = []
                cc.append(value)
            elif name == b"pragma":
                pragma = pragma or b"no-cache" in value.lower()
            elif name == b"authorization":
                self.authorized = True
            elif name == b"if-none-match":
                self.if_none_match = (
                    value if self.if_none_match is None else self.if_none_match + b", " + value
                )
            elif name == b"if-modified-since":
                self.if_modified_since = value
            elif name == b"content-type":
                if is_grpc(value):
                    self.origin_only = True  # gRPC: the origin answers every call (issue 21)
            else:
                self.origin_only = True
        self.conditional = self.if_none_match is not None or self.if_modified_since is not None
        self.directives: rfc.RequestDirectives | None = (
            rfc.RequestDirectives(rfc.parse_cache_control(cc) if cc else None, pragma)
            if cc is not None or pragma
            else None
        )


# What a request without any field in _INTEREST says (most requests): shared, never changed.
PLAIN_REQUEST = Request([])


def request_of(headers: list[tuple[bytes, bytes]]) -> Request:
    """The client's headers as the cache reads them; the shared plain one when none matters."""
    interest = _INTEREST
    for name, _ in headers:
        if name in interest:
            return Request(headers)
    return PLAIN_REQUEST


def forwarded_headers(headers: list[tuple[bytes, bytes]], stale: Entry | None) -> list[tuple[bytes, bytes]]:
    """The headers of the cache's own upstream request: the client's conditionals dropped (the
    cache wants a full response), ``stale``'s validators added; ``headers`` itself when that
    changes nothing (the usual miss)."""
    if stale is None:
        for name, _ in headers:
            if name in CONDITIONALS:
                break
        else:
            return headers
    forwarded = [(n, v) for n, v in headers if n not in CONDITIONALS]
    if stale is not None:
        if stale.etag is not None:
            forwarded.append((b"if-none-match", stale.etag))
        if stale.last_modified is not None:
            forwarded.append((b"if-modified-since", stale.last_modified))
    return forwarded
