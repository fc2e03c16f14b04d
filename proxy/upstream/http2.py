"""HTTP/2 upstream client (``upstreams.X.protocol: h2``): multiplexed streams over few connections.

:class:`H2Pool` keeps the :class:`~proxy.upstream.pool.UpstreamPool` contract (``request(...)``
returns once the final response head arrived; the body is pulled with ``read()``; faults are
:class:`~proxy.upstream.errors.UpstreamError` with ``reason`` and ``request_sent``), so every
policy layer works unchanged whatever the replica speaks. The HTTP/2 state machine is the ``h2``
package; this module owns sockets, timers, flow control and the pool.

* One connection per replica carries up to ``max_concurrent_streams`` streams (the lower of the
  pool's setting and the replica's SETTINGS_MAX_CONCURRENT_STREAMS); another connection opens only
  when every open one is full, up to ``max_connections``; beyond that requests wait (``max_pending``,
  bounded by ``connect_timeout`` like the HTTP/1.1 pool).
* GOAWAY: the connection takes no new stream; streams above its last stream id were not processed,
  so the pool sends them again on another connection when their body can be replayed (else they
  fail with ``request_sent`` False); streams at or below it finish.
* RST_STREAM from the replica fails that stream only (reason ``stream_reset``); REFUSED_STREAM means
  nothing was processed (``request_sent`` False, safe to retry).
* Flow control both ways with bounded buffers: received body bytes are acknowledged to the replica
  only when the caller reads them, so an unread stream holds at most its window
  (:data:`STREAM_WINDOW`); request bodies are sent as the replica's windows allow.
* Translation from the HTTP/1.1 shape the data path uses: ``host`` becomes ``:authority``,
  connection-specific fields are dropped (RFC 9113 8.2.2), ``te`` passes only as ``trailers``.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.exceptions import InvalidBodyLengthError, ProtocolError
from h2.settings import SettingCodes
from h2.stream import H2Stream
from hyperframe.frame import DataFrame

from .dial import tcp_connect
from .errors import (
    ALPNMismatch,
    BadResponse,
    ConnectFailure,
    ConnectTimeout,
    PoolOverflow,
    RequestBodyError,
    ResetBeforeHeaders,
    ResetMidBody,
    UpstreamError,
    UpstreamTimeout,
    os_words,
)
from .tls import ClientTLS, selected_alpn, tls_connect_fault

# Receive window of each stream: the most unread response body one stream may hold.
STREAM_WINDOW = 256 * 1024
# Receive window of a connection (all its streams together).
CONNECTION_WINDOW = 16 * 1024 * 1024
# Fields that are connection-specific in HTTP/1.1 and never sent over HTTP/2 (RFC 9113 8.2.2);
# host becomes :authority.
_DROP = frozenset(
    {
        b"host",
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"content-length",
    }
)
_LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"
# How often one request is moved to a fresh connection after GOAWAYs before it fails.
_MAX_GOAWAY_RESENDS = 2


class MalformedStream(ProtocolError):
    """h2 found a stream malformed (RFC 9113 8.1.1: content-length contradicted by DATA, an invalid
    content-length): a stream error, which h2 alone would make a connection error."""

    def __init__(self, stream_id: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id


class Malformed:
    """The event for a stream reset because h2 found it malformed (see MalformedStream)."""

    __slots__ = ("stream_id", "message")

    def __init__(self, stream_id: int, message: str = "") -> None:
        self.stream_id = stream_id
        self.message = message


class CheckedStream(H2Stream):
    """h2's stream, with its content-length checks raising MalformedStream (a stream error); both directions use it."""

    def _initialize_content_length(self, headers) -> None:
        try:
            super()._initialize_content_length(headers)
        except ProtocolError as exc:
            raise MalformedStream(self.stream_id, str(exc)) from None

    def _track_content_length(self, length: int, end_stream: bool) -> None:
        try:
            super()._track_content_length(length, end_stream)
        except InvalidBodyLengthError as exc:
            raise MalformedStream(self.stream_id, str(exc)) from None

    def receive_headers(self, headers, end_stream, header_encoding):
        # Trailers end the stream too: the body must have reached its content-length (h2 checks
        # only an END_STREAM on DATA).
        expected = self._expected_content_length
        actual = self._actual_content_length
        frames, events = super().receive_headers(headers, end_stream, header_encoding)
        if expected is not None and actual != expected and isinstance(events[0], h2.events.TrailersReceived):
            raise MalformedStream(
                self.stream_id, f"body of {actual} bytes ended by trailers, content-length {expected}"
            )
        return frames, events


class StreamErrorConnection(h2.connection.H2Connection):
    """h2's connection, with a malformed stream (content-length contradicted by DATA, an invalid
    content-length) a stream error: RFC 9113 8.1.1 makes it PROTOCOL_ERROR on that stream, and the
    other streams go on (HPACK state is intact: the block was decoded). Both directions use it."""

    def _begin_new_stream(self, stream_id, allowed_ids):
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = CheckedStream  # same state, its content-length faults a stream error
        return stream

    def _receive_frame(self, frame):
        try:
            return super()._receive_frame(frame)
        except MalformedStream as exc:
            sid = exc.stream_id
            self.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            if isinstance(frame, DataFrame) and frame.flow_controlled_length:
                # Nobody reads these bytes: the connection window they took is handed back.
                self.acknowledge_received_data(frame.flow_controlled_length, sid)
            return [Malformed(sid, str(exc))]


class _ClientConnection(StreamErrorConnection):
    """h2's state machine, except that a GOAWAY leaves the connection open for the streams at or
    below its last stream id (RFC 9113 6.8: they may still complete); h2 alone refuses every frame after it."""

    def _receive_goaway_frame(self, frame):
        state = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        if state == h2.connection.ConnectionState.CLIENT_OPEN:
            self.state_machine.state = state
        return frames, events


class StreamReset(UpstreamError):
    """The replica reset the stream (RST_STREAM). REFUSED_STREAM: nothing was processed."""

    reason = "stream_reset"


def alpn_protocols(protocol: str) -> tuple[str, ...]:
    """ALPN offer to an ``https://`` replica: ``h2`` offers h2 only, ``auto`` h2 then http/1.1,
    ``http1`` http/1.1 only (on cleartext ``h2`` is prior knowledge and ``auto`` is HTTP/1.1)."""
    if protocol == "h2":
        return ("h2",)
    if protocol == "auto":
        return ("h2", "http/1.1")
    return ("http/1.1",)


class H2Response:
    """One stream's response; the same surface as :class:`~proxy.upstream.connection.UpstreamResponse`."""

    __slots__ = (
        "status",
        "headers",
        "trailers",
        "complete",
        "buffered_peak",
        "stream_id",
        "_conn",
        "_head_only",
        "_head_done",
        "_no_body",
        "_chunks",
        "_size",
        "_unacked",
        "_waiter",
        "_head_fut",
        "_exc",
        "_idle_timeout",
        "_hooks",
        "_window_fut",
        "_ended_remote",
        "_ended_local",
        "_timer",
        "_upload",
        "_upload_exc",
    )

    http_version = "2"
    keep_alive = True
    upgrade = False
    upgraded_end = None

    def __init__(self, head_only: bool, idle_timeout: float | None, hooks=None) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.complete = False
        self.buffered_peak = 0
        self.stream_id = 0
        self._conn: H2Conn | None = None
        self._head_only = head_only
        self._head_done = False
        self._no_body = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._unacked = 0  # flow-controlled bytes received and not yet acknowledged (read)
        self._waiter: asyncio.Future | None = None
        self._head_fut: asyncio.Future | None = None
        self._exc: UpstreamError | None = None
        self._idle_timeout = idle_timeout
        self._hooks = hooks
        self._window_fut: asyncio.Future | None = None
        self._ended_remote = False
        self._ended_local = False
        self._timer: asyncio.TimerHandle | None = None
        self._upload: asyncio.Task | None = None  # the task sending a streamed request body
        self._upload_exc: BaseException | None = None  # how that upload failed (downstream side)

    def __repr__(self) -> str:
        return f"<H2Response {self.status} stream={self.stream_id} complete={self.complete}>"

    def has_body(self) -> bool:
        return not self._no_body

    @property
    def buffered(self) -> int:
        return self._size

    async def read(self) -> bytes:
        """Next body chunk (everything buffered, joined); ``b""`` once the body is complete."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._size = 0
                self._ack()
                return data
            if self._exc is not None:
                raise self._exc
            if self.complete:
                return b""
            await self._wait_body()

    def _ack(self) -> None:
        """Give the window of what was read back to the replica."""
        unacked = self._unacked
        if unacked:
            self._unacked = 0
            conn = self._conn
            if conn is not None:
                conn.acknowledge(unacked, self.stream_id)

    def close(self) -> None:
        """Abandon the response: a stream still open is reset (CANCEL); its window is given back."""
        conn = self._conn
        self._chunks = []
        self._size = 0
        upload = self._upload
        if upload is not None and not upload.done():
            upload.cancel()
        if conn is not None:
            self._ack()
            conn.cancel_stream(self, ResetMidBody("response closed before the body was read"))

    async def __aenter__(self) -> H2Response:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def _wait_body(self) -> None:
        conn = self._conn
        assert conn is not None
        loop = conn.loop
        fut = self._waiter = loop.create_future()
        timer = None
        if self._idle_timeout is not None:
            timer = loop.call_later(
                self._idle_timeout, conn.stream_timeout, self, fut, "no body bytes within idle_timeout"
            )
        try:
            await fut
        except BaseException:
            self.close()
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        for fut in (self._head_fut, self._waiter, self._window_fut):
            if fut is not None and not fut.done():
                fut.set_result(None)


class H2Conn(asyncio.Protocol):
    """One HTTP/2 connection to a replica, carrying many streams."""

    def __init__(self, pool: H2Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = _ClientConnection(config=config)
        self.streams: dict[int, H2Response] = {}
        self.reserved = 0  # streams counted against the limit: open plus being opened
        self.closed = False
        self.going_away = False  # GOAWAY received (or sent): no new stream
        self.idle_since = loop.time()
        self.alpn_refused = ""  # over TLS: what the replica chose by ALPN when it was not h2
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._idle_timer: asyncio.TimerHandle | None = None
        # Set once the replica's first SETTINGS arrived: its stream limit is known before we count on it.
        self.settings_seen = loop.create_future()

    # -- capacity --------------------------------------------------------------------

    def limit(self) -> int:
        remote = self.h2.remote_settings.max_concurrent_streams
        return min(self.pool.max_concurrent_streams, remote)

    def has_room(self) -> bool:
        return not self.closed and not self.going_away and self.reserved < self.limit()

    # -- streams ----------------------------------------------------------------------

    def open_stream(self, resp: H2Response, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """Send the request head on a new stream (a slot was reserved by the pool)."""
        h2c = self.h2
        stream_id = h2c.get_next_available_stream_id()
        h2c.send_headers(stream_id, headers, end_stream=end_stream)
        resp.stream_id = stream_id
        resp._conn = self
        resp._ended_local = end_stream
        self.streams[stream_id] = resp
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def acknowledge(self, size: int, stream_id: int) -> None:
        if self.closed:
            return
        self.h2.acknowledge_received_data(size, stream_id)
        self.flush()

    def _finish(self, resp: H2Response) -> None:
        """The stream is over for us (ended both ways, reset or abandoned): free its slot."""
        if self.streams.pop(resp.stream_id, None) is None:
            return
        unacked = resp._unacked
        if unacked and not self.closed:
            # The stream is closed: what it holds unread no longer counts against the connection's
            # window (the response keeps it, bounded by the stream window it arrived in).
            resp._unacked = 0
            try:
                self.h2.acknowledge_received_data(unacked, resp.stream_id)
            except h2.exceptions.H2Error:
                pass
            self.flush()
        resp._conn = None
        if resp._timer is not None:
            resp._timer.cancel()
            resp._timer = None
        self.reserved -= 1
        self.pool.stream_done(self)

    def release_reservation(self) -> None:
        """A reserved slot was not used (the request failed before its head was sent)."""
        self.reserved -= 1
        self.pool.stream_done(self)

    def fail_stream(self, resp: H2Response, exc: UpstreamError, code: int | None) -> None:
        """Fault of one stream: record it, reset the stream if ``code`` is given, free the slot."""
        if resp._exc is None and not (resp.complete and resp._head_done):
            resp._exc = exc
        upload = resp._upload
        if upload is not None and not upload.done():
            upload.cancel()  # nobody takes the rest of the request body
        if code is not None and not self.closed and resp.stream_id in self.streams:
            try:
                self.h2.reset_stream(resp.stream_id, code)
            except h2.exceptions.H2Error:
                pass
            self.flush()
        # Window of bytes nobody will read: given back so the connection does not shrink.
        unacked = resp._unacked
        if unacked and not self.closed:
            resp._unacked = 0
            try:
                self.h2.acknowledge_received_data(unacked, resp.stream_id)
            except h2.exceptions.H2Error:
                pass
            self.flush()
        resp._wake()
        self._finish(resp)

    def cancel_stream(self, resp: H2Response, exc: UpstreamError) -> None:
        if resp.stream_id in self.streams:
            if resp.complete and resp._ended_local:
                self._finish(resp)
            else:
                self.fail_stream(resp, exc, ErrorCodes.CANCEL)

    def stream_timeout(self, resp: H2Response, fut: asyncio.Future | None, message: str) -> None:
        if fut is None:
            resp._timer = None
            if resp._head_done:
                return  # the head timer, after the head arrived during the upload
            self.fail_stream(resp, UpstreamTimeout(message), ErrorCodes.CANCEL)
        elif not fut.done():
            self.fail_stream(resp, UpstreamTimeout(message), ErrorCodes.CANCEL)

    async def send_body(
        self,
        resp: H2Response,
        body: bytes,
        body_stream: Callable[[], Awaitable[bytes]] | None,
        content_length: int | None,
        idle_timeout: float | None,
    ) -> float:
        """Send the request body as the windows allow; returns the seconds spent waiting for
        ``body_stream`` (the downstream). Stops early when the stream ended or faulted."""
        now = self.loop.time
        waited = 0.0
        if body_stream is None:
            await self._send_data(resp, body, idle_timeout)
        else:
            remaining = content_length
            while True:
                started = now()
                chunk = await body_stream()
                waited += now() - started
                if resp._conn is not self or resp._ended_remote:
                    return waited
                if not chunk:
                    if remaining:
                        raise RequestBodyError(
                            f"request body ended {remaining} bytes short of content_length"
                        )
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                    if remaining < 0:
                        raise RequestBodyError("request body longer than content_length")
                await self._send_data(resp, chunk, idle_timeout)
                if resp._conn is not self:
                    return waited
        if resp._conn is self and not resp._ended_local:
            resp._ended_local = True
            trailers = None if body_stream is None else getattr(body_stream, "trailers", None)
            try:
                if trailers:
                    # The request's trailer fields (checked by the listener): a HEADERS frame ends the stream.
                    self.h2.send_headers(resp.stream_id, trailers, end_stream=True)
                else:
                    self.h2.end_stream(resp.stream_id)
            except h2.exceptions.StreamClosedError:
                return waited
            self.flush()
            if resp.complete:
                self._finish(resp)
        return waited

    async def _send_data(self, resp: H2Response, data: bytes, stall_timeout: float | None) -> None:
        h2c = self.h2
        view = memoryview(data)
        while view:
            if resp._conn is not self or resp._ended_remote:
                return  # reset, or the replica answered in full: nothing more to send
            try:
                window = h2c.local_flow_control_window(resp.stream_id)
            except h2.exceptions.StreamClosedError:
                return
            size = min(window, h2c.max_outbound_frame_size, len(view))
            if size <= 0:
                await self._wait_window(resp, stall_timeout)
                continue
            h2c.send_data(resp.stream_id, view[:size].tobytes())
            view = view[size:]
            self.flush()
            if self._write_paused:
                await self._drain(resp, stall_timeout)

    async def _wait_window(self, resp: H2Response, stall_timeout: float | None) -> None:
        fut = resp._window_fut = self.loop.create_future()
        timer = None
        if stall_timeout is not None:
            timer = self.loop.call_later(
                stall_timeout, self.stream_timeout, resp, fut, "upstream stopped reading the request body"
            )
        try:
            await fut
        finally:
            resp._window_fut = None
            if timer is not None:
                timer.cancel()

    async def _drain(self, resp: H2Response, stall_timeout: float | None) -> None:
        fut = self.loop.create_future()
        self._drain_waiters.append(fut)
        timer = None
        if stall_timeout is not None:
            timer = self.loop.call_later(
                stall_timeout, self.stream_timeout, resp, fut, "upstream stopped reading the request body"
            )
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()

    # -- idle ------------------------------------------------------------------------

    def arm_idle(self, timeout: float) -> None:
        self.idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(timeout, self._idle_tick, timeout)

    def _idle_tick(self, timeout: float) -> None:
        self._idle_timer = None
        if self.closed or self.reserved:
            return
        left = self.idle_since + timeout - self.loop.time()
        if left > 0.001:
            self._idle_timer = self.loop.call_later(left, self._idle_tick, timeout)
            return
        self.goaway_and_close()

    def goaway_and_close(self) -> None:
        """Close an idle connection politely: GOAWAY, then FIN."""
        if self.closed:
            return
        self.going_away = True
        try:
            self.h2.close_connection()
            self.flush()
        except h2.exceptions.H2Error:
            pass
        self.close()

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self._lost(None)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            sock = self.transport.get_extra_info("socket") if self.transport is not None else None
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                except OSError:
                    pass
            if self.transport is not None:
                self.transport.abort()
            self._lost(None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        if self.pool.tls is not None:
            chosen = selected_alpn(transport)
            if chosen != "h2":
                # Not HTTP/2 by ALPN: not a byte of HTTP/2 to it; the connect raises ALPNMismatch.
                self.alpn_refused = chosen or "none"
                self.closed = True
                transport.close()
                return
        h2c = self.h2
        h2c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.pool.max_response_head,
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            },
        )
        h2c.decoder.max_header_list_size = self.pool.max_response_head
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
            if self.closed:
                return
        self.flush()

    def _protocol_error(self, exc: Exception) -> None:
        """The replica broke HTTP/2: GOAWAY if we can, and every stream fails with bad_response."""
        try:
            self.flush()  # h2 queued a GOAWAY for most protocol errors
        except Exception:
            pass
        self._fail_all(lambda resp: BadResponse(f"HTTP/2 protocol error from the upstream: {exc}"))
        self.abort()

    # event handlers

    def _on_response(self, event) -> None:
        resp = self.streams.get(event.stream_id)
        if resp is None:
            return
        status = 0
        headers = []
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value) if value.isdigit() else 0
                continue
            headers.append((name, value))
        if status < 200 or status > 999:
            self.fail_stream(resp, BadResponse(f"bad :status {status}"), ErrorCodes.PROTOCOL_ERROR)
            return
        resp.status = status
        resp.headers = headers
        resp._head_done = True
        if resp._head_only or status == 204 or status == 304 or event.stream_ended is not None:
            resp._no_body = True
        resp._wake()

    def _on_interim(self, event) -> None:
        resp = self.streams.get(event.stream_id)
        if resp is None or resp._hooks is None:
            return
        status = 0
        headers = []
        for name, value in event.headers:
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif name[:1] != b":":
                headers.append((name, value))
        if 100 < status < 200 and status != 101:
            resp._hooks.relay_interim(status, headers)

    def _on_data(self, event) -> None:
        resp = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        if resp is None or resp._exc is not None:
            if size:
                self.h2.acknowledge_received_data(size, event.stream_id)
            return
        resp._unacked += size
        data = event.data
        if data:
            if resp._no_body:
                resp._unacked -= size
                self.h2.acknowledge_received_data(size, event.stream_id)
            else:
                resp._chunks.append(data)
                resp._size += len(data)
                if resp._size > resp.buffered_peak:
                    resp.buffered_peak = resp._size
        elif size:
            resp._unacked -= size
            self.h2.acknowledge_received_data(size, event.stream_id)
        fut = resp._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_malformed(self, event: Malformed) -> None:
        """The replica's response broke its content-length (RST_STREAM PROTOCOL_ERROR already queued)."""
        resp = self.streams.get(event.stream_id)
        if resp is None:
            return
        resp._ended_remote = True
        self.fail_stream(resp, BadResponse(f"malformed HTTP/2 response: {event.message}"), None)

    def _on_trailers(self, event) -> None:
        resp = self.streams.get(event.stream_id)
        if resp is None:
            return
        resp.trailers = [(n, v) for n, v in event.headers if n[:1] != b":"]

    def _on_ended(self, event) -> None:
        resp = self.streams.get(event.stream_id)
        if resp is None:
            return
        resp._ended_remote = True
        resp.complete = True
        if not resp._head_done:
            self.fail_stream(resp, BadResponse("stream ended without a response head"), None)
            return
        resp._wake()
        if resp._ended_local:
            self._finish(resp)
            return
        # A full answer while the request body is still going: stop sending it (RFC 9113 8.1).
        upload = resp._upload
        if upload is not None and not upload.done():
            upload.cancel()
        resp._ended_local = True
        self.fail_stream(resp, ResetMidBody("answered before the request body ended"), ErrorCodes.NO_ERROR)

    def _on_reset(self, event) -> None:
        resp = self.streams.get(event.stream_id)
        if resp is None:
            return
        code = event.error_code
        resp._ended_remote = True
        if resp.complete and resp._head_done:
            # A full answer then RST_STREAM (NO_ERROR): stop uploading, keep the answer (RFC 9113 8.1).
            self._finish(resp)
            resp._wake()
            return
        name = _code_name(code)
        if code == ErrorCodes.REFUSED_STREAM:
            exc: UpstreamError = StreamReset(
                "the upstream refused the stream (REFUSED_STREAM): nothing was processed",
                request_sent=False,
                cause="stream refused",
            )
        else:
            where = "mid-body" if resp._head_done else "before the response head"
            exc = StreamReset(
                f"the upstream reset the stream {where} ({name})", cause=f"stream reset {name.lower()}"
            )
        self.fail_stream(resp, exc, None)

    def _on_window(self, event) -> None:
        if event.stream_id:
            resp = self.streams.get(event.stream_id)
            if resp is not None:
                fut = resp._window_fut
                if fut is not None and not fut.done():
                    fut.set_result(None)
            return
        for resp in list(self.streams.values()):
            fut = resp._window_fut
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _on_settings(self, event) -> None:
        if not self.settings_seen.done():
            self.settings_seen.set_result(None)
        # Window sizes may have grown (waiting uploads) and the stream limit changed (waiting requests).
        for resp in list(self.streams.values()):
            fut = resp._window_fut
            if fut is not None and not fut.done():
                fut.set_result(None)
        self.pool.stream_done(self)

    def _on_goaway(self, event) -> None:
        """GOAWAY: no new stream here; streams above the last id were never processed."""
        self.going_away = True
        self.pool.goaways += 1
        last = event.last_stream_id
        code = event.error_code
        for resp in [r for sid, r in self.streams.items() if sid > last]:
            resp._ended_remote = True
            self.fail_stream(
                resp,
                GoneAway(
                    f"GOAWAY ({_code_name(code)}) with last stream {last}: not processed", request_sent=False
                ),
                None,
            )
        self.pool.connection_gone(self)
        if not self.streams:
            self.close()

    def _fail_all(self, make: Callable[[H2Response], UpstreamError]) -> None:
        for resp in list(self.streams.values()):
            self.fail_stream(resp, make(resp), None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        if not self.settings_seen.done():
            self.settings_seen.set_result(None)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()
        words = os_words(exc)

        def fault(resp: H2Response) -> UpstreamError:
            if resp._head_done:
                return ResetMidBody(f"upstream closed mid-body: {exc or 'EOF'}", cause=words)
            return ResetBeforeHeaders(
                f"upstream closed before the response head: {exc or 'EOF'}", cause=words
            )

        self._fail_all(fault)
        self.pool.connection_gone(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class GoneAway(UpstreamError):
    """The stream was above the last stream id of the replica's GOAWAY: it was never processed."""

    reason = "reset"
    request_sent = False


_HANDLERS = {
    h2.events.ResponseReceived: H2Conn._on_response,
    h2.events.InformationalResponseReceived: H2Conn._on_interim,
    h2.events.DataReceived: H2Conn._on_data,
    h2.events.TrailersReceived: H2Conn._on_trailers,
    h2.events.StreamEnded: H2Conn._on_ended,
    h2.events.StreamReset: H2Conn._on_reset,
    h2.events.WindowUpdated: H2Conn._on_window,
    h2.events.RemoteSettingsChanged: H2Conn._on_settings,
    h2.events.ConnectionTerminated: H2Conn._on_goaway,
    Malformed: H2Conn._on_malformed,
}


def _upload_done(resp: H2Response, deadline: float | None, task: asyncio.Task) -> None:
    """A streamed upload ended: arm the head timer, or fail the stream if the body could not be had."""
    if task.cancelled():
        return
    exc = task.exception()
    conn = resp._conn
    if exc is None:
        if deadline is not None and conn is not None and not resp._head_done:
            # A slow downstream client is not the upstream's fault: its wait extends the deadline.
            resp._timer = conn.loop.call_at(
                deadline + task.result(),
                conn.stream_timeout,
                resp,
                None,
                "no response head within head_timeout",
            )
        return
    resp._upload_exc = exc
    if conn is not None:
        conn.fail_stream(resp, ResetMidBody(f"request body failed: {exc!r}"), ErrorCodes.CANCEL)
    resp._wake()


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a shared connect's failure as seen (its waiters may all have been cancelled)."""
    if not fut.cancelled():
        fut.exception()


def _code_name(code) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


def request_headers(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    content_length: int | None,
    scheme: bytes = b"http",
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 request head for the data path's HTTP/1.1-shaped one (Host -> :authority)."""
    authority = b""
    out = [(b":method", method), (b":scheme", scheme), (b":path", target)]
    rest = []
    for name, value in headers:
        if name in _DROP:
            if name == b"host":
                authority = value
            elif name == b"te" and value.lower().find(b"trailers") >= 0:
                rest.append((b"te", b"trailers"))
            continue
        rest.append((name.lower(), value))
    out.append((b":authority", authority))
    if content_length is not None:
        rest.append((b"content-length", b"%d" % content_length))
    out += rest
    return out


class H2Pool:
    """HTTP/2 client for one upstream replica: the :class:`UpstreamPool` contract over streams."""

    protocol = "h2"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 100,
        max_keepalive: int | None = None,
        connect_timeout: float = 1.0,
        keepalive_idle_timeout: float = 60.0,
        max_pending: int = 1000,
        max_response_head: int = 65536,
        unix_path: str | None = None,
        max_concurrent_streams: int = 100,
        tls: ClientTLS | None = None,
        resolve: Callable[[], Awaitable[Sequence[str]]] | None = None,
    ) -> None:
        self.host = host
        # An https:// replica: TLS with ALPN h2 (proxy/upstream/tls.py), sessions resumed as HTTP/1.1's.
        self.tls = tls
        self.tls_handshakes = 0
        self.tls_resumed = 0
        self.on_tls_handshake: Callable[[bool], None] | None = None
        self.resolve = resolve  # a host name's addresses (DNS name cache), for TLS connects
        self.port = port
        self.unix_path = unix_path
        if unix_path is not None:
            self.address = f"unix:{unix_path}"
        else:
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_connections = max_connections
        self.max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self.connect_timeout = connect_timeout
        self.keepalive_idle_timeout = keepalive_idle_timeout
        self.max_pending = max_pending
        self.max_response_head = max_response_head
        self.max_concurrent_streams = max_concurrent_streams
        self.connections_opened = 0
        self.goaways = 0  # GOAWAYs received (for tests and the admin view)
        self._conns: list[H2Conn] = []  # open connections that take new streams
        self._connecting: asyncio.Future | None = None
        self._waiters: deque[asyncio.Future] = deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<H2Pool {self.address} connections={len(self._conns)} streams={self.streams}>"

    @property
    def in_use(self) -> int:
        """Connections carrying at least one stream."""
        return sum(1 for c in self._conns if c.reserved)

    @property
    def idle(self) -> int:
        """Open connections carrying no stream."""
        return sum(1 for c in self._conns if not c.reserved)

    @property
    def pending(self) -> int:
        return len(self._waiters)

    @property
    def streams(self) -> int:
        """Streams open (or being opened) on every connection."""
        return sum(c.reserved for c in self._conns)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        body: bytes = b"",
        body_stream: Callable[[], Awaitable[bytes]] | None = None,
        content_length: int | None = None,
        head_timeout: float | None = None,
        idle_timeout: float | None = None,
        hooks=None,
    ) -> H2Response:
        """Send a request on a stream and return once the final response head arrived (see UpstreamPool)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if head_timeout is None else loop.time() + head_timeout
        if body_stream is None:
            length = len(body) if (body or method in (b"POST", b"PUT", b"PATCH")) else None
        else:
            length = content_length
        h2_headers = request_headers(
            method, target, headers, length, b"http" if self.tls is None else b"https"
        )
        resends = 0
        while True:
            resp = H2Response(method == b"HEAD", idle_timeout, hooks)
            conn = await self._reserve(deadline)
            end = body_stream is None and not body
            try:
                conn.open_stream(resp, h2_headers, end)
            except h2.exceptions.NoAvailableStreamIDError:
                # 2^31 streams used up on this connection: it takes no more, another one opens.
                conn.going_away = True
                self.connection_gone(conn)
                conn.release_reservation()  # closes it once its last stream is done
                continue
            except h2.exceptions.TooManyStreamsError:
                # The replica's limit dropped since we counted: nothing was sent, try elsewhere.
                conn.release_reservation()
                resends += 1
                if resends > _MAX_GOAWAY_RESENDS:
                    raise StreamReset("too many streams for the upstream", request_sent=False) from None
                continue
            except h2.exceptions.H2Error as exc:
                conn.release_reservation()
                raise BadResponse(f"cannot send the request over HTTP/2: {exc}", request_sent=False) from exc
            try:
                if body_stream is not None:
                    # Streamed body: sent by a task of its own, so the head (and, for a bidirectional
                    # stream, the response body) can come back while the client is still sending.
                    # The head timer starts when the upload ended, like HTTP/1.1's.
                    resp._upload = upload = loop.create_task(
                        conn.send_body(resp, b"", body_stream, content_length, idle_timeout)
                    )
                    upload.add_done_callback(functools.partial(_upload_done, resp, deadline))
                else:
                    if deadline is not None:
                        resp._timer = loop.call_at(
                            deadline, conn.stream_timeout, resp, None, "no response head within head_timeout"
                        )
                    if not end:
                        await conn.send_body(resp, body, None, None, idle_timeout)
                if not resp._head_done and resp._exc is None:
                    fut = resp._head_fut = loop.create_future()
                    try:
                        await fut
                    finally:
                        resp._head_fut = None
            except BaseException as exc:
                running = resp._upload
                if running is not None and not running.done():
                    running.cancel()
                if resp._conn is not None:
                    resp._conn.cancel_stream(resp, ResetBeforeHeaders(f"request abandoned: {exc!r}"))
                raise
            if resp._timer is not None and resp._head_done:
                resp._timer.cancel()
                resp._timer = None
            if resp._upload_exc is not None and not resp._head_done:
                raise resp._upload_exc  # the downstream's fault (body too large, client gone...)
            fault = resp._exc
            if resp._head_done or fault is None:
                return resp  # a fault after the head is raised by read(), after the bytes that came
            if isinstance(fault, GoneAway) and body_stream is None and resends < _MAX_GOAWAY_RESENDS:
                resends += 1  # never processed: send it again on a connection that takes streams
                continue
            raise fault

    async def _reserve(self, deadline: float | None) -> H2Conn:
        """A connection with room for one more stream (the slot is counted in ``reserved``)."""
        loop = self._loop
        assert loop is not None  # set by request()
        for _ in range(1000):
            if self._closed:
                raise ConnectFailure("pool closed")
            for conn in self._conns:
                if conn.has_room():
                    conn.reserved += 1
                    return conn
            connecting = self._connecting
            if connecting is not None:
                await asyncio.shield(connecting)
                continue
            if len(self._conns) < self.max_connections:
                self._connecting = connecting = asyncio.ensure_future(self._connect())
                connecting.add_done_callback(_retrieve)
                try:
                    await asyncio.shield(connecting)
                finally:
                    if self._connecting is connecting:
                        self._connecting = None
                continue
            if len(self._waiters) >= self.max_pending:
                raise PoolOverflow(f"more than {self.max_pending} requests waiting for an HTTP/2 stream")
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await fut
            except TimeoutError:
                raise PoolOverflow(f"no HTTP/2 stream free within {self.connect_timeout:g}s") from None
            finally:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
        raise PoolOverflow("no HTTP/2 stream could be reserved")

    async def _connect(self) -> None:
        loop = self._loop
        assert loop is not None  # set by request()
        if self.tls is not None:
            await self._connect_tls(self.tls)
            return
        conn = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.unix_path is None:
                    _, conn = await loop.create_connection(lambda: H2Conn(self, loop), self.host, self.port)
                else:
                    _, conn = await loop.create_unix_connection(lambda: H2Conn(self, loop), self.unix_path)
                await conn.settings_seen  # the replica's limits, before any stream counts on them
        except TimeoutError:
            if conn is not None:
                conn.abort()
                raise ConnectTimeout(
                    f"{self.address} sent no HTTP/2 SETTINGS within {self.connect_timeout:g}s",
                    cause="no http/2 settings from the upstream",
                ) from None
            raise ConnectTimeout(
                f"connect to {self.address} timed out",
                cause=f"no connection within {self.connect_timeout:g}s",
            ) from None
        except OSError as exc:
            raise ConnectFailure(f"connect to {self.address} failed: {exc}", cause=os_words(exc)) from exc
        self._adopt(conn)

    async def _connect_tls(self, tls: ClientTLS) -> None:
        """``_connect`` for an https:// replica: TCP, the handshake offering h2 by ALPN, the replica's
        SETTINGS, all within connect_timeout. A replica that does not choose h2 raises ALPNMismatch."""
        loop = self._loop
        assert loop is not None
        tcp_done = False
        transport = conn = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await tcp_connect(loop, self.host, self.port, self.resolve)
                tcp_done = True
                transport, conn = await loop.create_connection(
                    lambda: H2Conn(self, loop),
                    sock=sock,
                    ssl=tls.before_connect(),
                    server_hostname=tls.server_name,
                    ssl_handshake_timeout=self.connect_timeout,
                )
                self.tls_handshakes += 1
                resumed = tls.session_reused(transport)
                if resumed:
                    self.tls_resumed += 1
                if self.on_tls_handshake is not None:
                    self.on_tls_handshake(resumed)
                tls.connected(transport)
                if conn.alpn_refused:
                    chosen = conn.alpn_refused
                    raise ALPNMismatch(
                        f"{self.address} did not choose h2 by ALPN (it chose {chosen})",
                        selected="" if chosen == "none" else chosen,
                        cause=f"the replica does not speak HTTP/2 over TLS (ALPN: {chosen}); "
                        "use protocol: auto or http1",
                    )
                await conn.settings_seen
        except ALPNMismatch:
            raise
        except BaseException as exc:
            if conn is not None:
                conn.abort()
            if isinstance(exc, TimeoutError) and conn is not None:
                raise ConnectTimeout(
                    f"{self.address} sent no HTTP/2 SETTINGS within {self.connect_timeout:g}s",
                    cause="no http/2 settings from the upstream",
                ) from None
            fault = tls_connect_fault(exc, self.address, self.connect_timeout, tls.server_name, tcp_done)
            if fault is exc:
                raise
            raise fault from (None if isinstance(exc, TimeoutError) else exc)
        self._adopt(conn)

    def _adopt(self, conn: H2Conn) -> None:
        """A connection whose SETTINGS arrived joins the pool (unless it or the pool closed meanwhile)."""
        if conn.closed:
            raise ConnectFailure(
                f"{self.address} closed the connection before the request",
                cause="closed by the upstream before the request",
            )
        self.connections_opened += 1
        if self._closed:
            conn.goaway_and_close()
            raise ConnectFailure("pool closed")
        self._conns.append(conn)

    def stream_done(self, conn: H2Conn) -> None:
        """A stream slot was freed on ``conn`` (or its limit changed): wake a waiter, retire if idle."""
        if conn.closed:
            pass
        elif conn.reserved == 0 and (conn.going_away or self._closed or conn in self._conns):
            # (A connection still connecting is not in _conns: its first SETTINGS must not retire it.)
            if conn.going_away or self._closed:
                conn.close()
                return
            idle = sum(1 for c in self._conns if not c.reserved)
            if idle > max(self.max_keepalive, 1) or self.max_keepalive == 0:
                self.connection_gone(conn)
                conn.goaway_and_close()
                return
            conn.arm_idle(self.keepalive_idle_timeout)
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def connection_gone(self, conn: H2Conn) -> None:
        """``conn`` takes no new stream (GOAWAY, closed): out of the pool, waiters may connect."""
        try:
            self._conns.remove(conn)
        except ValueError:
            return
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)

    async def close(self) -> None:
        """Close idle connections (GOAWAY) and fail waiters; busy connections close when their streams end."""
        self._closed = True
        for conn in list(self._conns):
            if not conn.reserved:
                conn.goaway_and_close()
            else:
                conn.going_away = True
        self._conns = [c for c in self._conns if not c.closed]
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
