"""A scriptable raw HTTP/1.1 upstream for tests.

Start one on 127.0.0.1 with an ephemeral port (or on a unix socket: ``unix_path=``)::

    async with RawUpstream(ok(b"hello")) as up:
        ...  # talk to 127.0.0.1:up.port
        assert up.connections == 1
        assert up.requests[0].method == b"GET"

The handler is ``async def handler(req: Request, conn: Responder) -> None``; it
is called once per request, in order, for each connection (keep-alive and
pipelined requests are served one after the other).  Through ``conn`` it can
send a normal response (:meth:`Responder.send`), stream one
(:meth:`Responder.send_head`, :meth:`Responder.write`, :meth:`Responder.drain`,
:meth:`Responder.send_chunk`, :meth:`Responder.end_chunks`), send raw bytes,
delay (``await asyncio.sleep``), close (FIN), reset (RST via ``SO_LINGER 0``)
or never answer (:meth:`Responder.hang`).

Requests are parsed with ``httptools.HttpRequestParser`` (content-length and
chunked bodies).  By default the handler runs once the whole request arrived
and ``req.body`` holds the body.  With ``stream_request_body=True`` it runs as
soon as the head arrived and pulls the body with ``await req.read_body()``
(socket reads pause while more than 1 MiB is queued), which allows early
responses and huge uploads.

``up.requests`` records every request; ``up.connections`` / ``up.disconnects``
count accepted / closed connections; ``await up.wait_until(predicate)`` waits
(bounded) until a condition on those holds; handler exceptions and unparsable
requests are collected in ``up.errors`` (the connection is closed), and leaving
the ``async with`` (or :meth:`RawUpstream.close`) raises :class:`UpstreamErrors`
when any were recorded, so a broken handler cannot hide behind Fender's retries.
A test that provokes them on purpose says so: ``RawUpstream(..., expect_errors=True)``.

Ready-made handlers: :func:`ok`, :func:`status`, :data:`echo`, :func:`raw`,
:data:`hang`, :data:`reset`, :data:`close`, :func:`delayed`, :func:`sequence`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import traceback
from collections.abc import Awaitable, Callable, Iterable

import httptools

Headers = Iterable[tuple[bytes | str, bytes | str]]
Handler = Callable[["Request", "Responder"], Awaitable[None]]

_STREAM_PAUSE = 1024 * 1024
_STREAM_RESUME = 256 * 1024
_RAW_LIMIT = 1024 * 1024  # bytes of raw request kept per request


def _b(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("latin-1")


class Request:
    """One parsed request as seen by the upstream."""

    def __init__(self, connection: int) -> None:
        self.connection = connection  # 1-based index of the accepted connection
        self.method = b""
        self.target = b""
        self.http_version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased, order and duplicates kept
        self.body = b""  # whole body (buffered mode only)
        self.body_length = 0  # body bytes received so far
        self.raw = b""  # bytes received for this request (capped at 1 MiB; approximate if pipelined)
        self.complete = False  # whole request received
        self._parts: list[bytes] = []
        self._queue: asyncio.Queue[bytes] | None = None
        self._queued = 0
        self._protocol: _ServerProtocol | None = None

    def __repr__(self) -> str:
        return f"<Request {self.method.decode()} {self.target.decode()} body={self.body_length}B>"

    def header(self, name: bytes | str) -> bytes | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = _b(name).lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read_body(self) -> bytes:
        """Next chunk of the request body, ``b""`` at the end (``stream_request_body`` mode)."""
        if self._queue is None:
            raise RuntimeError("read_body() needs RawUpstream(stream_request_body=True)")
        chunk = await self._queue.get()
        self._queued -= len(chunk)
        protocol = self._protocol
        if protocol is not None and protocol.reading_paused and self._queued < _STREAM_RESUME:
            protocol.reading_paused = False
            if not protocol.transport.is_closing():
                protocol.transport.resume_reading()
        return chunk


class Responder:
    """Writer-like handle on one server-side connection, given to handlers."""

    def __init__(self, protocol: _ServerProtocol) -> None:
        self._protocol = protocol
        self.transport: asyncio.Transport = protocol.transport
        # Set while our writes are paused by flow control (the client stopped reading).
        self.write_paused = asyncio.Event()
        self.closed = asyncio.get_running_loop().create_future()  # resolved when the connection is gone

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def write(self, data: bytes) -> None:
        """Send raw bytes."""
        if not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's write buffer drained (or the connection closed)."""
        fut = self._protocol.drain_waiter
        if fut is not None and not self.is_closed:
            await asyncio.shield(fut)

    async def send_head(
        self,
        status: int = 200,
        headers: Headers = (),
        *,
        reason: bytes | str | None = None,
        version: str = "1.1",
    ) -> None:
        """Send a status line and headers exactly as given (no framing added)."""
        reason = _b(reason if reason is not None else _REASONS.get(status, "Unknown"))
        lines = [b"HTTP/%s %d %s\r\n" % (_b(version), status, reason)]
        lines += [b"%s: %s\r\n" % (_b(k), _b(v)) for k, v in headers]
        lines.append(b"\r\n")
        self.write(b"".join(lines))

    async def send(
        self,
        status: int = 200,
        headers: Headers = (),
        body: bytes = b"",
        *,
        chunked: bool = False,
        chunk_size: int = 65536,
        content_length: bool = True,
        reason: bytes | str | None = None,
        version: str = "1.1",
    ) -> None:
        """Send a whole response: framed by content-length (default), chunked, or by closing.

        With ``content_length=False`` and not chunked the body is sent without
        framing (read-until-close); the caller should then :meth:`close`.
        """
        headers = list(headers)
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        elif content_length:
            headers.append((b"content-length", str(len(body)).encode()))
        await self.send_head(status, headers, reason=reason, version=version)
        if chunked:
            for i in range(0, len(body), chunk_size):
                await self.send_chunk(body[i : i + chunk_size])
            await self.end_chunks()
        elif body:
            self.write(body)
            await self.drain()

    async def send_chunk(self, data: bytes) -> None:
        """Send one chunk of a chunked body (empty data is skipped)."""
        if data:
            self.write(b"%x\r\n%b\r\n" % (len(data), data))
            await self.drain()

    async def end_chunks(self, trailers: Headers = ()) -> None:
        """Terminate a chunked body, optionally with trailers."""
        self.write(b"0\r\n" + b"".join(b"%s: %s\r\n" % (_b(k), _b(v)) for k, v in trailers) + b"\r\n")
        await self.drain()

    def close(self) -> None:
        """Close after flushing what was written (FIN)."""
        self.transport.close()

    def reset(self) -> None:
        """Close abruptly with a TCP RST (SO_LINGER 0), dropping unsent bytes."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None and not self.transport.is_closing():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def hang(self) -> None:
        """Never answer: wait until the client closes the connection."""
        await asyncio.shield(self.closed)


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, server: RawUpstream) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.queue: asyncio.Queue[Request | None] = asyncio.Queue()
        self.request: Request | None = None
        self.raw = bytearray()
        self.drain_waiter: asyncio.Future | None = None
        self.reading_paused = False
        self.responder: Responder = None  # type: ignore[assignment]
        self.task: asyncio.Task | None = None
        self.index = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.server.connections += 1
        self.index = self.server.connections
        self.responder = Responder(self)
        self.server._protocols.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())
        self.server._notify()

    def data_received(self, data: bytes) -> None:
        if len(self.raw) < _RAW_LIMIT:
            self.raw += data[: _RAW_LIMIT - len(self.raw)]
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade request: handled as a request; the parser reads nothing after it
        except httptools.HttpParserError as exc:
            self.server.errors.append(exc)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.responder.closed.done():
            self.responder.closed.set_result(None)
        self.queue.put_nowait(None)
        req = self.request
        if req is not None and req._queue is not None and not req.complete:
            req._queue.put_nowait(b"")
        self._wake_drain()
        self.server._protocols.discard(self)
        self.server.disconnects += 1
        self.server._notify()

    def pause_writing(self) -> None:
        self.responder.write_paused.set()
        if self.drain_waiter is None:
            self.drain_waiter = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self.responder.write_paused.clear()
        self._wake_drain()

    def _wake_drain(self) -> None:
        fut, self.drain_waiter = self.drain_waiter, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.request = Request(self.index)

    def on_url(self, url: bytes) -> None:
        self.request.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.request.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self.request
        req.method = self.parser.get_method()
        req.http_version = self.parser.get_http_version()
        if self.server.stream_request_body:
            req._queue = asyncio.Queue()
            req._protocol = self
            req.raw = bytes(self.raw)
            self.server.requests.append(req)
            self.queue.put_nowait(req)
            self.server._notify()

    def on_body(self, data: bytes) -> None:
        req = self.request
        req.body_length += len(data)
        if req._queue is None:
            req._parts.append(data)
            return
        req._queue.put_nowait(data)
        req._queued += len(data)
        if req._queued > _STREAM_PAUSE and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        req = self.request
        req.complete = True
        if req._queue is not None:
            req._queue.put_nowait(b"")
        else:
            req.body = b"".join(req._parts)
            req._parts = []
            req.raw = bytes(self.raw)
            self.server.requests.append(req)
            self.queue.put_nowait(req)
        self.raw = bytearray()
        self.server._notify()

    async def _serve(self) -> None:
        while True:
            req = await self.queue.get()
            if req is None or self.transport.is_closing():
                return
            try:
                await self.server.handler(req, self.responder)
            except Exception as exc:  # recorded; raised when the upstream closes (see UpstreamErrors)
                self.server.errors.append(exc)
                self.transport.abort()
                return
            if req.header(b"connection") == b"close" and not self.transport.is_closing():
                self.transport.close()


class UpstreamErrors(AssertionError):
    """A RawUpstream recorded errors (handler exceptions, unparsable requests) the test did not expect."""


class RawUpstream:
    """Scriptable HTTP/1.1 server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        handler: Handler,
        *,
        stream_request_body: bool = False,
        host: str = "127.0.0.1",
        unix_path: str | None = None,
        expect_errors: bool = False,
        port: int = 0,
        ssl=None,
    ) -> None:
        self.handler = handler
        self.ssl = ssl  # an ssl.SSLContext (server side): serve HTTPS
        self.stream_request_body = stream_request_body
        self.host = host
        self.unix_path = unix_path  # listen on this unix socket file instead of host:port
        self.expect_errors = expect_errors  # errors are part of the test: do not raise them on exit
        self.port = port  # 0: one from the OS (several loopback addresses can share a port given here)
        self.connections = 0
        self.disconnects = 0
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self._reported = False
        self._server: asyncio.Server | None = None
        self._protocols: set[_ServerProtocol] = set()
        self._watchers: list[asyncio.Future] = []

    async def __aenter__(self) -> RawUpstream:
        loop = asyncio.get_running_loop()
        if self.unix_path is not None:
            self._server = await loop.create_unix_server(lambda: _ServerProtocol(self), self.unix_path)
        else:
            self._server = await loop.create_server(
                lambda: _ServerProtocol(self), self.host, self.port, ssl=self.ssl
            )
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self._stop()
        if exc is None:
            self._raise_errors()
        elif self.errors and not self.expect_errors:
            exc.add_note(self._describe_errors())  # the test failed already: keep its error, add ours

    async def close(self) -> None:
        """Stop listening, abort every connection and stop the handlers; then raise
        :class:`UpstreamErrors` if errors were recorded (unless ``expect_errors``)."""
        await self._stop()
        self._raise_errors()

    def _raise_errors(self) -> None:
        if self.errors and not self.expect_errors and not self._reported:
            self._reported = True
            raise UpstreamErrors(self._describe_errors())

    def _describe_errors(self) -> str:
        shown = "".join(
            "".join(traceback.format_exception(error)) if error.__traceback__ else f"{error!r}\n"
            for error in self.errors[:3]
        )
        return (
            f"RawUpstream on port {self.port} recorded {len(self.errors)} error(s) "
            f"(a test provoking them passes expect_errors=True):\n{shown}"
        )

    async def _stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        protocols = list(self._protocols)
        for protocol in protocols:
            protocol.transport.abort()
        tasks = [p.task for p in protocols if p.task is not None and not p.task.done()]
        for task in tasks:
            task.cancel()
        # Aborted transports close their sockets in connection_lost, a loop turn later: wait for
        # it, or a test's loop may close first and leave the sockets to the garbage collector.
        waiting = tasks + [p.responder.closed for p in protocols if not p.responder.closed.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=5)
        await self._server.wait_closed()
        self._server = None

    @property
    def open_connections(self) -> int:
        return self.connections - self.disconnects

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait (at most ``within`` seconds) until ``predicate()`` holds; re-checked on every accept, request, close."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            while not predicate():
                fut = loop.create_future()
                self._watchers.append(fut)
                await fut

    def _notify(self) -> None:
        watchers, self._watchers = self._watchers, []
        for fut in watchers:
            if not fut.done():
                fut.set_result(None)


# -- ready-made handlers ---------------------------------------------------------


def ok(body: bytes = b"ok", *, status: int = 200, headers: Headers = (), chunked: bool = False) -> Handler:
    """Respond with ``body`` (content-length framing unless ``chunked``)."""

    async def handler(req: Request, conn: Responder) -> None:
        await conn.send(status, headers, body, chunked=chunked)

    return handler


def status(code: int, body: bytes = b"", *, headers: Headers = ()) -> Handler:
    """Respond with status ``code``."""
    return ok(body, status=code, headers=headers)


async def echo(req: Request, conn: Responder) -> None:
    """Respond 200 with the request body; method, target and headers (JSON) in x-echo-* headers."""
    headers_json = json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers])
    await conn.send(
        200,
        [
            (b"x-echo-method", req.method),
            (b"x-echo-target", req.target),
            (b"x-echo-headers", headers_json.encode("latin-1")),
        ],
        req.body,
    )


def raw(data: bytes, *, close: bool = False) -> Handler:
    """Send ``data`` verbatim, then close (FIN) if ``close``."""

    async def handler(req: Request, conn: Responder) -> None:
        conn.write(data)
        if close:
            conn.close()

    return handler


async def hang(req: Request, conn: Responder) -> None:
    """Never answer (a black hole that accepted the request)."""
    await conn.hang()


async def reset(req: Request, conn: Responder) -> None:
    """Read the request, then reset the connection (RST)."""
    conn.reset()


async def close(req: Request, conn: Responder) -> None:
    """Read the request, then close the connection (FIN) without answering."""
    conn.close()


def sequence(*handlers: Handler) -> Handler:
    """The n-th request (over all connections) goes to ``handlers[n]``; the last one repeats."""
    count = 0

    async def handler(req: Request, conn: Responder) -> None:
        nonlocal count
        index = min(count, len(handlers) - 1)
        count += 1
        await handlers[index](req, conn)

    return handler


def delayed(seconds: float, handler: Handler) -> Handler:
    """Run ``handler`` after ``seconds`` (server-side latency)."""

    async def wrapper(req: Request, conn: Responder) -> None:
        await asyncio.sleep(seconds)
        await handler(req, conn)

    return wrapper


_REASONS = {
    100: "Continue",
    103: "Early Hints",
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class NeverAccepts:
    """A listening port whose accept queue is full and never drained (added for the fault suite).

    It listens with a backlog of 0 and fills the queue with its own connections, so the
    kernel drops further SYNs: a client's connect neither succeeds nor is refused, it
    times out (an overloaded or wedged host)::

        async with NeverAccepts() as dead:
            ...  # connecting to 127.0.0.1:dead.port hangs until the client's connect timeout
    """

    def __init__(self, fillers: int = 4, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._fillers = fillers
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []

    async def __aenter__(self) -> NeverAccepts:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((self.host, self.port))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        for _ in range(self._fillers):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((self.host, self.port))
            except BlockingIOError:
                pass  # queued, or its SYN is being dropped: either way the queue is full
            self._held.append(s)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for s in self._held:
            s.close()
        if self._listener is not None:
            self._listener.close()
