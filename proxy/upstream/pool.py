"""Keep-alive connection pool for one upstream replica (host:port, or a unix socket path).

Accounting: ``in_use`` counts connections checked out by a request plus slots
reserved for connects in progress; ``idle`` is the stack of reusable
connections (LIFO, so a hot few serve the traffic and the rest expire);
``in_use + idle <= max_connections`` always holds.  A released connection is
handed straight to the oldest waiter (FIFO) without touching the idle stack.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from .connection import Connection, UpgradeResponse, UpstreamResponse
from .dial import dial, tcp_connect
from .errors import (
    ALPNMismatch,
    ConnectFailure,
    ConnectTimeout,
    PoolOverflow,
    RequestBodyError,
    ResetBeforeHeaders,
    os_words,
)
from .tls import ClientTLS, selected_alpn, tls_connect_fault

# Idle connections younger than this are reused without the poll(2) liveness probe.
STALE_PROBE_AFTER = 0.1
# Bodies up to this size are joined with the head into a single write.
_JOIN_BODY_MAX = 64 * 1024
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


class UpstreamPool:
    """HTTP/1.1 client for one upstream replica; see :meth:`request`."""

    protocol = "http1"
    # protocol: auto to an https:// replica (proxy/upstream/alpn.py): a connection on which the
    # replica chose h2 by ALPN is closed unused and the connect raises ALPNMismatch.
    alpn_switch = False

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
        resolve: Callable[[], Awaitable[Sequence[str]]] | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.host = host
        # An https:// replica: connections are TLS with this context and name (proxy/upstream/tls.py).
        self.tls = tls
        self.tls_handshakes = 0  # full or resumed handshakes done (connections_opened of a TLS pool)
        self.tls_resumed = 0  # of which resumed a session
        self.on_tls_handshake: Callable[[bool], None] | None = None  # told (resumed?) after each one
        self.port = port
        # A host name: its addresses come from the DNS name cache (proxy.cluster.dns), tried in order.
        self.resolve = resolve
        # A unix-socket replica: connect to this file instead of host:port (same protocol and
        # accounting; asyncio sets TCP_NODELAY on TCP sockets only, so nothing TCP-only is applied).
        self.unix_path = unix_path
        if unix_path is not None:
            self.address = f"unix:{unix_path}"
        else:
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_connections = max_connections
        # None: keep idle whatever was opened (the policy's default, see PoolOptions.max_keepalive).
        self.max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self.connect_timeout = connect_timeout
        self.keepalive_idle_timeout = keepalive_idle_timeout
        self.max_pending = max_pending
        self.max_response_head = max_response_head
        self.connections_opened = 0  # total successful connects (for metrics and tests)
        self._idle: list[Connection] = []
        self._waiters: deque[asyncio.Future] = deque()
        self._in_use = 0
        self._pending = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (
            f"<UpstreamPool {self.address} in_use={self._in_use} "
            f"idle={len(self._idle)} pending={self._pending}>"
        )

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def pending(self) -> int:
        return self._pending

    # -- request ---------------------------------------------------------------

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
    ) -> UpstreamResponse:
        """Send a request and return once the final response head arrived.

        ``headers`` is sent as given (lowercase names, Host included); framing
        headers are added here.  ``head_timeout`` counts from this call (pool
        wait and connect included) to the complete head, minus the time spent
        waiting for ``body_stream`` (the downstream client); ``idle_timeout``
        bounds silence while reading the body and stalls while uploading.
        ``hooks`` (optional): ``hooks.upgrade`` not None means the request asks to switch
        protocols (``headers`` carry Upgrade and Connection), so a 101 is the final answer, with
        ``upgraded_end`` for a tunnel; ``hooks.relay_interim(status, headers)`` is called for each
        informational answer (103 Early Hints...) other than 100 Continue as it arrives.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if head_timeout is None else loop.time() + head_timeout

        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        rest = None
        if body_stream is None:
            if body or method in _BODY_METHODS:
                parts += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n")
                if len(body) <= _JOIN_BODY_MAX:
                    parts.append(body)
                else:
                    rest = body  # a second write beats copying a large body
            else:
                parts.append(b"\r\n")
        elif content_length is not None:
            parts += (b"content-length: ", str(content_length).encode(), b"\r\n\r\n")
        else:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        data = b"".join(parts)
        resp: UpstreamResponse
        if hooks is not None and hooks.upgrade is not None:
            resp = UpgradeResponse(False, idle_timeout, self.max_response_head, hooks)
        else:
            resp = UpstreamResponse(method == b"HEAD", idle_timeout, self.max_response_head, hooks)

        conn = self._take_idle()
        if conn is None:
            conn = await self._acquire()
        # From here on the connection is ours; any way out but success or a
        # fault already handled by the connection must close it.
        try:
            conn.start(resp, data)  # no await since the liveness check: nothing was sent before
            if rest is not None:
                conn.transport.write(rest)
            if body_stream is not None and content_length != 0:
                waited = await self._upload(conn, resp, body_stream, content_length, idle_timeout)
                if deadline is not None:
                    deadline += waited  # a slow downstream client is not the upstream's fault
            else:
                conn.request_done()
            if not resp._head_done and resp._exc is None:
                fut = resp._head_fut = loop.create_future()
                if deadline is not None:
                    resp._head_deadline = deadline
                    conn.arm_head_timer(deadline)
                try:
                    await fut
                finally:
                    resp._head_fut = None
        except BaseException as exc:
            conn.abandon(resp, _abandoned(exc))
            raise
        if not resp._head_done:
            assert resp._exc is not None  # the wait for the head ends with the head or a fault
            raise resp._exc
        return resp

    async def _upload(
        self,
        conn: Connection,
        resp: UpstreamResponse,
        body_stream: Callable[[], Awaitable[bytes]],
        content_length: int | None,
        idle_timeout: float | None,
    ) -> float:
        """Stream the request body, respecting flow control; stop early on a response or fault.

        Returns the seconds spent waiting for ``body_stream`` (the downstream).
        """
        write = conn.transport.write
        now = conn.loop.time
        remaining = content_length
        waited = 0.0
        while True:
            started = now()
            chunk = await body_stream()
            waited += now() - started
            if resp._head_done or resp._conn is not conn:
                # Early response (e.g. 413) or fault: stop; never reuse after a cut upload.
                conn.request_done(reusable=False)
                return waited
            if not chunk:
                if remaining is None:
                    trailers = getattr(body_stream, "trailers", None)
                    if trailers:
                        # The request's trailer fields (checked by the listener): a chunked body carries them.
                        parts = [b"0\r\n"]
                        for name, value in trailers:
                            parts += (name, b": ", value, b"\r\n")
                        parts.append(b"\r\n")
                        write(b"".join(parts))
                    else:
                        write(b"0\r\n\r\n")
                elif remaining:
                    raise RequestBodyError(f"request body ended {remaining} bytes short of content_length")
                break
            if remaining is None:
                write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                remaining -= len(chunk)
                if remaining < 0:
                    raise RequestBodyError("request body longer than content_length")
                write(chunk)
                if remaining == 0:
                    break
            if conn.write_paused:
                await conn.drain(idle_timeout)
                if resp._head_done or resp._conn is not conn:
                    conn.request_done(reusable=False)
                    return waited
        conn.request_done()
        return waited

    # -- acquiring ---------------------------------------------------------------

    def _take_idle(self) -> Connection | None:
        idle = self._idle
        if not idle:
            return None
        # Probe with poll(2) only connections idle long enough for the upstream to have given up on
        # them; under load a connection is reused within milliseconds and the probe is pure cost
        # (an EOF the loop already processed marks the connection closed either way).
        assert self._loop is not None  # set by request(), the only way in
        # <=: uvloop's clock moves in whole milliseconds, so "idle at least STALE_PROBE_AFTER" (0 in a
        # test: always) must include a connection pooled in the same millisecond.
        probe_before = self._loop.time() - STALE_PROBE_AFTER
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if conn.closed or (conn.idle_since <= probe_before and conn.is_stale()):
                conn.close()
                continue
            conn.checked_out = True
            self._in_use += 1
            return conn
        return None

    async def _acquire(self) -> Connection:
        """Slow path: connect, or wait for a connection or a free slot."""
        if self._closed:
            raise ConnectFailure("pool closed")
        if self._in_use + len(self._idle) < self.max_connections:
            self._in_use += 1
            return await self._connect()
        if self._pending >= self.max_pending:
            raise PoolOverflow(f"more than {self.max_pending} requests waiting for a connection")
        loop = self._loop
        assert loop is not None  # set by request(), the only way in
        fut = loop.create_future()
        self._waiters.append(fut)
        self._pending += 1
        timer = loop.call_later(self.connect_timeout, _expire_waiter, fut, self.connect_timeout)
        try:
            conn = await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed a connection or slot, but cancelled before running: give it back.
                handed = fut.result()
                if handed is None:
                    self._in_use -= 1
                    self._wake_for_slot()
                else:
                    self._release(handed, True)
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        finally:
            self._pending -= 1
            timer.cancel()
        if conn is not None:
            if not (conn.closed or conn.is_stale()):
                return conn
            # It died between hand-off and now: keep its slot, connect afresh.
            conn.checked_out = False
            conn.close()
        return await self._connect()

    async def _connect(self) -> Connection:
        """Open a connection into a slot already counted in ``in_use``."""
        loop = self._loop
        assert loop is not None  # set by request(), the only way in
        tls = self.tls
        if tls is not None:
            return await self._connect_tls(tls)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.resolve is not None:
                    conn = await self._dial_name(loop)
                elif self.unix_path is None:
                    _, conn = await loop.create_connection(
                        lambda: Connection(self._release, self._discard_idle, loop), self.host, self.port
                    )
                else:
                    _, conn = await loop.create_unix_connection(
                        lambda: Connection(self._release, self._discard_idle, loop), self.unix_path
                    )
        except BaseException as exc:
            self._in_use -= 1
            self._wake_for_slot()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(
                    f"connect to {self.address} timed out",
                    cause=f"no connection within {self.connect_timeout:g}s",
                ) from None
            if isinstance(exc, OSError):
                raise ConnectFailure(f"connect to {self.address} failed: {exc}", cause=os_words(exc)) from exc
            raise
        self.connections_opened += 1
        conn.checked_out = True
        if conn.closed:
            # Accepted and closed before we could write anything.
            self._release(conn, False)
            raise ConnectFailure(
                f"{self.address} closed the connection before the request",
                cause="closed by the upstream before the request",
            )
        return conn

    async def _dial_name(self, loop: asyncio.AbstractEventLoop) -> Connection:
        """A host name: its addresses from the DNS name cache (the lookup, usually a cache hit, counts
        against the connect timeout too), then each in order with its share of what is left."""
        assert self.resolve is not None
        started = loop.time()
        addresses = await self.resolve()  # an OSError (the lookup's failure) when it has none
        left = self.connect_timeout - (loop.time() - started)
        return await dial(
            loop, lambda: Connection(self._release, self._discard_idle, loop), addresses, self.port, left
        )

    async def _connect_tls(self, tls: ClientTLS) -> Connection:
        """``_connect`` for an https:// replica: TCP, then the handshake, both within connect_timeout.

        A handshake fault is a TLSFailure (request_sent False: nothing of the request left)."""
        loop = self._loop
        assert loop is not None  # set by request() before any connect
        tcp_done = False
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await tcp_connect(loop, self.host, self.port, self.resolve)
                tcp_done = True
                transport, conn = await loop.create_connection(
                    lambda: Connection(self._release, self._discard_idle, loop, tls=True),
                    sock=sock,
                    ssl=tls.before_connect(),
                    server_hostname=tls.server_name,
                    ssl_handshake_timeout=self.connect_timeout,
                )
        except BaseException as exc:
            self._in_use -= 1
            self._wake_for_slot()
            fault = tls_connect_fault(exc, self.address, self.connect_timeout, tls.server_name, tcp_done)
            if fault is exc:
                raise
            raise fault from (None if isinstance(exc, TimeoutError) else exc)
        self.connections_opened += 1
        self.tls_handshakes += 1
        resumed = tls.session_reused(transport)
        if resumed:
            self.tls_resumed += 1
        if self.on_tls_handshake is not None:
            self.on_tls_handshake(resumed)
        tls.connected(transport)
        conn.checked_out = True
        if self.alpn_switch and selected_alpn(transport) == "h2":
            # protocol: auto and the replica chose HTTP/2: nothing was sent; its pool switches.
            self._release(conn, False)
            raise ALPNMismatch(
                f"{self.address} chose h2 by ALPN", selected="h2", cause="the replica chose h2"
            )
        if conn.closed:
            self._release(conn, False)
            raise ConnectFailure(
                f"{self.address} closed the connection before the request",
                cause="closed by the upstream before the request",
            )
        return conn

    # -- releasing -----------------------------------------------------------------

    def _release(self, conn: Connection, reusable: bool) -> None:
        """A checked-out connection is free: hand it to a waiter, keep it idle, or close it."""
        if reusable and not conn.closed and not self._closed:
            waiters = self._waiters
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(conn)  # stays checked out: ownership moves
                    return
            conn.checked_out = False
            self._in_use -= 1
            if len(self._idle) < self.max_keepalive:
                conn.pooled = True
                conn.idle_since = conn.loop.time()
                self._idle.append(conn)
                if self._sweeper is None:
                    self._arm_sweeper()
            else:
                conn.close()
            return
        conn.checked_out = False
        conn.close()
        self._in_use -= 1
        self._wake_for_slot()

    def _wake_for_slot(self) -> None:
        """A slot was freed: let the oldest waiter connect in it."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                self._in_use += 1
                fut.set_result(None)
                return

    def _discard_idle(self, conn: Connection) -> None:
        """An idle connection was closed or reset by the upstream."""
        conn.pooled = False
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _arm_sweeper(self) -> None:
        # The stack is ordered by idle_since (pushes only on top), so the
        # bottom entry is always the next to expire.
        when = self._idle[0].idle_since + self.keepalive_idle_timeout
        assert self._loop is not None  # a connection is idle: request() ran
        self._sweeper = self._loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        idle = self._idle
        # Small slack: call_at may fire up to the clock resolution early.
        assert self._loop is not None  # armed by _arm_sweeper
        limit = self._loop.time() - self.keepalive_idle_timeout + 0.001
        n = 0
        while n < len(idle) and idle[n].idle_since <= limit:
            n += 1
        expired = idle[:n]
        del idle[:n]
        for conn in expired:
            conn.pooled = False
            conn.close()
        if idle:
            self._arm_sweeper()

    async def close(self) -> None:
        """Close idle connections and fail waiters; in-use connections close when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.pooled = False
            conn.close()
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(ConnectFailure("pool closed"))


def _expire_waiter(fut: asyncio.Future, wait: float) -> None:
    if not fut.done():
        fut.set_exception(PoolOverflow(f"no connection free within {wait}s"))


def _abandoned(exc: BaseException) -> ResetBeforeHeaders:
    return ResetBeforeHeaders(f"request abandoned: {exc!r}", request_sent=True)
