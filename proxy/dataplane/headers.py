"""Header rules for both directions, working on raw ASGI byte pairs.

Hop-by-hop fields (RFC 9110 section 7.6.1) belong to one connection and are
dropped both ways, together with every field the Connection header names.
Framing (Content-Length, Transfer-Encoding) is re-created by each side's
HTTP/1.1 code, so it is never copied from the other side's message.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import time
from email.utils import formatdate

from proxy.grpc import parse_timeout as parse_grpc_timeout
from proxy.kernel.fields import HOP_BY_HOP

# Dropped from requests as well: framing is ours, forwarding headers are rebuilt below.
_REQUEST_DROP = HOP_BY_HOP | {
    b"content-length",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"via",
    # Fender's own request headers (deadline propagation, explanations): read here, re-created by Fender.
    b"fender-deadline-ms",
    b"fender-explain",
    # gRPC's deadline: read here (it may shorten the route's timeout), re-created with the time left.
    b"grpc-timeout",
}
# Response framing is passed through: Content-Length tells uvicorn the length. Trailer is
# end-to-end (RFC 9110 6.6.2): it announces the trailer fields relayed to a TE: trailers client.
_RESPONSE_DROP = HOP_BY_HOP - {b"trailer"}

VIA_TOKEN = b"fender"
_MAX_REQUEST_ID = 128
_rid_prefix = os.urandom(5).hex().encode()
_rid_counter = itertools.count(1)


def new_request_id() -> bytes:
    # Unique per process (random prefix) and cheap (a counter): no uuid per request.
    return b"%s-%x" % (_rid_prefix, next(_rid_counter))


# Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): reg-name characters, or an IP literal.
_REG_NAME = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=%"
_IP_LITERAL = b"0123456789abcdefABCDEF:."


def valid_host(value: bytes) -> bool:
    """True for a syntactically valid, non-empty Host value (no userinfo, path, spaces or controls)."""
    if value.startswith(b"["):
        literal, bracket, port = value[1:].partition(b"]")
        if not bracket or not literal or literal.translate(None, _IP_LITERAL):
            return False
        return not port or (port[:1] == b":" and (port[1:].isdigit() or port == b":"))
    host, colon, port = value.partition(b":")
    if not host or host.translate(None, _REG_NAME):
        return False
    return not colon or port == b"" or port.isdigit()


# Connection values that name no other field (almost every message carries one of these).
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _named_by_connection(values: list[bytes]) -> set[bytes]:
    """The field names a Connection header lists for removal (its options other than close/keep-alive)."""
    for value in values:
        if value not in _PLAIN_CONNECTION:
            return _connection_tokens(values) - {b"close", b"keep-alive"}
    return set()


def _connection_tokens(values: list[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def _valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= _MAX_REQUEST_ID and all(0x21 <= c <= 0x7E for c in value)


class TrustedProxies:
    """Which peers may tell us the original client (X-Forwarded-*)."""

    __slots__ = ("_networks", "_cache", "hops")

    def __init__(self, networks, hops: int = 0) -> None:
        self._networks = tuple(ipaddress.ip_network(n) for n in networks)
        self._cache: dict[str, bool] = {}
        # server.trusted_hops: that many proxies always stand in front (the peer is the nearest).
        self.hops = hops

    def __bool__(self) -> bool:
        return bool(self._networks) or self.hops > 0

    def trusts(self, peer: str) -> bool:
        if self.hops:
            return True  # with a hop count, the peer is by definition the nearest trusted proxy
        if not self._networks:
            return False
        hit = self._cache.get(peer)
        if hit is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                hit = False
            else:
                hit = any(address in net for net in self._networks)
            if len(self._cache) < 4096:
                self._cache[peer] = hit
        return hit


class RequestHead:
    """What the data path needs from the client's header list, gathered in one pass."""

    __slots__ = (
        "forward",
        "host",
        "content_length",
        "chunked",
        "request_id",
        "xff",
        "xfp",
        "xfh",
        "via",
        "bad",
        "client",
        "deadline_ms",
        "explain",
        "te_trailers",
        "grpc_timeout",
    )

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        forward: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.request_id: bytes | None = None
        self.xff: list[bytes] = []
        self.xfp: bytes | None = None
        self.xfh: bytes | None = None
        self.via: list[bytes] = []
        self.bad: str | None = None
        self.client: str | None = None
        self.deadline_ms: int | None = None  # Fender-Deadline-Ms from a calling Fender
        self.explain = False  # Fender-Explain: 1 (honoured only from trusted peers)
        self.te_trailers = False  # TE: trailers (the client reads response trailers; passed upstream)
        self.grpc_timeout: float | None = None  # grpc-timeout in seconds (a gRPC client's deadline)
        connection: list[bytes] | None = None
        drop = _REQUEST_DROP
        for name, value in headers:
            if name not in drop:
                forward.append((name, value))
                continue
            if name == b"host":
                # RFC 9112 3.2: more than one Host line (even identical) or an invalid value is a 400.
                if self.host is not None:
                    self.bad = "more than one Host header"
                elif not valid_host(value):
                    self.bad = "malformed Host header"
                self.host = value
            elif name == b"content-length":
                if not value.isdigit() or (
                    self.content_length is not None and int(value) != self.content_length
                ):
                    self.bad = "invalid Content-Length"
                else:
                    self.content_length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = True
            elif name == b"x-forwarded-for":
                self.xff.append(value)
            elif name == b"x-forwarded-proto":
                self.xfp = value
            elif name == b"x-forwarded-host":
                self.xfh = value
            elif name == b"x-request-id":
                if _valid_request_id(value):
                    self.request_id = value
            elif name == b"via":
                self.via.append(value)
            elif name == b"fender-deadline-ms":
                if value.isdigit() and len(value) <= 12:
                    ms = int(value)
                    self.deadline_ms = ms if self.deadline_ms is None else min(ms, self.deadline_ms)
            elif name == b"fender-explain":
                self.explain = value.strip() == b"1"
            elif name == b"connection":
                if connection is None:
                    connection = []
                connection.append(value)
            elif name == b"te":
                self.te_trailers = self.te_trailers or value.lower().find(b"trailers") >= 0
            elif name == b"grpc-timeout":
                self.grpc_timeout = parse_grpc_timeout(value)
            # every other hop-by-hop field is simply dropped
        if connection is not None:
            named = _named_by_connection(connection)
            if named:
                forward = [(n, v) for n, v in forward if n not in named]
        if self.te_trailers:
            forward.append((b"te", b"trailers"))  # the only TE value a proxy passes on (RFC 9110 10.1.4)
        self.forward = forward


def add_forwarding(
    head: RequestHead,
    peer: str | None,
    scheme: bytes,
    http_version: str,
    trusted: TrustedProxies,
) -> None:
    """Append X-Forwarded-*, Via and X-Request-Id to ``head.forward``.

    A peer that is not a trusted proxy cannot choose what the upstream sees:
    its X-Forwarded-* values are replaced by what Fender observed (as Traefik
    does by default). A trusted peer's chain is kept and the peer appended.
    """
    forward = head.forward
    peer_bytes = peer.encode() if peer else b"unknown"
    head.client = peer
    if head.xff and peer and trusted.trusts(peer):
        head.client = client_from_chain(head.xff, peer, trusted)
        forward.append((b"x-forwarded-for", b", ".join(head.xff) + b", " + peer_bytes))
        forward.append((b"x-forwarded-proto", head.xfp or scheme))
        forward.append((b"x-forwarded-host", head.xfh or head.host or b""))
    else:
        forward.append((b"x-forwarded-for", peer_bytes))
        forward.append((b"x-forwarded-proto", scheme))
        if head.host is not None:
            forward.append((b"x-forwarded-host", head.host))
    via = (b"1.0 " if http_version == "1.0" else b"2 " if http_version == "2" else b"1.1 ") + VIA_TOKEN
    forward.append((b"via", b", ".join(head.via) + b", " + via if head.via else via))
    if head.request_id is None:
        head.request_id = new_request_id()
    forward.append((b"x-request-id", head.request_id))


def client_from_chain(xff: list[bytes], peer: str, trusted: TrustedProxies) -> str:
    """The original client: the rightmost address in the chain that is not a trusted proxy."""
    hops = [h.strip().decode("latin-1") for value in xff for h in value.split(b",") if h.strip()]
    if trusted.hops:
        # The nearest `hops` proxies each appended the address they saw: count from the right.
        if not hops:
            return peer
        return hops[-trusted.hops] if len(hops) >= trusted.hops else hops[0]
    client = peer
    for hop in reversed(hops):
        client = hop
        if not trusted.trusts(hop):
            break
    return client


def response_headers(
    upstream_headers: list[tuple[bytes, bytes]], request_id: bytes
) -> list[tuple[bytes, bytes]]:
    """Headers for the client: hop-by-hop dropped, Via and X-Request-Id added."""
    out: list[tuple[bytes, bytes]] = []
    connection: list[bytes] | None = None
    chunked = False
    has_length = False
    has_date = False
    drop = _RESPONSE_DROP
    for name, value in upstream_headers:
        if name in drop:
            if name == b"connection":
                if connection is None:
                    connection = []
                connection.append(value)
            elif name == b"transfer-encoding":
                chunked = True
            continue
        if name == b"content-length":
            has_length = True
        elif name == b"date":
            has_date = True
        elif name == b"x-request-id":
            continue
        out.append((name, value))
    if connection is not None:
        named = _named_by_connection(connection)
        if named:
            out = [(n, v) for n, v in out if n not in named]
    if chunked and has_length:
        # RFC 9112 6.3: Transfer-Encoding overrides Content-Length; never pass both on.
        out = [(n, v) for n, v in out if n != b"content-length"]
    if not has_date:
        # RFC 9110 6.6.1: a recipient with a clock forwarding a response without Date adds one.
        out.append((b"date", http_date()))
    out.append((b"via", b"1.1 " + VIA_TOKEN))
    out.append((b"x-request-id", request_id))
    return out


_date_cache: list = [0, b""]


def http_date() -> bytes:
    """The current time as an HTTP-date, formatted at most once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[1] = formatdate(now, usegmt=True).encode()
        _date_cache[0] = now
    return _date_cache[1]
