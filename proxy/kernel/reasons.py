"""The reason vocabulary: why Fender answered instead of the upstream, in one table.

A reason is a stable, documented word: the ``X-Fender-Error`` header value, the
``reason`` label of metrics, and what ``retry_on`` and ``failure_on`` name. Each
reason has its status, its text, and its class:

* ``FAULT``: the upstream (or the way to it) failed; retries, breakers and
  outlier detection may count it (:data:`UPSTREAM_FAULTS`);
* ``PROXY``: Fender's own limit on the way to the upstream (pool full); it may be
  retried but says nothing about a replica (:data:`NOT_REPLICA_FAULTS`);
* ``LOCAL``: Fender refused the request itself (policy, bad input); nothing
  upstream was involved, so nothing counts it.

The docs table of reasons (docs/requests.md) is checked against this one by the tests.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Final, Literal, NamedTuple

ReasonClass = Literal["fault", "proxy", "local"]


class Reason(NamedTuple):
    status: int
    text: str
    kind: ReasonClass


REASONS: Final[dict[str, Reason]] = {
    # Refused locally: the request or the policy, nothing upstream involved.
    "no_route": Reason(404, "no route matches this request", "local"),
    "bad_request": Reason(400, "malformed request", "local"),
    "upgrade_not_allowed": Reason(403, "this route does not allow switching to that protocol", "local"),
    "request_body_timeout": Reason(408, "the request body did not arrive in time", "local"),
    "body_too_large": Reason(413, "request body larger than this route allows", "local"),
    "header_too_large": Reason(431, "request header fields too large", "local"),
    "rate_limited": Reason(429, "rate limit exceeded", "local"),
    "bulkhead_full": Reason(503, "too many concurrent requests for this route", "local"),
    "breaker_open": Reason(503, "the circuit breaker is open", "local"),
    "bulkhead_timeout": Reason(503, "no bulkhead slot in time", "local"),
    "concurrency_limited": Reason(503, "over the route's adaptive concurrency limit", "local"),
    "rate_limit_unavailable": Reason(503, "the shared rate-limit state is unavailable", "local"),
    "only_if_cached": Reason(504, "nothing usable is stored", "local"),
    # Chaos drills: the route's fault: section answered in the upstream's place (status as configured).
    "fault_injected": Reason(503, "fault injected by the route's fault policy", "local"),
    # Refused while reading the request head (the server protocol answers and closes).
    "header_timeout": Reason(408, "the request head did not arrive in time", "local"),
    "underscore_header": Reason(400, "header names with underscores are refused", "local"),
    "unsupported_transfer_coding": Reason(501, "only the chunked transfer coding is supported", "local"),
    "http_version": Reason(505, "only HTTP/1.0 and 1.1 are served", "local"),
    "connection_limit": Reason(503, "too many client connections (server.max_connections)", "local"),
    # Faults of the upstream or of the way to it (a try can end with these before a response head;
    # reset_mid_body comes after it). TRY_FAULTS below keeps this order.
    "connect_failure": Reason(502, "could not connect to the upstream", "fault"),
    "tls_failure": Reason(502, "the TLS handshake with the upstream failed", "fault"),
    "connect_timeout": Reason(504, "timed out connecting to the upstream", "fault"),
    "reset": Reason(502, "the upstream closed the connection before sending a response", "fault"),
    "stream_reset": Reason(502, "the upstream reset the HTTP/2 stream", "fault"),
    "timeout": Reason(504, "the upstream did not answer in time", "fault"),
    "bad_response": Reason(502, "the upstream sent an invalid response", "fault"),
    # Fender's own limit on the way to the upstream.
    "pool_overflow": Reason(503, "too many requests waiting for an upstream connection", "proxy"),
    "no_healthy_replica": Reason(503, "no healthy replica of the upstream can take this request", "fault"),
    "reset_mid_body": Reason(502, "the upstream closed the connection mid-response", "fault"),
}

# reason -> status of the local reply.
LOCAL_STATUS: Final[dict[str, int]] = {name: r.status for name, r in REASONS.items()}
REASON_TEXT: Final[dict[str, str]] = {name: r.text for name, r in REASONS.items()}

# Faults a try can end with before a response head (what retry_on and failure_on may name),
# in the order the docs list them. reset_mid_body is not one: the head already went out.
TRY_FAULTS: Final[tuple[str, ...]] = tuple(
    name for name, r in REASONS.items() if r.kind in ("fault", "proxy") and name != "reset_mid_body"
)
# What a breaker counts as a failure of the upstream when it ends a call.
UPSTREAM_FAULTS: Final[frozenset[str]] = frozenset(TRY_FAULTS)
# Faults that say nothing about the replica (Fender's own pool limit): outlier detection skips them.
NOT_REPLICA_FAULTS: Final[frozenset[str]] = frozenset(n for n, r in REASONS.items() if r.kind == "proxy")

# The request methods Fender knows by name (metrics label others "other").
KNOWN_METHODS: Final[tuple[str, ...]] = (
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "CONNECT",
)

# A Retry-After longer than this is cut to it: one odd header must not stop a replica or a
# retry for hours.
MAX_RETRY_AFTER: Final = 60.0


def parse_retry_after(value: bytes, wall_now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delta-seconds or HTTP-date), or None if unreadable.

    One parser for the retry layer and the replica picker (RFC 9110 10.2.3): delta-seconds
    (at most ten digits read), or an HTTP-date with a zone; a past date is 0.
    """
    text = value.strip()
    if text.isdigit():
        return float(int(text[:10]))
    try:
        when = parsedate_to_datetime(text.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    now = time.time() if wall_now is None else wall_now
    return max(when.timestamp() - now, 0.0)


def retry_after_of(headers: list[tuple[bytes, bytes]]) -> float | None:
    """The first ``Retry-After`` of a response head, parsed; None without one."""
    for name, value in headers:
        if name == b"retry-after":
            return parse_retry_after(value)
    return None
