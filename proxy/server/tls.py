"""The server side of TLS: HTTPS on the data listener (``server.tls``) and the admin one (``admin_tls``).

:class:`ServerTLS` holds a listener's context and rebuilds it when the certificate, key or client CA
files change on disk (checked every ``watch_interval``: an atomic rename as Kubernetes does it, or a
write in place). New handshakes use the new pair; established connections continue with theirs. A
new pair that cannot be used (unreadable, not PEM, key of another certificate) is refused with a
log line and the old one stays.

:class:`TLSAcceptor` accepts the listener's connections in place of ``asyncio.Server`` (uvicorn's
``Server`` keeps it in ``servers``: ``close`` and ``wait_closed`` are all it asks). Per connection it
peeks at the first bytes before any TLS:

* a TLS handshake record: the handshake runs (``loop.connect_accepted_socket``), bounded by what
  is left of ``server.header_timeout`` since the accept, and the HTTP protocol's head timer counts
  from the accept too, so handshake plus request head fit in one header_timeout;
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
_ACCEPT_BURST = 64  # connections accepted per wake-up
_LINGER = 2.0  # after the plain-HTTP 400: how long to discard what the client still sends
_PLAIN_HTTP_BODY = b"fender: plain HTTP request sent to the HTTPS port (use https://)\n"
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nx-fender-error: bad_request\r\nconnection: close\r\n\r\n%s"
    % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)
_HTTP_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


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


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


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
    """Accepts a listening socket's connections and runs TLS on them (see the module docstring)."""

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
        self.max_pending = max_pending  # handshakes under way at most (bounds fds and memory)
        self.handshakes = 0  # completed
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task] = set()
        self._closed = False
        sock.setblocking(False)
        sock.listen(backlog)
        self._loop.add_reader(sock.fileno(), self._accept)

    # asyncio.Server's interface, as far as uvicorn's Server uses it
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in self._pending:
            task.cancel()  # handshakes in progress: not yet connections to drain

    async def wait_closed(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=5)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: pause accepting for a second (as asyncio does)
                log.warning("accept failed on the TLS listener: %s; retrying in 1s", exc)
                self._loop.remove_reader(self.sock.fileno())
                self._loop.call_later(1.0, self._resume)
                return
            if len(self._pending) >= self.max_pending():
                conn.close()
                self.errors.record("overload", peer, "more handshakes under way than server.max_connections")
                continue
            conn.setblocking(False)
            if conn.family != socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._serve(conn, peer, self._loop.time()))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    async def _serve(self, conn: socket.socket, peer, accepted: float) -> None:
        loop = self._loop
        deadline = accepted + self.header_timeout()
        handed = False
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    first = await self._peek(conn)
            except TimeoutError as exc:
                self.errors.record("timeout", peer, _words(exc))
                return
            if not first:
                self.errors.record("closed", peer, "closed before sending anything")
                return
            if first[0] != 0x16:
                if first[0] in _HTTP_START:
                    self.errors.record("plain_http", peer, "plain HTTP request sent to the HTTPS port")
                    await self._answer_plain(conn, deadline)
                else:
                    self.errors.record("not_tls", peer, f"first byte 0x{first[0]:02x} is not a TLS handshake")
                return
            factory = self.protocol_factory

            def protocol():
                made = factory()
                if hasattr(made, "opened_at"):
                    made.opened_at = accepted  # the head timer counts from the accept (handshake included)
                return made

            remaining = max(deadline - loop.time(), 0.001)
            try:
                handed = True  # from here on the transport owns the socket
                await loop.connect_accepted_socket(
                    protocol, conn, ssl=self.tls.context, ssl_handshake_timeout=remaining
                )
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError, EOFError) as exc:
                self.errors.record(handshake_reason(exc), peer, _words(exc))
                return
            self.handshakes += 1
        finally:
            if not handed:
                conn.close()

    async def _peek(self, conn: socket.socket) -> bytes:
        loop = self._loop
        while True:
            try:
                return conn.recv(8, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return b""
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())

    async def _answer_plain(self, conn: socket.socket, deadline: float) -> None:
        """The nginx answer to plain HTTP on an HTTPS port, then a lingering close."""
        loop = self._loop
        try:
            await loop.sock_sendall(conn, PLAIN_HTTP_ANSWER)
            conn.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(_LINGER):
                while await loop.sock_recv(conn, 16384):
                    pass
        except (OSError, TimeoutError):
            pass
