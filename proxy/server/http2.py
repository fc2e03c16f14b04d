"""HTTP/2 on the data listener: the ``h2`` state machine in, one ASGI request per stream out.

A connection becomes HTTP/2 in one of two ways, both decided by
:class:`~proxy.server.protocol.FenderHttpProtocol` before any HTTP/1.1 request
is served on it: the client opens with the HTTP/2 connection preface on the
cleartext port (h2c with prior knowledge; llhttp stops at the preface's
``PRI * HTTP/2.0`` head, so HTTP/1.1 connections pay nothing for the check),
or TLS negotiated ``h2`` by ALPN. That protocol then hands the transport to
:class:`FenderH2Protocol` (:func:`take_over`).

Each stream is one ASGI ``http`` request through the same data plane as an
HTTP/1.1 request (routing, limits, policies, metrics, access log), with
``http_version`` ``"2"``:

- the request head is checked against RFC 9113 8.2 and 8.3 here (lowercase
  field names, no connection-specific fields, ``te`` only ``trailers``, the
  pseudo-header fields once each, before the others, and only the request
  ones); a malformed stream is reset with PROTOCOL_ERROR and never reaches
  the data plane;
- ``:authority`` becomes the ``Host`` field (a differing ``Host`` is
  malformed), so the data plane's routing and no-open-proxy rule see the
  same Host an HTTP/1.1 client would send; ``cookie`` fields are joined with
  ``; `` (RFC 9113 8.2.3); a body without ``content-length`` is marked
  ``transfer-encoding: chunked``, which is what an HTTP/1.1 replica receives;
- request trailers (HEADERS with END_STREAM after DATA) are checked as a head
  (no pseudo-header field), bounded by ``max_header_list_size``, stripped of
  the fields RFC 9110 6.5.1 keeps out of trailers, and handed to the data
  plane on the last body message (``fender.trailers``);
- responses leave as HEADERS (lowercased, connection-specific fields
  dropped), DATA within the client's flow-control windows, and trailers; an
  empty final response is one HEADERS frame with END_STREAM (a gRPC
  trailers-only answer).

Flow control, both ways, with bounded buffers: a stream's request body is
buffered up to ``initial_window`` (the client may not send more before Fender
hands that much to the upstream and opens the window again); the connection
window is 8 windows, so a stream whose upstream reads slowly never stalls the
others. A response body waits for the client's window per stream; a stream
whose window stays shut for ``send_timeout`` is reset, and a connection whose
window or socket stays shut that long is closed.

Hardening (each tested with a raw-frame client in tests/test_http2_hardening.py):
streams beyond ``max_concurrent_streams`` (counting streams whose application
task still runs, even when the client reset them) get REFUSED_STREAM; more
than ``max_resets_per_second`` client resets (Rapid Reset, CVE-2023-44487),
more than ``max_control_frames_per_second`` SETTINGS and PING frames, or their
answers piling up unread, end the connection with GOAWAY ENHANCE_YOUR_CALM; a
header list over ``max_header_list_size`` decoded is answered 431 on its stream,
the connection going on, but one over four times that (an HPACK bomb), or a
header block over it across CONTINUATION frames (CVE-2024-27316), ends it too.
A content-length that the DATA frames contradict (or one that is no number) is
a stream error, RST_STREAM PROTOCOL_ERROR (RFC 9113 8.1.1). An idle
connection gets GOAWAY at ``keepalive_timeout``; drain and
``max_requests_per_connection`` send GOAWAY with the last stream id and let
the streams in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import unquote

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, FlowControlError, ProtocolError, StreamClosedError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hpack import NeverIndexedHeaderTuple as _NotIndexed
from hyperframe.frame import ContinuationFrame, GoAwayFrame, HeadersFrame

from proxy.kernel.fields import PROXY_TRAILERS, TRAILERS
from proxy.metrics import Metrics
from proxy.server.writeflow import WriteFlow
from proxy.upstream.connection import NOT_TRAILERS
from proxy.upstream.http2 import Malformed, StreamErrorConnection

log = logging.getLogger("uvicorn.error")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def after_preface(data: bytes) -> bytes | None:
    """The bytes after the connection preface in ``data``, the read at which llhttp stopped.

    llhttp stops ("Pause on PRI/Upgrade") on the read that brings the preface's 24th byte,
    however the preface was split across reads, so that read holds the preface's last
    ``24 - k`` bytes (k < 24 came before) and then frames. The longest preface tail that
    ``data`` starts with wins: frames cannot start with CR LF (a frame length of over 850 kB).
    None: ``data`` holds no tail of the preface (not HTTP/2).
    """
    for k in range(max(0, len(PREFACE) - len(data)), len(PREFACE)):
        tail = PREFACE[k:]
        if data.startswith(tail):
            return data[len(tail) :]
    return None


_ASGI = {"version": "3.0", "spec_version": "2.3"}
# The ASGI extensions of Fender's HTTP/1.1 protocol (proxy/server/protocol.py), offered here too.
EXTENSIONS: dict[str, dict] = {"fender.response.body": {}, "fender.response.interim": {}}
_DISCONNECT = {"type": "http.disconnect"}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")}
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# RFC 9113 8.2.2: connection-specific fields make a request malformed, and are never sent.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_RESPONSE_DROP = _CONNECTION_SPECIFIC | {b"te"}
# Field-name characters (RFC 9110 5.6.2 tchar) without upper case (RFC 9113 8.2.1).
_NAME_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_EDGE = (0x20, 0x09)  # space, tab
_UNDERSCORE = ord("_")
_STATUS = {status: b"%d" % status for status in range(100, 600)}
_REFUSED_SCOPE = {"method": "GET"}  # a stream answered by the protocol itself never reaches the app
# Response fields whose values differ per response: kept out of the HPACK dynamic table, which
# they would only churn (and h2's encoder searches that table linearly for every field).
_UNIQUE = frozenset(
    {
        b"date",
        b"x-request-id",
        b"content-length",
        b"fender-trace",
        b"set-cookie",
        b"etag",
        b"age",
        b"grpc-message",
    }
)
_CONNECTION_WINDOWS = 8  # the connection's receive window, in stream windows
# A header list decoded past max_header_list_size gets 431 on its stream; past this many times the
# limit (an HPACK bomb: a few bytes on the wire referencing a large table entry) decoding stops and
# the connection ends, since HPACK state cannot be kept in step with a block not decoded in full.
_HARD_HEADER_FACTOR = 4
_FLOOD_BUFFER = 1 << 20  # unread answers (PING and SETTINGS ACKs...) past which a flood is assumed


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer with the header block capped in bytes across CONTINUATION frames.

    h2 caps a block at 64 CONTINUATION frames of up to 16 KiB each; a block
    that never ends would still pin a megabyte per connection and burn CPU
    (CVE-2024-27316). Here its compressed size is capped at the hard decoded
    limit (``_HARD_HEADER_FACTOR`` times max_header_list_size: below it an
    over-size header list is a stream error, 431, above it a connection error).
    """

    def __init__(self, max_block: int) -> None:
        super().__init__(server=True)
        self.max_block = max_block
        self._block = 0

    def _update_header_buffer(self, f):
        if isinstance(f, ContinuationFrame):
            self._block += len(f.data)
            if self._block > self.max_block:
                raise DenialOfServiceError("header block larger than max_header_list_size")
        elif isinstance(f, HeadersFrame):
            self._block = len(f.data)
        return super()._update_header_buffer(f)


class _Connection(StreamErrorConnection):
    """h2's connection, leaving the concurrent-stream limit to the protocol.

    h2 ends the whole connection (GOAWAY) when a client opens a stream beyond
    the advertised limit; RFC 9113 5.1.2 allows a stream error, and
    REFUSED_STREAM tells the client nothing was processed, so it may retry
    the request. The protocol counts streams itself (including those whose
    work continues after the client reset them) and refuses the extra ones.
    """

    prune_above = 256  # streams (open and closed) h2 may hold before they are pruned

    @property
    def open_inbound_streams(self) -> int:
        # h2 prunes its closed streams in this accessor, walking every stream; pruning once
        # the table has grown (not per new stream) keeps it bounded for a fraction of the cost.
        if len(self.streams) > self.prune_above:
            super().open_inbound_streams  # noqa: B018
        return 0


class _Stream:
    """One request stream and its response: the ASGI ``receive`` and ``send`` of one call."""

    __slots__ = (
        "conn",
        "sid",
        "scope",
        "head_request",
        "body",
        "unacked",
        "more_body",
        "final_sent",
        "waiter",
        "window_waiter",
        "disconnected",
        "started",
        "complete",
        "task",
        "pending",
        "trailers",
    )

    def __init__(self, conn: FenderH2Protocol, sid: int, scope: dict, ended: bool) -> None:
        self.conn = conn
        self.sid = sid
        self.scope = scope
        self.head_request = scope["method"] == "HEAD"
        self.body: list[bytes] = []
        self.unacked = 0  # flow-controlled bytes buffered, handed back to the client once read
        self.more_body = not ended
        self.final_sent = False
        self.waiter: asyncio.Future | None = None
        self.window_waiter: asyncio.Future | None = None
        self.disconnected = False  # reset by the client, or the connection was lost
        self.started = False
        self.complete = False  # the response ended (END_STREAM sent, or the stream was reset)
        self.task: asyncio.Task | None = None
        self.pending: list | None = None  # response headers held for the first body part
        self.trailers: list[tuple[bytes, bytes]] | None = None  # request trailers, checked

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)
        waiter = self.window_waiter
        if waiter is not None:
            self.window_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- ASGI receive

    async def receive(self) -> dict:
        conn = self.conn
        while not self.body and self.more_body and not (self.disconnected or self.complete):
            self.waiter = conn.loop.create_future()
            await self.waiter
        if self.disconnected or self.complete:
            return _DISCONNECT
        if self.body or not self.final_sent:
            body = self.body
            data = body[0] if len(body) == 1 else b"".join(body)
            self.body = []
            if self.unacked:
                conn.ack(self.sid, self.unacked)
                self.unacked = 0
            if not self.more_body:
                self.final_sent = True
                if self.trailers is not None:
                    return {"type": "http.request", "body": data, "more_body": False, TRAILERS: self.trailers}
            return {"type": "http.request", "body": data, "more_body": self.more_body}
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
        kind = message["type"]
        if not self.started:
            if kind == "http.response.interim":
                status = message["status"]
                if 100 < status < 200:
                    conn.send_headers(self.sid, self._headers(status, message.get("headers", ())), False)
                return
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind!r}")
            self.started = True
            headers = self._headers(message["status"], message.get("headers", ()))
            if "body" in message:
                await self._body(message["body"], message.get("more_body", False), headers)
            else:
                self.pending = headers
            return
        if self.complete:
            raise RuntimeError(f"unexpected {kind!r} after the response completed")
        if kind == "http.response.body":
            await self._body(message.get("body", b""), message.get("more_body", False), None)
        elif kind == "http.response.trailers":
            await self._trailers(message.get("headers", ()))
        else:
            raise RuntimeError(f"expected http.response.body, got {kind!r}")

    @staticmethod
    def _headers(status: int, headers) -> list[tuple[bytes, bytes]]:
        out = [(b":status", _STATUS.get(status) or b"%d" % status)]
        for name, value in headers:
            name = name.lower()
            if name in _UNIQUE:
                out.append(_NotIndexed(name, value))
            elif name not in _RESPONSE_DROP:
                out.append((name, value))
        return out

    async def _body(self, body: bytes, more: bool, headers) -> None:
        conn = self.conn
        if headers is None:
            headers, self.pending = self.pending, None
        if self.head_request:
            body = b""
            more = False
        if headers is not None:
            conn.send_headers(self.sid, headers, not body and not more)
            if not body and not more:
                self._done()
                return
        if body:
            await self._data(body, not more)
        elif not more:
            conn.end_stream(self.sid)
        if not more:
            self._done()

    async def _trailers(self, trailers) -> None:
        conn = self.conn
        if self.pending is not None:
            headers, self.pending = self.pending, None
            conn.send_headers(self.sid, headers, False)
        fields = []
        for name, value in trailers:
            name = name.lower()
            if name not in _RESPONSE_DROP and name[:1] != b":":
                fields.append((name, value))
        if self.head_request or not fields:
            conn.end_stream(self.sid)
        else:
            conn.send_headers(self.sid, fields, True)
        self._done()

    async def _data(self, data: bytes, end: bool) -> None:
        conn = self.conn
        h2 = conn.h2
        sid = self.sid
        while True:
            if self.disconnected:
                return
            window = h2.local_flow_control_window(sid)
            if window <= 0:
                await conn.wait_window(self)
                continue
            size = min(window, h2.max_outbound_frame_size)
            if len(data) <= size:
                h2.send_data(sid, data, end_stream=end)
                conn.flush_soon()
                return
            h2.send_data(sid, data[:size])
            data = data[size:]
            conn.flush_soon()
            if conn.write_paused:
                await conn.drain()

    def _done(self) -> None:
        self.complete = True
        self.conn.flush_soon()
        self.conn.stream_complete(self)


class FenderH2Protocol(WriteFlow, asyncio.Protocol):
    """One HTTP/2 client connection of the data listener (see the module docstring).

    The class attributes are set from the policy by :meth:`configure`; a new
    connection reads them, so a reload applies to connections opened after it.
    """

    enabled = True
    max_concurrent_streams = 100
    max_header_list_size = 32 * 1024
    max_header_count = 100
    initial_window = 1 << 20
    max_resets = 100
    max_control = 1000
    keepalive_timeout = 75.0
    send_timeout = 60.0
    max_requests = 1000
    underscores = 1
    connections_counter: dict = {}
    goaway_counter: dict = {}
    reset_counter: dict = {}
    rejected: dict = {}

    @classmethod
    def configure(cls, server, metrics: Metrics, underscores: int, rejected: dict) -> None:
        options = server.http2
        cls.enabled = options.enabled
        cls.max_concurrent_streams = options.max_concurrent_streams
        cls.max_header_list_size = options.max_header_list_size
        cls.initial_window = options.initial_window
        cls.max_resets = options.max_resets_per_second
        cls.max_control = options.max_control_frames_per_second
        cls.max_header_count = server.max_header_count
        cls.keepalive_timeout = server.keepalive_timeout
        cls.send_timeout = server.send_timeout
        cls.max_requests = server.max_requests_per_connection
        cls.underscores = underscores
        cls.rejected = rejected
        cls.connections_counter = {
            m: metrics.http2_connections.labels(m) for m in ("prior_knowledge", "alpn")
        }
        cls.goaway_counter = {
            r: metrics.http2_goaway.labels(r)
            for r in (
                "drain",
                "max_requests",
                "idle",
                "rapid_reset",
                "control_flood",
                "header_too_large",
                "flow_control_stall",
                "protocol_error",
            )
        }
        cls.reset_counter = {
            r: metrics.http2_stream_resets.labels(r)
            for r in ("refused", "malformed", "flow_control_stall", "aborted", "client_reset")
        }

    def __init__(self, app, loop, connections, tasks, server, client, scheme, limit_concurrency) -> None:
        self.app = app
        self.loop = loop
        self.connections = connections
        self.tasks = tasks
        self.server = server
        self.client = client
        self.scheme = scheme
        self.limit_concurrency = limit_concurrency
        config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # checked here, so a malformed stream is a stream error
            normalize_inbound_headers=False,
            validate_outbound_headers=False,  # built here from parsed upstream heads
            normalize_outbound_headers=False,
        )
        h2 = self.h2 = _Connection(config=config)
        hard_limit = self.max_header_list_size * _HARD_HEADER_FACTOR
        h2.incoming_buffer = _FrameBuffer(hard_limit)
        h2.local_settings = type(h2.local_settings)(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.max_header_list_size,
                SettingCodes.INITIAL_WINDOW_SIZE: self.initial_window,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # The decoded-size cap holds from the first header block, not only once SETTINGS is acknowledged;
        # between the advertised limit and this one a header list is refused on its stream (431).
        h2.decoder.max_header_list_size = hard_limit
        h2.prune_above = 2 * self.max_concurrent_streams + 64
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.streams: dict[int, _Stream] = {}
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._flush_handle: asyncio.Handle | None = None
        self._served = 0
        self._last_stream = 0  # the highest stream id accepted
        self._goaway_sent = False
        self._closing = False
        self._peer_gone = False  # the client sent GOAWAY
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = loop.time()
        self._send_timer: asyncio.TimerHandle | None = None
        self._window_start = 0.0
        self._resets = 0
        self._control = 0

    # -- starting

    def start(self, transport, data: bytes, mode: str) -> None:
        """Take over ``transport`` (already switched to this protocol) with the bytes read so far."""
        self.transport = transport
        self.connections.add(self)
        counter = self.connections_counter.get(mode)
        if counter is not None:
            counter.inc()
        h2 = self.h2
        h2.initiate_connection()
        h2.increment_flow_control_window(self.initial_window * _CONNECTION_WINDOWS - 65535)
        self.flush()
        self._arm()
        if data:
            self.data_received(data)

    def connection_made(self, transport) -> None:  # set_protocol does not call it: see start()
        self.transport = transport

    # -- receiving

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            reason = "header_too_large" if isinstance(exc, DenialOfServiceError) else "protocol_error"
            if isinstance(exc, FlowControlError):
                reason = "protocol_error"
            self._count_goaway(reason)
            self._close_now()
            return
        for event in events:
            if isinstance(event, DataReceived):
                self._on_data(event)
            elif isinstance(event, RequestReceived):
                self._on_request(event)
                if self._closing:
                    return
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.more_body = False
                    stream.wake()
            elif isinstance(event, WindowUpdated):
                self._on_window(event.stream_id)
            elif isinstance(event, StreamReset):
                self._on_reset(event)
                if self._closing:
                    return
            elif isinstance(event, PingReceived | RemoteSettingsChanged):
                if self._flood(control=True):
                    return
                if isinstance(event, RemoteSettingsChanged):
                    self._on_window(0)  # a new initial window may open every stream's window
            elif isinstance(event, TrailersReceived):
                self._on_trailers(event)
            elif isinstance(event, Malformed):
                self._on_malformed(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self._peer_gone = True
                if not self.streams:
                    self._close_now()
                    return
        self.flush()
        if self.write_paused and self.transport.get_write_buffer_size() > _FLOOD_BUFFER:
            # The client sends frames that need an answer and reads none of them.
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, "control_flood")
            self._close_now()

    def _flood(self, control: bool) -> bool:
        """Count a client reset or control frame in this second; past the cap, end the connection."""
        now = self.loop.time()
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._resets = self._control = 0
        if control:
            self._control += 1
            over = self._control > self.max_control
            reason = "control_flood"
        else:
            self._resets += 1
            over = self._resets > self.max_resets
            reason = "rapid_reset"
        if over:
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, reason)
            self._close_now()
        return over

    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self._goaway_sent or self._peer_gone or len(self.streams) >= self.max_concurrent_streams:
            self._reset(sid, ErrorCodes.REFUSED_STREAM, "refused")
            return
        ended = event.stream_ended is not None
        scope = self._scope(event.headers, ended)
        if scope is None:
            self._reset(sid, ErrorCodes.PROTOCOL_ERROR, "malformed")
            return
        self._last_stream = sid
        self._served += 1
        if not isinstance(scope, str) and self.limit_concurrency is not None:
            if len(self.connections) >= self.limit_concurrency:
                scope = "connection_limit"
        stream = _Stream(self, sid, scope if not isinstance(scope, str) else _REFUSED_SCOPE, ended)
        self.streams[sid] = stream
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(scope, str):
            self._answer(stream, scope)
        else:
            task = stream.task = self.loop.create_task(self._run(stream))
            self.tasks.add(task)
        if self._served >= self.max_requests:
            self._goaway(ErrorCodes.NO_ERROR, "max_requests")

    def _scope(self, headers, ended: bool):
        """The ASGI scope of a request head; None when malformed, or a local reason to answer with."""
        method = path = authority = host = scheme = None
        fields: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] | None = None
        regular = False
        length = None
        count = 0
        size = 0  # RFC 9113 6.5.2: the header list's size, 32 bytes per field besides its name and value
        underscores = self.underscores
        for name, value in headers:
            size += len(name) + len(value) + 32
            if value and (
                value[0] in _EDGE or value[-1] in _EDGE or 0 in value or 10 in value or 13 in value
            ):
                return None  # NUL, LF, CR anywhere, or space or tab at either end (RFC 9113 8.2.1)
            if name[:1] == b":":
                if regular or name not in _REQUEST_PSEUDO:
                    return None
                if name == b":method":
                    if method is not None:
                        return None
                    method = value
                elif name == b":path":
                    if path is not None:
                        return None
                    path = value
                elif name == b":authority":
                    if authority is not None:
                        return None
                    authority = value
                else:
                    if scheme is not None:
                        return None
                    scheme = value
                continue
            regular = True
            if not name or name.translate(None, _NAME_CHARS) or name in _CONNECTION_SPECIFIC:
                return None
            count += 1
            if name == b"te":
                if value != b"trailers":
                    return None
            elif name == b"host":
                if host is not None:
                    return None
                host = value
                continue
            elif name == b"cookie":
                if cookies is None:
                    cookies = [value]
                else:
                    cookies.append(value)
                continue
            elif name == b"content-length":
                length = value
            elif _UNDERSCORE in name and underscores:
                if underscores == 2:
                    return "underscore_header"
                continue
            fields.append((name, value))
        if method is None:
            return None
        if method == b"CONNECT":
            return "bad_request"  # Fender is no tunnel (HTTP/1.1 CONNECT gets the same 400)
        if scheme is None or not path:
            return None
        if authority is not None:
            if host is not None and host != authority:
                return None
            host = authority
        if count > self.max_header_count or size > self.max_header_list_size:
            return "header_too_large"
        if host is not None:
            fields.insert(0, (b"host", host))
        if cookies is not None:
            fields.append((b"cookie", b"; ".join(cookies)))
        if length is None:
            if not ended:
                # A body of unknown length: what an HTTP/1.1 upstream receives (and what the data
                # plane reads as "a body follows").
                fields.append((b"transfer-encoding", b"chunked"))
        elif ended and length != b"0" and method != b"HEAD":
            return None
        if path[:1] == b"/":
            raw_path, _, query = path.partition(b"?")
            raw_path = raw_path.partition(b"#")[0]
        elif path == b"*" and method == b"OPTIONS":
            raw_path, query = b"*", b""
        else:
            return None
        decoded = raw_path.decode("latin-1")
        if "%" in decoded:
            decoded = unquote(decoded)
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "2",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": "",
            "method": _METHODS.get(method) or method.decode("latin-1"),
            "path": decoded,
            "raw_path": raw_path,
            "query_string": query,
            "headers": fields,
            "extensions": EXTENSIONS,
        }

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        size = event.flow_controlled_length
        if stream is None or stream.complete or stream.disconnected:
            if size:
                try:
                    self.h2.acknowledge_received_data(size, sid)  # nobody reads it: hand the window back
                except ProtocolError:
                    pass
            return
        if event.data:
            stream.body.append(event.data)
        stream.unacked += size
        if event.stream_ended is not None:
            stream.more_body = False
        stream.wake()

    def _on_trailers(self, event: TrailersReceived) -> None:
        """Request trailers (a HEADERS frame ending the stream after its DATA): checked as a head is
        (RFC 9113 8.1: no pseudo-header field; 8.2), held for the last body message; the fields RFC
        9110 6.5.1 keeps out of trailers are dropped. Malformed or over max_header_list_size: reset."""
        sid = event.stream_id
        stream = self.streams.get(sid)
        if stream is None or stream.complete or stream.disconnected:
            return
        kept: list[tuple[bytes, bytes]] = []
        size = 0
        for name, value in event.headers:
            size += len(name) + len(value) + 32
            if (
                not name
                or name[:1] == b":"
                or name.translate(None, _NAME_CHARS)
                or name in _CONNECTION_SPECIFIC
                or (
                    value
                    and (value[0] in _EDGE or value[-1] in _EDGE or 0 in value or 10 in value or 13 in value)
                )
            ):
                self._reset(sid, ErrorCodes.PROTOCOL_ERROR, "malformed")
                return
            if name not in NOT_TRAILERS and name not in PROXY_TRAILERS and name[:7] != b"fender-":
                kept.append((name, value))
        if size > self.max_header_list_size:
            self._reset(sid, ErrorCodes.PROTOCOL_ERROR, "malformed")
            return
        if kept:
            stream.trailers = kept

    def _on_malformed(self, sid: int) -> None:
        """h2 reset a stream it found malformed (the RST_STREAM is already queued)."""
        self._count_reset("malformed")
        stream = self.streams.get(sid)
        if stream is not None:
            stream.complete = True
            stream.disconnected = True  # the application sees the client gone: nothing more forwarded
            stream.wake()
            if stream.task is None:
                self._forget(stream)

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if not event.remote_reset:
            return
        self._count_reset("client_reset")
        if stream is not None:
            stream.disconnected = True
            stream.wake()
            if stream.task is None:
                self._forget(stream)
        self._flood(control=False)

    def _on_window(self, sid: int) -> None:
        if sid == 0:
            for stream in list(self.streams.values()):
                if stream.window_waiter is not None:
                    stream.wake()
        else:
            one = self.streams.get(sid)
            if one is not None and one.window_waiter is not None:
                one.wake()

    def ack(self, sid: int, size: int) -> None:
        """The application read ``size`` flow-controlled bytes of a stream: open the windows again."""
        if self._closing:
            return
        try:
            self.h2.acknowledge_received_data(size, sid)
        except (ProtocolError, StreamClosedError):
            return
        self.flush_soon()

    # -- running the application

    async def _run(self, stream: _Stream) -> None:
        try:
            await self.app(stream.scope, stream.receive, stream.send)
        except BaseException as exc:  # the connection must go on whatever one stream did
            if not isinstance(exc, asyncio.CancelledError):
                # (quiet_aborts() filters the expected ResponseAborted out of this logger)
                log.error("Exception in ASGI application", exc_info=exc)
            if not stream.complete:
                if not stream.started and not stream.disconnected:
                    self._answer(stream, "internal")
                else:
                    self._reset(stream.sid, ErrorCodes.INTERNAL_ERROR, "aborted")
            if not isinstance(exc, Exception):
                raise
        else:
            if not stream.complete and not stream.disconnected:
                log.error("ASGI callable returned without completing response.")
                self._reset(stream.sid, ErrorCodes.INTERNAL_ERROR, "aborted")
        finally:
            self.tasks.discard(stream.task)
            stream.task = None
            if stream.complete or stream.disconnected:
                self._forget(stream)

    _ANSWERS = {
        "bad_request": (400, b"malformed request"),
        "underscore_header": (400, b"header names with underscores are refused"),
        "header_too_large": (431, b"request head too large"),
        "connection_limit": (503, b"too many client connections (server.max_connections)"),
        "internal": (500, b"Internal Server Error"),
    }

    def _answer(self, stream: _Stream, reason: str) -> None:
        """A local answer on a stream, for what the protocol refuses itself (as HTTP/1.1's 4xx)."""
        status, text = self._ANSWERS[reason]
        body = b"fender: %s\n" % text
        headers = [
            (b":status", _STATUS[status]),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        if reason != "internal":
            headers.append((b"x-fender-error", b"header_too_large" if status == 431 else reason.encode()))
            counter = self.rejected.get(reason)
            if counter is not None:
                counter.inc()
        try:
            self.h2.send_headers(stream.sid, headers)
            window = self.h2.local_flow_control_window(stream.sid)
            if window >= len(body) and stream.scope["method"] != "HEAD":
                self.h2.send_data(stream.sid, body, end_stream=True)
            else:
                self.h2.end_stream(stream.sid)
        except (ProtocolError, StreamClosedError):
            pass
        stream.started = True
        stream._done()

    def stream_complete(self, stream: _Stream) -> None:
        """The response ended (END_STREAM went out)."""
        if stream.more_body and not self._closing:
            # Answered before the request body ended (413...): tell the client to stop sending.
            try:
                self.h2.reset_stream(stream.sid, ErrorCodes.NO_ERROR)
            except (ProtocolError, StreamClosedError):
                pass
            if stream.unacked:
                self.ack(stream.sid, stream.unacked)
                stream.unacked = 0
        stream.wake()
        if stream.task is None:
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        if self.streams.pop(stream.sid, None) is None:
            return
        if stream.unacked and not self._closing:
            try:
                self.h2.acknowledge_received_data(stream.unacked, stream.sid)
            except (ProtocolError, StreamClosedError):
                pass
            stream.unacked = 0
        if not self.streams:
            if self._goaway_sent or self._peer_gone:
                self.flush()
                self._close_now()
                return
            self._idle_since = self.loop.time()
            self._arm()

    def _reset(self, sid: int, code: ErrorCodes, reason: str) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            stream.complete = True
            stream.disconnected = True
            stream.wake()
        self._count_reset(reason)
        if self._closing:
            return
        try:
            self.h2.reset_stream(sid, code)
        except (ProtocolError, StreamClosedError):
            pass
        self.flush_soon()
        if stream is not None and stream.task is None:
            self._forget(stream)

    # -- writing

    def send_headers(self, sid: int, headers, end: bool) -> None:
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except (ProtocolError, StreamClosedError):
            return
        self.flush_soon()

    def end_stream(self, sid: int) -> None:
        try:
            self.h2.end_stream(sid)
        except (ProtocolError, StreamClosedError):
            return
        self.flush_soon()

    def flush_soon(self) -> None:
        """Write h2's output at the end of this loop turn: the frames of every stream in one write."""
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        handle = self._flush_handle
        if handle is not None:
            self._flush_handle = None
            handle.cancel()
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    async def wait_window(self, stream: _Stream) -> None:
        """Wait until the client opens the stream's (or the connection's) window; cut at send_timeout."""
        self.flush()
        waiter = stream.window_waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(self.send_timeout):
                await waiter
        except TimeoutError:
            if self.h2.outbound_flow_control_window <= 0:
                # The connection's window stayed shut: every stream is stalled; end it.
                self._goaway(ErrorCodes.NO_ERROR, "flow_control_stall")
                self._close_now()
            else:
                self._reset(stream.sid, ErrorCodes.CANCEL, "flow_control_stall")
            stream.disconnected = True
        finally:
            stream.window_waiter = None

    # -- GOAWAY and closing

    def _goaway(self, code: ErrorCodes, reason: str) -> None:
        """GOAWAY with the last stream id accepted; the streams in flight go on (unless closing).

        Written as a frame of its own rather than through h2, whose connection accepts no
        more frames once it sent GOAWAY: the in-flight streams still receive their bodies.
        """
        if self._closing:
            return
        self._count_goaway(reason)
        self._goaway_sent = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream
        frame.error_code = code
        self.flush()
        if not self.transport.is_closing():
            self.transport.write(frame.serialize())

    def _count_reset(self, reason: str) -> None:
        counter = self.reset_counter.get(reason)
        if counter is not None:
            counter.inc()

    def _count_goaway(self, reason: str) -> None:
        counter = self.goaway_counter.get(reason)
        if counter is not None:
            counter.inc()

    def _close_now(self) -> None:
        """Write what h2 has (its own GOAWAY after a protocol error) and close; streams are cut."""
        if self._closing:
            return
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
        self._closing = True
        for stream in list(self.streams.values()):
            stream.disconnected = True
            stream.wake()
        self.transport.close()

    def shutdown(self) -> None:
        """Called by uvicorn's Server to begin a graceful shutdown: GOAWAY, finish the streams, close."""
        if not self._goaway_sent:
            self._goaway(ErrorCodes.NO_ERROR, "drain")
        if not self.streams:
            self._close_now()

    # -- the idle timer

    def _arm(self) -> None:
        if self._timer is None and not self._closing:
            self._timer = self.loop.call_at(self._idle_since + self.keepalive_timeout, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closing or self.streams:
            return
        if self.loop.time() >= self._idle_since + self.keepalive_timeout:
            self._goaway(ErrorCodes.NO_ERROR, "idle")
            self._close_now()
        else:
            self._arm()

    # -- connection events and transport flow control

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._closing = True
        for timer in (self._timer, self._send_timer, self._flush_handle):
            if timer is not None:
                timer.cancel()
        self._timer = self._send_timer = self._flush_handle = None
        for stream in list(self.streams.values()):
            stream.disconnected = True
            stream.wake()
        self.write_paused = False
        self._wake_drain()

    def eof_received(self) -> bool | None:
        return None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self._count_goaway("flow_control_stall")
        self._closing = True
        self.transport.abort()


def take_over(protocol, data: bytes, mode: str) -> FenderH2Protocol:
    """Switch an HTTP/1.1 connection (``FenderHttpProtocol``, nothing served on it) to HTTP/2.

    ``data``: the bytes after those its parser consumed, preceded by the preface
    (prior knowledge) or empty (ALPN). One call for each way in, so TLS's ALPN
    ``h2`` selects this protocol with the same line.
    """
    transport = protocol.transport
    h2 = protocol.h2_protocol(
        protocol.app,
        protocol.loop,
        protocol.connections,
        protocol.tasks,
        protocol.server,
        protocol.client,
        protocol.scheme,
        protocol.limit_concurrency,
    )
    protocol.connections.discard(protocol)
    protocol.handed_over()
    transport.set_protocol(h2)
    h2.start(transport, data, mode)
    return h2
