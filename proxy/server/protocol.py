"""The data listener's HTTP/1.1 server protocol: llhttp (httptools) in, ASGI out.

uvicorn's ``Server`` still runs the listener (sockets, graceful shutdown,
the connection and task sets); this protocol replaces its
``HttpToolsProtocol`` and ``RequestResponseCycle`` on the data path. They
cost about a third of Fender's CPU per proxied request (a profile of the
benchmark's pass-through route): a timer armed and cancelled per request
for the keep-alive and another for the head timeout, an ``asyncio.Event``
and two wrapper coroutines per request, two regular expressions per
response header, and a ``write`` for the head and another for the body.
Here a request costs one task and one ``write``:

- one timer per connection, re-armed lazily: it fires at most once per
  timeout period and then looks at what the connection is doing (reading a
  head, idle between requests, or serving), instead of a timer per request;
- the response head is held until the first body message (one ``write``
  for a small response), and flushed at the end of the loop turn when the
  application awaits something first;
- response header names and values are not re-validated: the data plane
  builds them from the upstream's parsed head (llhttp refuses CR, LF and
  NUL in it) and its own constants;
- request bodies are handed over as the parser delivers them (no copy into
  a bytearray and back), with reading paused above 64 KiB buffered.

Hardening at the edge of a service (what llhttp in strict mode does not):

- bounded request heads: ``max_request_line`` (414), ``max_header_bytes``
  and ``max_header_count`` (431), counted in the parser callbacks;
- ``header_timeout`` (408): from the connection opening, or the first byte
  of a further request, until the head is complete;
- ``keepalive_timeout``: an idle keep-alive connection is closed;
- ``send_timeout``: a client that leaves the response unread (writes paused
  by flow control) for that long is cut;
- ``max_requests_per_connection``: the last one is answered with
  ``Connection: close``;
- ``max_connections``: a request on a connection beyond it gets 503 and the
  connection closes;
- header names with ``_``: dropped, refused (400) or allowed;
- chunked trailer fields are never merged into the header list; they count in
  the head limits (``max_header_bytes``, ``max_header_count``, head and trailers
  together), framing, routing and connection fields (RFC 9110 6.5.1) and the
  fields Fender sets itself (``kernel.fields.PROXY_TRAILERS``) are dropped,
  and the rest reach the application on the last ``http.request`` message as
  ``fender.trailers`` (the data plane passes them to a chunked HTTP/1.1 or an
  HTTP/2 upstream request);
- a Transfer-Encoding other than exactly ``chunked`` (e.g. ``gzip,
  chunked``, which llhttp accepts) gets 501, and Transfer-Encoding in an
  HTTP/1.0 request 400 (RFC 9112 6.1: its framing is faulty); HTTP
  versions other than 1.0/1.1 (0.9, 2.0 over text) get 505;
- CONNECT (any target form) gets 400: Fender is no tunnel;
- absolute-form targets: the authority is recorded (``fender.authority`` in
  the scope) so the data plane can refuse targets for other hosts.

llhttp itself refuses with 400: Content-Length together with
Transfer-Encoding, duplicate or non-numeric Content-Length, obs-fold,
control bytes and bare CR/LF in header lines, and bad chunk sizes. Every
refusal closes the connection (lingering, so the client reads the answer)
and is counted in ``fender_local_responses_total{route="-"}``.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

from proxy.kernel.fields import HOP_BY_HOP, PROXY_TRAILERS, TRAILERS
from proxy.kernel.reasons import REASONS
from proxy.metrics import Metrics
from proxy.server.http2 import PREFACE, FenderH2Protocol, after_preface, take_over
from proxy.server.tls import client_cert_subject
from proxy.server.writeflow import WriteFlow
from proxy.tunnel import TunnelEnd, upgrade_offer
from proxy.upstream.connection import NOT_TRAILERS

log = logging.getLogger("uvicorn.error")  # quiet_aborts() filters the expected aborts on this logger


class _HeadRejected(Exception):
    """Raised from a parser callback to stop parsing; ``_reject`` holds the answer."""


# Answers to requests refused while parsing the head, from the reason table (proxy/kernel/reasons.py).
# 414 keeps the reason header_too_large (the request line is part of the head).
_HEAD_REASONS = (
    "header_too_large",
    "bad_request",
    "underscore_header",
    "header_timeout",
    "unsupported_transfer_coding",
    "http_version",
    "connection_limit",
)


def _head_error(status: int, reason: str, text: str) -> bytes:
    phrase = HTTPStatus(status).phrase.encode()
    body = b"fender: %s\n" % text.encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, phrase),
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-fender-error: %s\r\n" % reason.encode(),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


_HEAD_ERROR_RESPONSES = {
    reason: _head_error(REASONS[reason].status, reason, REASONS[reason].text) for reason in _HEAD_REASONS
}
_HEAD_ERROR_RESPONSES["uri_too_long"] = _head_error(414, "header_too_large", "request target too long")
_ERROR_500 = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
)
_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})
_LINGER_SECONDS = 2.0  # longest wait for a refused client to stop sending (NGINX lingering_timeout 5s)
_UNDERSCORE_ACTIONS = {"allow": 0, "drop": 1, "reject": 2}
# Single bytes searched as ints: CPython 3.11's bytes `in` with a bytes needle first tries it as
# an int, raising and clearing a TypeError, which costs several times the search itself.
_UNDERSCORE = ord("_")
_HASH = ord("#")
_HIGH_WATER = 65536  # buffered request body bytes before reading pauses


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")}
_ASGI = {"version": "3.0", "spec_version": "2.3"}
# ASGI extensions this server offers (shared, never mutated). "fender.response.body": an
# http.response.start message may carry "body" and "more_body", as if a body message followed
# at once; head and body then leave in one write, with no flush scheduled for the head alone.
# "fender.response.interim": an "http.response.interim" message (status, headers) before the
# response start writes an informational answer (103 Early Hints...).
EXTENSIONS: dict[str, dict[str, object]] = {"fender.response.body": {}, "fender.response.interim": {}}
_DISCONNECT = {"type": "http.disconnect"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PRI_PAUSE = "Pause on PRI/Upgrade"  # llhttp's error at the HTTP/2 preface (HPE_PAUSED_H2_UPGRADE)


class _ClosedTransport(asyncio.Transport):
    """Stands in for the transport once the connection is lost: closing, and deaf to writes."""

    __slots__ = ()

    def is_closing(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    abort = write_eof = pause_reading = resume_reading = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_CLOSED = _ClosedTransport()


class _Exchange:
    """One request on a connection and its response: the ASGI ``receive`` and ``send`` of one call.

    The connection's parser feeds ``body``/``more_body``; the application
    task reads them through :meth:`receive` and writes through :meth:`send`.
    """

    __slots__ = (
        "conn",
        "scope",
        "head_request",
        "http10",
        "keep_alive",
        "expect_continue",
        "body",
        "buffered",
        "more_body",
        "final_sent",
        "waiter",
        "disconnected",
        "started",
        "complete",
        "pending_head",
        "chunked",
        "remaining",
        "task",
        "trailers",
    )

    def __init__(
        self, conn: FenderHttpProtocol, scope: dict, keep_alive: bool, expect_continue: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.head_request = scope["method"] == "HEAD"
        self.http10 = scope["http_version"] == "1.0"
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self.final_sent = False  # the message with more_body False was returned
        self.waiter: asyncio.Future | None = None
        self.disconnected = False
        self.started = False
        self.complete = False
        self.pending_head: bytes | None = None
        self.chunked = False
        self.remaining = -1  # body bytes still owed under Content-Length; -1: not length-framed
        self.task: asyncio.Task | None = None
        self.trailers: list[tuple[bytes, bytes]] | None = None  # chunked trailer fields, once the body ended

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- ASGI receive

    async def receive(self) -> dict:
        conn = self.conn
        if self.expect_continue:
            self.expect_continue = False
            if not self.started and not conn.transport.is_closing():
                conn.transport.write(_CONTINUE)
        while not self.body and self.more_body and not (self.disconnected or self.complete):
            conn.resume_reading()
            self.waiter = conn.loop.create_future()
            await self.waiter
        if self.disconnected or self.complete:
            return _DISCONNECT
        if self.body or not self.final_sent:
            body = self.body
            data = body[0] if len(body) == 1 else b"".join(body)
            self.body = []
            self.buffered = 0
            if self.more_body:
                conn.resume_reading()
            else:
                self.final_sent = True
                if self.trailers is not None:
                    return {"type": "http.request", "body": data, "more_body": False, TRAILERS: self.trailers}
            return {"type": "http.request", "body": data, "more_body": self.more_body}
        # The whole body was handed over: what is left to report is the client leaving.
        while not (self.disconnected or self.complete):
            self.waiter = conn.loop.create_future()
            await self.waiter
        return _DISCONNECT

    # -- ASGI send

    async def send(self, message: dict) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return
        if not self.started:
            if message["type"] != "http.response.start":
                if message["type"] == "http.response.interim":
                    self._interim(message["status"], message.get("headers", ()))
                    return
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            self.started = True
            self.expect_continue = False
            status = message["status"]
            if status == 101:
                self._switch(message.get("headers", ()))
                return
            self.pending_head = self._head(status, message.get("headers", ()))
            if "body" in message:
                # The fender.response.body extension: the first body part rides with the head.
                self._write_body(message["body"], message.get("more_body", False))
            else:
                conn.loop.call_soon(self._flush_head)
            return
        if self.complete:
            raise RuntimeError(f"unexpected {message['type']!r} after the response completed")
        if message["type"] != "http.response.body":
            if message["type"] == "http.response.trailers":
                self._write_trailers(message.get("headers", ()))
                return
            raise RuntimeError(f"expected http.response.body, got {message['type']!r}")
        self._write_body(message.get("body", b""), message.get("more_body", False))

    def _write_trailers(self, trailers) -> None:
        """End a chunked body with trailer fields (ASGI http.response.trailers, after more_body)."""
        if self.chunked and not self.head_request:
            parts = [b"0\r\n"]
            for name, value in trailers:
                parts += (name, b": ", value, b"\r\n")
            parts.append(b"\r\n")
            self.chunked = False  # the terminating chunk is written here, not by _write_body
            self.conn.transport.write(b"".join(parts))
        self._write_body(b"", False)

    def _interim(self, status: int, headers) -> None:
        """Relay an informational answer (103 Early Hints...) before the final response
        (ASGI message ``http.response.interim``, this server's extension ``fender.response.interim``);
        never to an HTTP/1.0 client (RFC 9110 15.2)."""
        conn = self.conn
        if self.http10 or conn.transport.is_closing() or not 100 < status < 200 or status == 101:
            return
        parts = [_STATUS_LINES.get(status) or _status_line(status)]
        for name, value in headers:
            if name not in HOP_BY_HOP:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        conn.transport.write(b"".join(parts))

    def _write_body(self, body: bytes, more: bool) -> None:
        conn = self.conn
        if self.head_request:
            body = b""
        elif self.chunked:
            if body:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                body += b"0\r\n\r\n"
        elif self.remaining >= 0:
            if len(body) > self.remaining:
                # More than the Content-Length promised: never let it spill into the next response.
                body = body[: self.remaining]
                self.keep_alive = False
            self.remaining -= len(body)
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            body = head + body if body else head
        if body:
            conn.transport.write(body)
        if not more:
            if self.remaining > 0:
                self.keep_alive = False  # the body ended short of its Content-Length: only a close frames it
            self.complete = True
            conn.response_complete(self)

    def _switch(self, headers) -> None:
        """101 Switching Protocols: the head leaves now, and this connection stops speaking HTTP.

        The tunnel end that took over the transport (see data_received) now carries the bytes;
        this exchange is complete as far as HTTP goes, and the connection's timers stop.
        """
        self.complete = True
        self.keep_alive = False
        parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.conn.transport.write(b"".join(parts))
        self.conn.tunnelled()

    def _flush_head(self) -> None:
        head = self.pending_head
        if head is not None and not self.disconnected and not self.conn.transport.is_closing():
            self.pending_head = None
            self.conn.transport.write(head)

    def _head(self, status: int, headers) -> bytes:
        parts = [_STATUS_LINES.get(status) or _status_line(status)]
        framed = False
        has_close = False
        for name, value in headers:
            if name == b"content-length":
                if not framed:
                    framed = True
                    self.remaining = int(value)
            elif name == b"transfer-encoding":
                framed = True
                self.chunked = True
            elif name == b"connection" and value.lower().find(b"close") >= 0:
                self.keep_alive = False
                has_close = True
            parts += (name, b": ", value, b"\r\n")
        if self.head_request or status < 200 or status == 204 or status == 304:
            self.remaining = -1
            self.chunked = False
        elif not framed:
            if self.http10:
                self.keep_alive = False  # HTTP/1.0 has no chunked coding: the close ends the body
            else:
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive and not has_close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


class FenderHttpProtocol(WriteFlow, asyncio.Protocol):
    """HTTP/1.1 for the data listener, built by uvicorn's ``Server`` (``Config(http=FenderHttpProtocol)``).

    The class attributes are set from the policy by :meth:`configure`; new
    and existing connections read them, so a reload applies at once.
    """

    max_header_bytes = 32 * 1024
    max_header_count = 100
    max_request_line = 8 * 1024
    header_timeout = 10.0
    keepalive_timeout = 75.0
    send_timeout = 60.0
    max_requests_per_connection = 1000
    underscores = 1  # _UNDERSCORE_ACTIONS
    rejected: dict = {}  # reason -> pre-bound counter child
    # Set by a TLS listener (proxy/server/tls.py) to the accept time: the first head is timed from
    # it, so the handshake counts inside header_timeout. None: timed from connection_made.
    opened_at: float | None = None
    http2 = True  # server.http2.enabled: the h2c preface and ALPN h2 switch to h2_protocol
    h2_protocol: type[FenderH2Protocol] = FenderH2Protocol  # this listener's (see for_listener)

    @classmethod
    def for_listener(cls) -> type[FenderHttpProtocol]:
        """A subclass of its own for one Fender's listener, so two Fenders in one process (tests,
        an embedding) never share limits; the limits stay class attributes, as cheap to read."""
        # Its HTTP/2 protocol too (a connection that opens with the preface, or ALPN h2, switches to it).
        h2 = type(FenderH2Protocol.__name__, (FenderH2Protocol,), {"rejected": {}})
        return type(cls.__name__, (cls,), {"rejected": {}, "h2_protocol": h2})

    @classmethod
    def configure(cls, server, metrics: Metrics) -> None:
        """Take the limits from ``policy.server`` and bind the rejection counters once."""
        cls.max_header_bytes = server.max_header_bytes
        cls.max_header_count = server.max_header_count
        cls.max_request_line = server.max_request_line
        cls.header_timeout = server.header_timeout
        cls.keepalive_timeout = server.keepalive_timeout
        cls.send_timeout = server.send_timeout
        cls.max_requests_per_connection = server.max_requests_per_connection
        cls.underscores = _UNDERSCORE_ACTIONS[server.headers_with_underscores]
        cls.rejected = {
            reason: metrics.local_responses.labels(
                "-", "header_too_large" if reason == "uri_too_long" else reason
            )
            for reason in _HEAD_ERROR_RESPONSES
        }
        cls.http2 = server.http2.enabled
        cls.h2_protocol.configure(server, metrics, cls.underscores, cls.rejected)

    def __init__(self, config, server_state, app_state=None, _loop=None) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.limit_concurrency = config.limit_concurrency
        self.parser = httptools.HttpRequestParser(self)
        # Answer the request before a pipelined one that arrives after its Connection: close.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        # A TLS connection's (version, client certificate subject or None), for the access log.
        self.tls_info: tuple[str, str | None] | None = None
        # The request being parsed and the one whose application task runs (they differ when pipelined).
        self.current: _Exchange | None = None
        self.active: _Exchange | None = None
        self.pipeline: deque[_Exchange] = deque()
        self.write_paused = False
        self._read_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        # Per head being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_count = 0
        self._expect_continue = False
        self._transfer_encoding: bytes | None = None
        self._in_trailers = False
        self._trailers: list[tuple[bytes, bytes]] | None = None  # of the chunked body being read
        self._reject = ""
        # The connection's one timer (see _tick) and what it measures from.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._head_started: float | None = None  # a head is being read since then
        self._idle_since = 0.0  # the last response ended then
        self._send_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._unstarted: _Exchange | None = None  # its task was created but has not run yet
        self._discard = False  # malformed input while a response was being written: close after it
        self._served = 0
        self._tunnel = False  # switched protocols (101): the bytes belong to a tunnel now

    # -- connection events

    def connection_made(self, transport) -> None:
        self.connections.add(self)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                peer = sock.getpeername()
                local = sock.getsockname()
                self.client = (str(peer[0]), int(peer[1]))
                self.server = (str(local[0]), int(local[1]))
            except (OSError, TypeError, IndexError):
                pass
        if transport.get_extra_info("sslcontext"):
            self.scheme = "https"
            ssl_object = transport.get_extra_info("ssl_object")
            if self.http2 and ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                take_over(self, b"", "alpn")
                return
            self.tls_info = (
                ssl_object.version() if ssl_object is not None else "TLS",
                client_cert_subject(transport),
            )
        now = self.opened_at or self.loop.time()
        self._head_started = now  # the first head is timed from the connection opening
        self._arm(now + self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        for timer in (self._timer, self._send_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._send_timer = self._linger_timer = None
        for exchange in (self.current, self.active, *self.pipeline):
            if exchange is not None:
                if not exchange.complete:
                    exchange.disconnected = True
                exchange.wake()
        self._wake_drain()
        if exc is None:
            self.transport.close()
        # Drop the references that make this connection a reference cycle (transport <->
        # protocol, protocol <-> exchange, parser -> bound callbacks): with none left per
        # request either, the garbage collector seldom runs, and closed connections would
        # pile up until it did. An application task still running sees a closed transport.
        self.transport = _CLOSED
        self.parser = None  # type: ignore[assignment]
        self.current = self.active = self._unstarted = None
        self.pipeline.clear()

    def eof_received(self) -> bool | None:
        return None  # close the connection once the client half-closes (uvicorn does the same)

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None or self._discard:
            return  # refused connection closing: discard
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The parser reads no further requests after an upgrade request: close after this one.
            # One that offers a protocol (not h2c, which is ignored and served as HTTP/1.1) gets a
            # tunnel end in place of this protocol, buffering what the client sends until the
            # upstream's 101 (the data plane decides whether there is one; see proxy/tunnel.py).
            exchange = self.current
            if exchange is not None:
                exchange.keep_alive = False
                offer = exchange.scope.get("fender.upgrade")
                if offer is not None and not exchange.complete and not self.transport.is_closing():
                    early = data[upgrade.args[0] :]
                    end = TunnelEnd(self.transport, early, fallback=self, on_lost=self.connection_lost)
                    offer.client_end = end
                    self.transport.set_protocol(end)
        except httptools.HttpParserError as exc:
            # llhttp stops at the HTTP/2 preface's head (PRI * HTTP/2.0): h2c with prior knowledge,
            # told apart here at no cost to HTTP/1.1 requests.
            if self.http2 and self._served == 0 and self._url == b"*" and exc.args[:1] == (_PRI_PAUSE,):
                frames = after_preface(data)
                if frames is not None:
                    take_over(self, PREFACE + frames, "prior_knowledge")
                    return
            self.refuse()
            return
        if self._head_started is not None:
            # Part of a head arrived: time it (a no-op while an earlier deadline is armed).
            self._arm(self._head_started + self.header_timeout)

    # -- the connection's timer

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # fires first; _tick re-arms for what is left
            timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        """The one timer fired: act on the deadline of what the connection is doing, or re-arm for it."""
        self._timer = None
        if self.transport.is_closing() or self._linger_timer is not None or self._tunnel:
            return
        now = self.loop.time()
        busy = self.active is not None and not self.active.complete
        if self._head_started is not None:
            deadline = self._head_started + self.header_timeout
            if now >= deadline:
                self._head_started = None
                if busy:
                    # A pipelined head is incomplete while an earlier request is served:
                    # finish that one, then close instead of writing 408 into its response.
                    self.active.keep_alive = False  # type: ignore[union-attr]
                    if self.current is not None:
                        self.current.keep_alive = False
                    return
                self._reject = "header_timeout"
                self.refuse()
                return
        elif busy or self.pipeline:
            return  # serving: the end of the response arms the keep-alive deadline
        else:
            deadline = self._idle_since + self.keepalive_timeout
            if now >= deadline:
                self.transport.close()
                return
        self._arm(deadline)

    # -- parser callbacks

    def on_message_begin(self) -> None:
        if self._head_started is None:
            self._head_started = self.loop.time()
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._head_count = 0
        self._expect_continue = False
        self._transfer_encoding = None
        self._in_trailers = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if len(self._url) > self.max_request_line or self._head_bytes > self.max_header_bytes:
            self._reject = "uri_too_long"
            raise _HeadRejected

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._head_count += 1
        if self._head_bytes > self.max_header_bytes or self._head_count > self.max_header_count:
            self._reject = "header_too_large"
            raise _HeadRejected
        if self._in_trailers:
            # Chunked trailer fields: llhttp reports them like headers (and checked their characters).
            # Never merged into the head; passed on the last body message unless RFC 9110 6.5.1 forbids.
            name = name.lower()
            if name not in NOT_TRAILERS and name not in PROXY_TRAILERS and name[:7] != b"fender-":
                if self._trailers is None:
                    self._trailers = []
                self._trailers.append((name, value))
            return
        name = name.lower()
        if _UNDERSCORE in name and self.underscores:  # an int needle: see _UNDERSCORE
            if self.underscores == 2:
                self._reject = "underscore_header"
                raise _HeadRejected
            return  # dropped (NGINX underscores_in_headers off)
        if name == b"transfer-encoding":
            self._transfer_encoding = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_started = None
        self._in_trailers = True
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._reject = "http_version"
            raise _HeadRejected
        raw_method = parser.get_method()
        if raw_method == b"CONNECT":
            # Fender is not a tunnel: a forwarded CONNECT would turn a pooled upstream
            # connection into one, whatever its target form.
            self._reject = "bad_request"
            raise _HeadRejected
        te = self._transfer_encoding
        if te is not None:
            if version == "1.0":
                self._reject = "bad_request"
                raise _HeadRejected
            if te.strip(b" \t").lower() != b"chunked":
                # A real coding list ending in chunked is valid but unsupported (501,
                # RFC 9112 6.1); anything else (xchunked, identity, chunked-then-more)
                # is an attempt to be framed two ways: 400.
                codings = [c.strip(b" \t").lower() for c in te.split(b",")]
                valid = codings[-1] == b"chunked" and all(c in _CODINGS for c in codings[:-1])
                self._reject = "unsupported_transfer_coding" if valid else "bad_request"
                raise _HeadRejected
        if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
            self._reject = "connection_limit"
            raise _HeadRejected
        url = self._url
        authority = None
        if url[:1] == b"/" and _HASH not in url:
            raw_path, _, query = url.partition(b"?")
        elif url == b"*":
            raw_path, query = b"*", b""
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._reject = "bad_request"
                raise _HeadRejected from None
            raw_path = parsed.path or b""
            query = parsed.query or b""
            if parsed.host:
                # Absolute-form (RFC 9112 3.2.2): remember the authority it names,
                # so the data plane can refuse targets for other hosts.
                authority = parsed.host if parsed.port is None else b"%s:%d" % (parsed.host, parsed.port)
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": "",
            "method": _METHODS.get(raw_method) or raw_method.decode("latin-1"),
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self._headers,
            "extensions": EXTENSIONS,
        }
        if authority is not None:
            scope["fender.authority"] = authority
        if self.tls_info is not None:
            scope["fender.tls"] = self.tls_info
        if parser.should_upgrade():
            offer = upgrade_offer(self._headers)
            if offer is not None:
                scope["fender.upgrade"] = offer
        self._served += 1
        keep_alive = (
            version == "1.1"
            and parser.should_keep_alive()
            and self._served < self.max_requests_per_connection
        )
        exchange = _Exchange(self, scope, keep_alive, self._expect_continue)
        self.current = exchange
        active = self.active
        if active is None or active.complete:
            self._start(exchange)
        else:
            # Pipelined: answer in order; stop reading until the earlier response is out.
            self.pipeline.append(exchange)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self.current
        if exchange is None or exchange.complete:
            return  # the response was already sent (e.g. 413 before the body ended): discard
        exchange.body.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > _HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.current
        trailers = self._trailers
        if trailers is not None:
            self._trailers = None
        if exchange is None or exchange.complete:
            return
        if trailers is not None:
            exchange.trailers = trailers
        exchange.more_body = False
        exchange.wake()

    # -- running the application

    def _start(self, exchange: _Exchange) -> None:
        self.active = exchange
        task = exchange.task = self.loop.create_task(self._run(exchange))
        self.tasks.add(task)
        # Until it runs, a body error found in the same read as the head (a bad chunk
        # size) cancels it before it forwards anything.
        self._unstarted = exchange

    async def _run(self, exchange: _Exchange) -> None:
        if self._unstarted is exchange:
            self._unstarted = None
        try:
            await self.app(exchange.scope, exchange.receive, exchange.send)
        except BaseException as exc:  # the connection must end cleanly whatever happened
            if not isinstance(exc, asyncio.CancelledError):
                log.error("Exception in ASGI application", exc_info=exc)
            if not exchange.started and not exchange.disconnected and not self.transport.is_closing():
                self.transport.write(_ERROR_500)
            exchange.started = exchange.complete = True
            self.transport.close()  # after a started response: the client sees it cut
            if not isinstance(exc, Exception):
                raise
        else:
            if not exchange.complete and not exchange.disconnected:
                if not exchange.started:
                    log.error("ASGI callable returned without starting response.")
                    self.transport.write(_ERROR_500)
                else:
                    log.error("ASGI callable returned without completing response.")
                exchange.started = exchange.complete = True
                self.transport.close()
        finally:
            self.tasks.discard(exchange.task)
            exchange.task = None

    def response_complete(self, exchange: _Exchange) -> None:
        if self.active is exchange:
            self.active = None
        if not exchange.keep_alive or self._discard:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        exchange.body = []
        if self.pipeline:
            self._start(self.pipeline.popleft())
            if not self.pipeline:
                self.resume_reading()
            return
        self.resume_reading()
        now = self._idle_since = self.loop.time()
        if self._head_started is None:
            self._arm(now + self.keepalive_timeout)

    def handed_over(self) -> None:
        """The connection became HTTP/2 (proxy/server/http2.py): this protocol is done with it."""
        for timer in (self._timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._send_timer = None
        self._head_started = None
        self.transport = _CLOSED
        self.parser = None  # type: ignore[assignment]
        self.current = self.active = None

    def tunnelled(self) -> None:
        """The connection became a tunnel: no HTTP timer applies to it any more."""
        self._tunnel = True
        for timer in (self._timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._send_timer = None

    def shutdown(self) -> None:
        """Called by uvicorn's Server to begin a graceful shutdown."""
        if self._tunnel:
            return  # open tunnels get the drain grace; the data plane closes them when it ends
        active = self.active
        if active is None or active.complete:
            if not self.pipeline:
                self.transport.close()
                return
        for exchange in (active, self.current, *self.pipeline):
            if exchange is not None:
                exchange.keep_alive = False

    # -- flow control

    def pause_reading(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.pipeline:
            self._read_paused = False
            self.transport.resume_reading()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        # The client has not read for send_timeout: drop it, the app's send() sees a disconnect.
        self.transport.abort()

    # -- refusals

    def refuse(self) -> None:
        """Answer a request refused while parsing (``_reject``, else 400) and close, lingering."""
        reason = self._reject or "bad_request"
        self._head_started = None
        unstarted = self._unstarted
        if unstarted is not None and unstarted.task is not None:
            # Cancelled before its first step, the task never runs _run's cleanup: untrack it here.
            unstarted.task.cancel()
            self.tasks.discard(unstarted.task)
            unstarted.task = None
            self._unstarted = None
        counter = self.rejected.get(reason)
        if counter is not None:
            counter.inc()
        if self.transport.is_closing() or self._linger_timer is not None or self._discard:
            return
        active = self.active
        if active is not None and active.started and not active.complete:
            # An earlier request's response is being written: never put a 400 in the
            # middle of it. Serve nothing more, read nothing more, close after it.
            self._discard = True
            self.pipeline.clear()
            active.keep_alive = False
            return
        if active is not None and not active.complete:
            active.disconnected = True  # its answer is the refusal; it must not write after it
            active.wake()
        self.pipeline.clear()
        self.transport.write(_HEAD_ERROR_RESPONSES[reason])
        # Lingering close (as NGINX): send FIN after the answer and discard what the
        # client still sends for a moment. Closing at once would make the kernel answer
        # that unread data with RST, and the RST destroys the 4xx before the client reads it.
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.close()
            return
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        self._linger_timer = self.loop.call_later(_LINGER_SECONDS, self.transport.close)
