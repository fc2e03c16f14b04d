"""The server side of TLS: HTTPS on the data listener (``server.tls``) and the admin one (``admin_tls``).

:class:`ServerTLS` holds a listener's context and rebuilds it when the certificate, key or client CA
files change on disk (checked every ``watch_interval``: an atomic rename as Kubernetes does it, or a
write in place). New handshakes use the new pair; established connections continue with theirs. A
new pair that cannot be used (unreadable, not PEM, key of another certificate) is refused with a
log line and the old one stays.

:class:`TLSAcceptor` stands in for ``asyncio.Server`` (uvicorn's ``Server`` keeps it in ``servers``:
``close`` and ``wait_closed`` are all it asks). The event loop accepts; each connection's protocol
is a :class:`~proxy.server.tlsstream.TLSStream` (TLS with ``ssl.SSLObject`` and memory BIOs), which
looks at the first bytes as they arrive:

* a TLS handshake record: the handshake runs, bounded by what is left of ``server.header_timeout``
  since the accept, and the HTTP protocol's head timer counts from the accept too, so handshake
  plus request head fit in one header_timeout;
* plain HTTP (``GET /``...): a clear 400 in plain text, as nginx does ("plain HTTP request sent to
  the HTTPS port"), then a close;
* anything else, a stall, a failed handshake: the connection is closed, counted in
  ``fender_tls_handshake_errors_total{reason}`` and logged at most once per reason per 10 s.

The context comes from :func:`proxy.upstream.tlscontext.server_context` with the ALPN list given here
(``http/1.1``; HTTP/2 passes ``h2`` first and picks the protocol from ``selected_alpn_protocol()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Sequence

from proxy.cluster.faultlog import LineLimiter
from proxy.options.tls import ListenerTLSOptions
from proxy.server.tlsstream import TLSStream
from proxy.upstream.tlscontext import ALPN_HTTP1, FileStamp, TLSFileError, server_context

log = logging.getLogger("fender.tls")

__all__ = ["ServerTLS", "TLSAcceptor", "HANDSHAKE_ERRORS", "handshake_reason", "client_cert_subject"]

# The reason label values of fender_tls_handshake_errors_total.
HANDSHAKE_ERRORS = (
    "timeout",  # no complete handshake within server.header_timeout
    "plain_http",  # an HTTP request in plain text (answered with 400)
    "not_tls",  # bytes that are neither TLS nor HTTP
    "closed",  # the client closed or reset the connection during the handshake
    "client_cert",  # client certificate missing or not trusted (client_auth)
    "protocol",  # no common version or cipher, or a malformed handshake
    "overload",  # more handshakes under way than server.max_connections: closed at once
    "other",
)
_PLAIN_HTTP_BODY = b"fender: plain HTTP request sent to the HTTPS port (use https://)\n"
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nx-fender-error: bad_request\r\nconnection: close\r\n\r\n%s"
    % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


def _timed_out(exc: BaseException) -> bool:
    # asyncio and uvloop end a handshake past ssl_handshake_timeout with ConnectionAbortedError.
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)
    )


def handshake_reason(exc: BaseException) -> str:
    """The label (and the words) of a failed server-side handshake."""
    if _timed_out(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE" in reason:
            return "client_cert"
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return "plain_http"
        if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
            return "closed"
        return "protocol"
    if isinstance(exc, ConnectionError | EOFError | OSError):
        return "closed"
    return "other"


def _words(exc: BaseException) -> str:
    if _timed_out(exc):
        return "no complete handshake within server.header_timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {(exc.verify_message or str(exc)).lower()}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc).lower() or type(exc).__name__


def client_cert_subject(transport) -> str | None:
    """The verified client certificate's subject (``CN=client,O=Org``), or None when none was sent."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    parts = [f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn]
    return ",".join(parts) or "-"


class ServerTLS:
    """A listener's TLS context, rebuilt from its files when they change (see the module docstring)."""

    def __init__(
        self,
        options: ListenerTLSOptions,
        where: str,
        alpn: Sequence[str] = ALPN_HTTP1,
        on_rotate: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.where = where
        self.alpn = tuple(alpn)
        self.context = server_context(options, self.alpn, where)  # raises TLSFileError
        self.stamp = FileStamp(options.files())
        self.rotations = 0
        self._on_rotate = on_rotate  # called with "applied" or "refused"
        self._task: asyncio.Task | None = None

    def update(self, options: ListenerTLSOptions) -> None:
        """New settings (a reload): a context from them at once; raises TLSFileError and keeps the old."""
        if options == self.options:
            self.refresh()
            return
        context = server_context(options, self.alpn, self.where)
        self.options, self.context = options, context
        self.stamp = FileStamp(options.files())

    def refresh(self) -> bool:
        """Re-read the files if they changed; True when new handshakes use a new pair."""
        if not self.stamp.changed():
            return False
        try:
            context = server_context(self.options, self.alpn, self.where)
        except TLSFileError as exc:
            log.error("%s: the new files are refused, the previous pair stays in use: %s", self.where, exc)
            if self._on_rotate is not None:
                self._on_rotate("refused")
            return False
        self.context = context
        self.rotations += 1
        log.info("%s: certificate files changed on disk; new handshakes use them", self.where)
        if self._on_rotate is not None:
            self._on_rotate("applied")
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.watch_interval)
            self.refresh()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class HandshakeErrors:
    """Counts failed handshakes by reason and logs them, at most one line per reason per 10 s."""

    def __init__(self, counter=None, listener: str = "proxy") -> None:
        self._children = {} if counter is None else {r: counter.labels(listener, r) for r in HANDSHAKE_ERRORS}
        self.listener = listener
        self.limiter = LineLimiter()
        self.counts: dict[str, int] = dict.fromkeys(HANDSHAKE_ERRORS, 0)

    def record(self, reason: str, peer, words: str) -> None:
        self.counts[reason] += 1
        child = self._children.get(reason)
        if child is not None:
            child.inc()
        admitted = self.limiter.admit(reason)
        if admitted is None:
            return
        held, since = admitted
        more = f" and {held} more since {since:.1f}s ago" if held else ""
        log.warning(
            "TLS handshake failed (%s listener) %s: %s (client=%s)%s",
            self.listener,
            reason,
            words,
            peer[0] if peer else "-",
            more,
            extra={"reason": reason, "held_back": held},
        )


class TLSAcceptor:
    """Accepts a listening socket's connections and runs TLS on them (see the module docstring).

    The event loop accepts (``create_server`` on the socket, no Python per accept); each
    connection's protocol is a :class:`~proxy.server.tlsstream.TLSStream`, which looks at the
    first bytes, runs the handshake, and then carries the HTTP protocol made here.
    """

    plain_http_answer = PLAIN_HTTP_ANSWER

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        tls: ServerTLS,
        header_timeout: Callable[[], float],
        errors: HandshakeErrors,
        backlog: int = 2048,
        max_pending: Callable[[], int] = lambda: 2048,
    ) -> None:
        self.sock = sock
        self.sockets = [sock]
        self.protocol_factory = protocol_factory
        self.tls = tls
        self.header_timeout = header_timeout
        self.errors = errors
        self.backlog = backlog
        self.max_pending = max_pending  # handshakes under way at most (bounds fds and memory)
        self.handshakes = 0  # completed
        self.loop = asyncio.get_running_loop()
        self._pending: set[TLSStream] = set()
        self._server: asyncio.base_events.Server | None = None
        self._closed = False

    async def start(self) -> None:
        """Listen: from here on the event loop accepts."""
        loop, tls = self.loop, self.tls
        self._server = await loop.create_server(
            lambda: TLSStream(self, tls.context, loop.time()), sock=self.sock, backlog=self.backlog
        )

    # asyncio.Server's interface, as far as uvicorn's Server uses it
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        pending, self._pending = self._pending, set()
        for stream in pending:
            stream.abort()  # handshakes in progress: not yet connections to drain

    async def wait_closed(self) -> None:
        return None  # the handshakes under way were cut by close(); connections drain in uvicorn

    # what a TLSStream asks of its listener
    def admit(self, stream: TLSStream) -> bool:
        if self._closed:
            return False
        if len(self._pending) >= self.max_pending():
            self.errors.record(
                "overload",
                stream.get_extra_info("peername"),
                "more handshakes under way than server.max_connections",
            )
            return False
        self._pending.add(stream)
        return True

    def handshake_done(self, stream: TLSStream, reason: str | None = None, words: str = "") -> None:
        """The handshake of ``stream`` ended (once per stream; later calls are no-ops)."""
        pending = self._pending
        if stream not in pending:
            return
        pending.discard(stream)
        if reason is None:
            self.handshakes += 1
        else:
            self.errors.record(reason, stream.get_extra_info("peername"), words)

    @staticmethod
    def describe(exc: BaseException) -> tuple[str, str]:
        return handshake_reason(exc), _words(exc)

    def make_protocol(self, accepted: float) -> asyncio.Protocol:
        made = self.protocol_factory()
        if hasattr(made, "opened_at"):
            made.opened_at = accepted  # the head timer counts from the accept (handshake included)
        return made
