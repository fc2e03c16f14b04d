"""Fault classes raised by the upstream client.

Every fault carries two facts the layers above need:

* ``reason`` - a stable short label, used as a metric label value and in the
  ``X-Fender-Error`` response header;
* ``request_sent`` - whether any byte of the request may have reached the
  upstream.  The retry layer only resends non-idempotent requests when this is
  False.

and, for the error log (proxy/cluster/faultlog.py), ``cause``: what the
operating system or the response said, in a few lowercase words
(``connection refused``, ``name does not resolve``, ``response head over 64 KiB``),
or None when the message says all that is known.
"""

from __future__ import annotations

import os
import re
import socket


class UpstreamError(Exception):
    """Base class of every upstream fault."""

    reason: str = "upstream_error"
    request_sent: bool = True
    cause: str | None = None

    def __init__(
        self, message: str = "", *, request_sent: bool | None = None, cause: str | None = None
    ) -> None:
        super().__init__(message or self.reason)
        if request_sent is not None:
            self.request_sent = request_sent
        if cause is not None:
            self.cause = cause


class ConnectFailure(UpstreamError):
    """Refused, unreachable, DNS failure, or closed before the request was written."""

    reason = "connect_failure"
    request_sent = False


class ConnectTimeout(UpstreamError):
    """The TCP connect did not complete within ``connect_timeout``."""

    reason = "connect_timeout"
    request_sent = False


class TLSFailure(UpstreamError):
    """The TLS handshake with an ``https://`` replica failed (verification, alert, not TLS at all).

    Nothing of the request was sent: it counts as a connect failure for retries, breakers and
    outlier detection; ``cause`` says precisely what failed (``certificate has expired``...)."""

    reason = "tls_failure"
    request_sent = False


class ALPNMismatch(TLSFailure):
    """The TLS handshake succeeded but the replica chose another protocol by ALPN than the pool speaks.

    ``selected`` is what it chose (``"http/1.1"``, ``"h2"``, or ``""`` for none). With ``protocol: h2``
    it is the fault the request gets (``tls_failure``: nothing was sent); with ``protocol: auto`` the
    replica's pool (proxy/upstream/alpn.py) catches it and sends the request in the chosen protocol."""

    def __init__(self, message: str, *, selected: str, cause: str | None = None) -> None:
        super().__init__(message, cause=cause)
        self.selected = selected


class PoolOverflow(UpstreamError):
    """No connection became free within the wait, or too many requests were already waiting."""

    reason = "pool_overflow"
    request_sent = False


class ResetBeforeHeaders(UpstreamError):
    """Closed or reset after the request was written, before a complete response head."""

    reason = "reset"


class ResetMidBody(UpstreamError):
    """Closed or reset while the response body was streaming."""

    reason = "reset_mid_body"


class UpstreamTimeout(UpstreamError):
    """Read timeout: waiting for the response head, or silence between body chunks."""

    reason = "timeout"


class BadResponse(UpstreamError):
    """Unparseable or unacceptable response (bad status line, bad framing, head too large...)."""

    reason = "bad_response"


class RequestBodyError(ValueError):
    """The caller's ``body_stream`` ended before ``content_length`` bytes, or gave more.

    Not an :class:`UpstreamError`: the fault is on the downstream side, so it must
    not count against the upstream (no breaker trip, no retry).  The connection
    is closed, since the upstream saw a truncated request.
    """


# getaddrinfo's "no such name" answers (glibc says "Name or service not known", musl "Name does not
# resolve"): one wording whatever the C library.
_NO_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
_ERRNO = re.compile(r"\[Errno (\d+)\]")


def os_words(exc: BaseException | None) -> str:
    """The operating system's words for a failed socket operation, lowercase (``connection refused``)."""
    if exc is None:
        return "closed by the upstream"
    if isinstance(exc, socket.gaierror):
        if exc.errno in _NO_NAME:
            return "name does not resolve"
        return (exc.strerror or str(exc)).lower()
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    # A name with several addresses: asyncio joins their errors into one OSError without errno.
    codes = dict.fromkeys(int(code) for code in _ERRNO.findall(str(exc)))
    if codes:
        return ", ".join(os.strerror(code).lower() for code in codes)
    return str(exc) or type(exc).__name__
