"""One keep-alive HTTP/1.1 connection to an upstream replica.

:class:`Connection` is an :class:`asyncio.Protocol`; the bytes it receives go
straight into an ``httptools.HttpResponseParser`` whose callbacks land on the
:class:`UpstreamResponse` of the exchange in flight.  The response object holds
all per-exchange state (head, body buffer, waiters), so the connection can go
back to the pool as soon as the response is complete, even while the caller is
still reading buffered body bytes.

Hot-path rules followed here: no per-chunk futures or queues unless the reader
is actually waiting, one ``transport.write`` for head + small body, no logging.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections.abc import Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from proxy.tunnel import TunnelEnd

from .errors import (
    BadResponse,
    ResetBeforeHeaders,
    ResetMidBody,
    TLSFailure,
    UpstreamError,
    UpstreamTimeout,
    os_words,
)
from .tls import is_tls_alert, tls_words

# Response-body flow control: stop reading the socket when more than this much
# body is buffered and unread.  read() takes the whole buffer, so reading
# resumes as soon as the reader comes back (the buffer is then empty).
HIGH_WATER = 256 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)
_HAVE_POLL = hasattr(select, "poll")  # not on Windows: the stale check is then skipped
# Fields a trailer section may not carry (RFC 9110 6.5.1: framing, routing, connection handling);
# the listeners drop them from request trailers too (proxy/server/protocol.py, http2.py).
NOT_TRAILERS = _NOT_TRAILERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"cache-control",
        b"pragma",
        b"expect",
        b"max-forwards",
        b"range",
        b"authorization",
        b"proxy-authenticate",
        b"www-authenticate",
    }
)
_NUL = 0


def _over(limit: int) -> str:
    """The error log's words for a head over ``limit`` bytes (``response head over 64 KiB``)."""
    return (
        f"response head over {limit // 1024} KiB"
        if limit % 1024 == 0
        else f"response head over {limit} bytes"
    )


def _parser_fault(exc: HttpParserError, data: bytes, first: bool) -> UpstreamError:
    """Map an httptools error to BadResponse (keeping our own errors raised in callbacks)."""
    cause = exc.__context__
    if isinstance(cause, UpstreamError):
        return cause
    if first and data[1:2] == b"\x03" and data[:1] in (b"\x15", b"\x16"):
        # A TLS record (an alert, or a handshake) in answer to a plaintext request.
        return BadResponse(
            f"unparseable response: {exc} (a TLS record)", cause="the replica speaks TLS: use https://"
        )
    return BadResponse(f"unparseable response: {exc}")


class UpstreamResponse:
    """A response from an upstream; the body is pulled with :meth:`read`.

    Read the body to the end (``read()`` returns ``b""``) or call :meth:`close`;
    a response that is dropped without either keeps its connection until the
    upstream closes it.
    """

    __slots__ = (
        "status",
        "headers",
        "http_version",
        "keep_alive",
        "buffered_peak",
        "_conn",
        "_parser",
        "_head_only",
        "_head_done",
        "complete",
        "_no_body",
        "_framed",
        "_cl_zero",
        "_conn_close",
        "_conn_keep",
        "_interim",
        "_garbage",
        "_chunks",
        "_size",
        "_paused",
        "_waiter",
        "_head_fut",
        "_head_deadline",
        "_exc",
        "_idle_timeout",
        "_head_bytes",
        "_raw_head_bytes",
        "_max_head",
        "upgraded_end",
        "trailers",
        "_hooks",
    )

    upgrade = False  # UpgradeResponse: a 101 is the final answer

    def __init__(
        self,
        head_only: bool,
        idle_timeout: float | None,
        max_head: int,
        hooks=None,
    ) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.http_version = "1.1"
        self.keep_alive = False
        # Highest number of unread body bytes seen above HIGH_WATER (0 if never above).
        self.buffered_peak = 0
        self._conn: Connection | None = None
        self._parser: HttpResponseParser | None = None
        self._head_only = head_only
        self._head_done = False
        # The whole message has been received: no more body bytes will come, and reading
        # waits for nothing (a plain attribute: the data path reads it on every response).
        self.complete = False
        self._no_body = False
        self._framed = False  # content-length or chunked; otherwise the body ends at EOF
        self._cl_zero = False
        self._conn_close = False
        self._conn_keep = False
        self._interim = False  # parsing a 1xx head
        self._garbage = False  # bytes beyond the message: never reuse the connection
        self._chunks: list[bytes] = []
        self._size = 0
        self._paused = False
        self._waiter: asyncio.Future | None = None
        self._head_fut: asyncio.Future | None = None
        self._head_deadline: float | None = None  # loop time by which the head must be here
        self._exc: UpstreamError | None = None
        self._idle_timeout = idle_timeout
        self._head_bytes = 0  # header names + values (exact, checked per header)
        self._raw_head_bytes = 0  # raw bytes fed while the head is incomplete
        self._max_head = max_head
        # After a 101: the upstream connection's side of a tunnel (see proxy/tunnel.py), else None.
        self.upgraded_end: TunnelEnd | None = None
        # Trailer fields of a chunked body, once any arrived (counted in the head size limit).
        self.trailers: list[tuple[bytes, bytes]] | None = None
        # Told of each 1xx other than 100 and a switching 101 (103 Early Hints...) as it arrives,
        # through hooks.relay_interim(status, headers), so it can be relayed before the final answer.
        self._hooks = hooks

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} HTTP/{self.http_version} complete={self.complete}>"

    # -- public API ---------------------------------------------------------

    def has_body(self) -> bool:
        """False for HEAD, 204, 304 and ``content-length: 0`` (1xx are never returned)."""
        return not self._no_body

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read."""
        return self._size

    async def read(self) -> bytes:
        """Next body chunk (everything buffered, joined); ``b""`` once the body is complete.

        Buffered bytes are delivered before a fault is raised, so a proxy can
        forward what arrived before a mid-body reset.
        """
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._size = 0
                if self._paused:
                    self._paused = False
                    conn = self._conn
                    if conn is not None and not conn.closed:
                        conn.transport.resume_reading()
                return data
            if self._exc is not None:
                raise self._exc
            if self.complete:
                return b""
            await self._wait_body()

    def close(self) -> None:
        """Abandon the response; an unfinished body means the connection is closed, never reused."""
        conn = self._conn
        if conn is not None:
            conn.abandon(self, ResetMidBody("response closed before the body was read", request_sent=True))
        end = self.upgraded_end
        if end is not None and end.tunnel is None:
            end.abort()  # switched, but no tunnel was made of it: the connection is of no other use
        self._chunks = []
        self._size = 0

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- waiting ---------------------------------------------------------------

    async def _wait_body(self) -> None:
        conn = self._conn
        assert conn is not None  # not complete and no fault => still attached
        loop = conn.loop
        fut = self._waiter = loop.create_future()
        timer = None
        if self._idle_timeout is not None:
            timer = loop.call_later(
                self._idle_timeout, conn.timeout, fut, "no body bytes within idle_timeout"
            )
        try:
            await fut
        except BaseException:
            # Cancelled (client went away, asyncio.timeout...): the body is
            # abandoned mid-way, so the connection cannot be reused.
            self.close()
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        fut = self._head_fut
        if fut is not None and not fut.done():
            fut.set_result(None)
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second message after a complete one: unsolicited bytes.
            self._garbage = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            self._trailer(name, value)
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            raise BadResponse(
                f"response head larger than {self._max_head} bytes", cause=_over(self._max_head)
            )
        name = name.lower()
        self.headers.append((name, value))
        # httptools validates framing (duplicate CL, CL + chunked...); we only
        # need to know whether the body is framed and what Connection says.
        if name == b"content-length":
            self._framed = True
            self._cl_zero = value.strip() == b"0"
        elif name == b"transfer-encoding":
            self._framed = value.rstrip().lower().endswith(b"chunked")
        elif name == b"connection":
            # find(), not `in`: CPython 3.11's bytes `in` first tries the needle as an int
            # and raises and clears a TypeError, several times dearer than the search.
            value = value.lower()
            if value.find(b"close") >= 0:
                self._conn_close = True
            if value.find(b"keep-alive") >= 0:
                self._conn_keep = True

    def _trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field of a chunked body: kept (bounded like the head) unless it may not be one."""
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            raise BadResponse(f"response head and trailers larger than {self._max_head} bytes")
        name = name.lower()
        if name in _NOT_TRAILERS or _NUL in value:
            return  # framing, routing and connection fields never come from a trailer (RFC 9110 6.5.1)
        if self.trailers is None:
            self.trailers = []
        self.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # the parser calls back only while fed (then both are set)
        status = parser.get_status_code()
        if status < 200:
            # 1xx interim response (100 Continue, 103 Early Hints...): skipped.
            # llhttp ends these messages itself; 101 makes feed_data fail.
            self._interim = True
            hooks = self._hooks
            if hooks is not None and status != 100 and status != 101:
                hooks.relay_interim(status, self.headers)
            self.headers = []
            self._framed = self._cl_zero = self._conn_close = self._conn_keep = False
            return
        self.status = status
        self.http_version = version = parser.get_http_version()
        if version == "1.1":
            keep = not self._conn_close
        else:
            keep = self._conn_keep and not self._conn_close
        self._head_done = True
        if self._head_only or status == 204 or status == 304 or self._cl_zero:
            # No body whatever the headers say.  llhttp does not know the
            # request method, so for HEAD it may still expect content-length
            # bytes: we end the message here and any such bytes mark the
            # connection unusable (a fresh parser is used per exchange).
            self._no_body = True
            self.complete = True
        elif not self._framed:
            keep = False  # body ends at EOF
        self.keep_alive = keep
        self._wake()
        conn = self._conn
        assert conn is not None
        if conn._drain_waiter is not None:
            conn.wake_drain()  # early response while uploading: stop sending

    def on_body(self, data: bytes) -> None:
        if self.complete:
            self._garbage = True
            return
        self._chunks.append(data)
        size = self._size + len(data)
        self._size = size
        if size > HIGH_WATER:
            if size > self.buffered_peak:
                self.buffered_peak = size
            if not self._paused and self._conn is not None:
                self._paused = True
                self._conn.transport.pause_reading()
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.complete:
            self.complete = True
            fut = self._waiter
            if fut is not None and not fut.done():
                fut.set_result(None)


class UpgradeResponse(UpstreamResponse):
    """The response to a request that asks to switch protocols (Upgrade): a 101 is its final
    answer, and any other answer leaves a connection that is never reused."""

    __slots__ = ()
    upgrade = True

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # the parser calls back only while fed
        if parser.get_status_code() == 101:
            # The bytes after it belong to the new protocol (data_received hands them to a tunnel end).
            self.status = 101
            self.http_version = parser.get_http_version()
            self._head_done = True
            self._no_body = True
            self.keep_alive = False
            self._wake()
            return
        super().on_headers_complete()
        if self._head_done:
            self.keep_alive = False  # it declined the upgrade: a server may read nothing after such a request


class Connection(asyncio.Protocol):
    """One TCP connection; serves one exchange at a time."""

    __slots__ = (
        "release",
        "discard_idle",
        "loop",
        "transport",
        "closed",
        "pooled",
        "checked_out",
        "idle_since",
        "_resp",
        "_parser",
        "_req_done",
        "_upload_cut",
        "_write_paused",
        "_drain_waiter",
        "_poller",
        "_head_timer",
        "_head_timer_at",
        "tls",
    )

    def __init__(
        self,
        release: Callable[[Connection, bool], None],
        discard_idle: Callable[[Connection], None],
        loop: asyncio.AbstractEventLoop,
        tls: bool = False,
    ) -> None:
        self.tls = tls  # over TLS (an https:// replica)
        # The owning pool's callbacks: give the slot back (reusable or not); drop a dead idle one.
        self.release = release
        self.discard_idle = discard_idle
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.pooled = False  # in the pool's idle stack
        self.checked_out = False  # counted in pool.in_use
        self.idle_since = 0.0
        self._resp: UpstreamResponse | None = None
        self._parser: HttpResponseParser | None = None
        self._req_done = False
        self._upload_cut = False  # request body cut short: close with RST
        self._write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._poller: select.poll | None = None
        # One lazily re-armed timer for head timeouts (see arm_head_timer), not one per request.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_timer_at = 0.0

    # -- exchange ------------------------------------------------------------

    def start(self, resp: UpstreamResponse, data: bytes) -> None:
        """Begin an exchange: attach ``resp`` and write the first bytes of the request."""
        self._resp = resp
        resp._conn = self
        # A fresh parser per response: after a HEAD response (or 1xx) the old
        # one may be in the middle of a body that never comes.
        resp._parser = self._parser = HttpResponseParser(resp)
        self._req_done = False
        self.transport.write(data)

    def request_done(self, reusable: bool = True) -> None:
        """The request is fully written (or the upload was cut short if not ``reusable``)."""
        self._req_done = True
        resp = self._resp
        if not reusable:
            self._upload_cut = True
        if resp is not None:
            if not reusable:
                resp.keep_alive = False
            if resp.complete:
                self._message_done(resp)

    def _message_done(self, resp: UpstreamResponse) -> None:
        """Whole response received: hand the connection back while the caller reads the buffer."""
        if not self._req_done:
            return  # still uploading; request_done() finishes
        self._resp = None
        self._parser = None
        # The parser holds the response's bound callbacks: without this the pair is a
        # reference cycle per request, and the garbage collector runs every few thousand requests.
        resp._parser = None
        resp._conn = None
        if resp._paused:
            resp._paused = False
            if not self.closed:
                self.transport.resume_reading()  # idle connections must notice EOF
        if self.checked_out:
            self.release(self, resp.keep_alive and not resp._garbage)

    def _switch(self, resp: UpstreamResponse, early: bytes) -> None:
        """After a 101: the transport leaves HTTP for a tunnel end; the pool slot stays taken
        until the tunnel's connection is gone, and the connection is never reused."""
        self._resp = None
        self._parser = None
        resp._parser = None
        resp._conn = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        end = TunnelEnd(self.transport, early, on_lost=self._tunnel_lost)
        resp.upgraded_end = end
        self.transport.set_protocol(end)

    def _tunnel_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.checked_out:
            self.release(self, False)

    def abandon(self, resp: UpstreamResponse, exc: UpstreamError) -> None:
        """The caller gave up on ``resp`` (close/cancel): drop the connection if still attached."""
        if self._resp is resp:
            self.fail(exc)

    def fail(self, exc: UpstreamError) -> None:
        """Fault: record ``exc`` on the exchange, abort the connection, free the pool slot."""
        resp = self._resp
        self._resp = None
        self._parser = None
        if resp is not None:
            resp._conn = None
            resp._parser = None
            if resp._exc is None:
                resp._exc = exc
            resp._wake()
        self.wake_drain()
        self.abort()
        if self.checked_out:
            self.release(self, False)

    def arm_head_timer(self, when: float) -> None:
        """Make sure the connection's timer fires by ``when`` (the head deadline of its exchange).

        A timer armed for an earlier request usually fires first; it then re-arms for
        the exchange waiting at that moment. So a busy connection creates about one
        timer per head_timeout instead of one per request.
        """
        timer = self._head_timer
        if timer is not None:
            if self._head_timer_at <= when:
                return
            timer.cancel()
        self._head_timer_at = when
        self._head_timer = self.loop.call_at(when, self._head_tick)

    def _head_tick(self) -> None:
        self._head_timer = None
        resp = self._resp
        if resp is None or resp._head_fut is None or resp._head_deadline is None:
            return  # nobody waits for a head: the next request arms the timer again
        if self.loop.time() >= resp._head_deadline:
            self.timeout(resp._head_fut, "no response head within head_timeout")
        else:
            self.arm_head_timer(resp._head_deadline)

    def timeout(self, fut: asyncio.Future, message: str) -> None:
        """Timer callback for head/idle/drain timeouts (no-op if ``fut`` was already woken)."""
        if not fut.done():
            self.fail(UpstreamTimeout(message))

    # -- writing -------------------------------------------------------------

    def wake_drain(self) -> None:
        fut = self._drain_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def drain(self, stall_timeout: float | None) -> None:
        """Wait until the transport accepts more data (or the exchange ended or faulted)."""
        fut = self._drain_waiter = self.loop.create_future()
        timer = None
        if stall_timeout is not None:
            timer = self.loop.call_later(
                stall_timeout, self.timeout, fut, "upstream stopped reading the request body"
            )
        try:
            await fut
        finally:
            self._drain_waiter = None
            if timer is not None:
                timer.cancel()

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    # -- lifecycle -------------------------------------------------------------

    def is_stale(self) -> bool:
        """True if the upstream sent FIN, RST or bytes while idle and the loop has not run yet.

        One non-blocking poll(2); it closes the window where a just-closed
        keep-alive connection would be picked before its eof was processed.
        """
        poller = self._poller
        return poller is not None and bool(poller.poll(0))

    def close(self) -> None:
        """Close with a FIN; abort instead after a cut upload (unsent request bytes)."""
        if not self.closed:
            if self._upload_cut:
                self.abort()
            else:
                self.closed = True
                self.transport.close()

    def abort(self) -> None:
        """Close with a RST: unsent bytes are dropped, also those already in the kernel.

        Without SO_LINGER 0 the kernel would keep trying to deliver queued
        request bytes to an upstream that stopped reading, and the upstream
        would never see the connection end.
        """
        if not self.closed:
            self.closed = True
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                except OSError:
                    pass
            self.transport.abort()

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if _HAVE_POLL and sock is not None:
            self._poller = poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        resp = self._resp
        parser = self._parser
        if resp is None or parser is None:
            # Bytes while idle (e.g. a 408 before closing): never reuse.
            self._lost_idle()
            return
        try:
            parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self._resp is resp:
                if resp.status == 101 and resp.upgrade:
                    self._switch(resp, data[exc.args[0] :])
                else:
                    self.fail(BadResponse("101 Switching Protocols to a request that did not ask for it"))
            return
        except HttpParserError as exc:
            if self._resp is resp:
                self.fail(_parser_fault(exc, data, resp._raw_head_bytes == 0 and not resp._head_done))
            return
        if self._resp is not resp:
            return
        if resp.complete:
            self._message_done(resp)
        elif not resp._head_done:
            # Bound memory of a head that never ends (on_header counts precisely).
            resp._raw_head_bytes += len(data)
            if resp._raw_head_bytes > resp._max_head:
                self.fail(
                    BadResponse(
                        f"response head larger than {resp._max_head} bytes", cause=_over(resp._max_head)
                    )
                )

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._ended(exc)
        self.wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.wake_drain()

    def _ended(self, exc: Exception | None) -> None:
        """The upstream closed (FIN if ``exc`` is None) or reset the connection."""
        resp = self._resp
        if resp is None:
            self._lost_idle()
            return
        if resp._head_done:
            if resp.complete:
                # Only possible while our upload is still running (early
                # response); request_done() releases, never reusing it.
                resp.keep_alive = False
            elif exc is None and not resp._framed and not resp._no_body:
                # Read-until-close body: EOF is its end.
                resp.keep_alive = False
                resp.complete = True
                resp._wake()
                self.close()
                self._message_done(resp)
            else:
                self.fail(ResetMidBody(f"upstream closed mid-body: {exc or 'EOF'}", cause=os_words(exc)))
        elif exc is not None and is_tls_alert(exc):
            # A TLS 1.3 replica refuses a client certificate after our side of the handshake
            # finished: the request never reached it, so this is a connect-time TLS fault.
            self.fail(TLSFailure(f"TLS handshake refused by the upstream: {exc}", cause=tls_words(exc)))
        elif self.tls and self.idle_since == 0.0 and resp._raw_head_bytes == 0:
            # Closed before a byte of the first answer on a new TLS connection: how a TLS 1.3 server
            # that drops its alert refuses a client certificate. The request may have reached it.
            self.fail(
                TLSFailure(
                    f"upstream closed a new TLS connection before the response head: {exc or 'EOF'}",
                    request_sent=True,
                    cause="the replica closed a new TLS connection before answering (does it require a "
                    "client certificate? see tls.cert_file)",
                )
            )
        else:
            self.fail(
                ResetBeforeHeaders(
                    f"upstream closed before the response head: {exc or 'EOF'}", cause=os_words(exc)
                )
            )

    def _lost_idle(self) -> None:
        self.close()
        if self.pooled:
            self.discard_idle(self)
