"""gRPC vocabulary shared by the listener and the upstream side: status codes, their names,
which requests are gRPC, and Fender's local reasons as gRPC statuses.

A gRPC call is an HTTP/2 POST with ``content-type: application/grpc`` (or
``application/grpc+proto``, ``+json``...). Its outcome is not the HTTP status
(always 200) but the ``grpc-status`` and ``grpc-message`` fields, in the
trailers or, when there is no message at all, in a trailers-only response
(one HEADERS frame that ends the stream). A local reply Fender gives to a
gRPC call is such a trailers-only response (as Envoy does), so a gRPC client
sees a status it understands instead of ``UNKNOWN: HTTP 503``.
"""

from __future__ import annotations

# The codes of grpc/include/grpcpp/support/status_code_enum.h (doc/statuscodes.md).
GRPC_CODES: dict[str, int] = {
    "ok": 0,
    "cancelled": 1,
    "unknown": 2,
    "invalid_argument": 3,
    "deadline_exceeded": 4,
    "not_found": 5,
    "already_exists": 6,
    "permission_denied": 7,
    "resource_exhausted": 8,
    "failed_precondition": 9,
    "aborted": 10,
    "out_of_range": 11,
    "unimplemented": 12,
    "internal": 13,
    "unavailable": 14,
    "data_loss": 15,
    "unauthenticated": 16,
}
GRPC_NAMES: dict[int, str] = {code: name for name, code in GRPC_CODES.items()}

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

# Fender's local reasons (the X-Fender-Error vocabulary) as gRPC statuses. The table
# (rate_limited, breaker_open, bulkhead_full, no_healthy_replica, connect_failure, timeout,
# no_route, body_too_large, bad_response), and the rest by the same logic: UNAVAILABLE when
# another try later or elsewhere may succeed (gRPC clients retry it), DEADLINE_EXCEEDED when
# time ran out, RESOURCE_EXHAUSTED when a limit was hit.
REASON_STATUS: dict[str, int] = {
    "rate_limited": RESOURCE_EXHAUSTED,
    "rate_limit_unavailable": UNAVAILABLE,
    "breaker_open": UNAVAILABLE,
    "bulkhead_full": UNAVAILABLE,
    "bulkhead_timeout": UNAVAILABLE,
    "concurrency_limited": UNAVAILABLE,
    "no_healthy_replica": UNAVAILABLE,
    "connect_failure": UNAVAILABLE,
    "tls_failure": UNAVAILABLE,  # the handshake failed: nothing was sent (as connect_failure)
    "fault_injected": UNAVAILABLE,  # a drill's abort stands in for a failing upstream
    "connect_timeout": UNAVAILABLE,
    "pool_overflow": UNAVAILABLE,
    "reset": UNAVAILABLE,
    "reset_mid_body": UNAVAILABLE,
    "stream_reset": UNAVAILABLE,
    "timeout": DEADLINE_EXCEEDED,
    "request_body_timeout": DEADLINE_EXCEEDED,
    "only_if_cached": UNAVAILABLE,
    "no_route": UNIMPLEMENTED,
    "body_too_large": RESOURCE_EXHAUSTED,
    "header_too_large": RESOURCE_EXHAUSTED,
    "bad_response": INTERNAL,
    "bad_request": INTERNAL,
    "upgrade_not_allowed": PERMISSION_DENIED,
    # The HTTP/1.1 protocol's own refusals (written before any application runs; listed for completeness).
    "connection_limit": UNAVAILABLE,
    "header_timeout": DEADLINE_EXCEEDED,
    "underscore_header": INTERNAL,
    "unsupported_transfer_coding": INTERNAL,
    "http_version": INTERNAL,
}

# gRPC's own HTTP-to-gRPC mapping (doc/http-grpc-status-mapping.md), for a reason not listed above.
_HTTP_STATUS = {400: INTERNAL, 401: 16, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED, 429: UNAVAILABLE}


def status_for(reason: str, http_status: int = 0) -> int:
    """The gRPC status of a local reply for ``reason`` (its HTTP status decides an unknown reason)."""
    code = REASON_STATUS.get(reason)
    if code is not None:
        return code
    if http_status in _HTTP_STATUS:
        return _HTTP_STATUS[http_status]
    return UNAVAILABLE if http_status in (502, 503, 504) else UNKNOWN


_GRPC = b"application/grpc"


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc``, ``application/grpc+proto``, ``application/grpc;...``: a gRPC call."""
    if content_type is None or not content_type[:16].lower() == _GRPC:
        return False
    rest = content_type[16:17]
    return rest in (b"", b"+", b";")


def request_is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request's (lowercase-named) header pairs carry a gRPC content type."""
    for name, value in headers:
        if name == b"content-type":
            return is_grpc(value)
    return False


def encode_message(text: str) -> bytes:
    """``grpc-message`` is percent-encoded UTF-8: bytes outside 0x20-0x7E, and ``%``, as %XX."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def grpc_status(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The ``grpc-status`` in header pairs (a trailers-only response, or trailers), else None."""
    for name, value in headers:
        if name == b"grpc-status":
            try:
                return int(value)
            except ValueError:
                return UNKNOWN
    return None


_MAX_MESSAGE = 256  # characters of grpc-message (a configured fallback body can be long)


def local_headers(reason: str, http_status: int, text: str) -> list[tuple[bytes, bytes]]:
    """The fields of a trailers-only gRPC answer for a local reply (HTTP status 200 goes apart)."""
    return [
        (b"content-type", _GRPC),
        (b"grpc-status", b"%d" % status_for(reason, http_status)),
        (b"grpc-message", encode_message(text[:_MAX_MESSAGE])),
    ]


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (at most 8 digits and a unit, H M S m u n) in seconds; None when malformed."""
    digits, unit = value[:-1], value[-1:]
    factor = _TIMEOUT_UNITS.get(unit)
    if factor is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * factor


def format_timeout(seconds: float) -> bytes:
    """Seconds as a ``grpc-timeout`` value: the finest unit whose count fits in 8 digits."""
    seconds = max(seconds, 0.0)
    for unit, factor in ((b"n", 1e-9), (b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0)):
        count = int(seconds / factor)
        if count < 100_000_000:
            return b"%d%s" % (count, unit)
    return b"%dH" % min(int(seconds / 3600), 99_999_999)
