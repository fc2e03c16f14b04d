"""Running Fender: the data listener (uvicorn, raw ASGI) and the admin listener.

Both listeners share one event loop and one process: the breakers, buckets
and caches the admin API shows are the very objects the data path uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from types import SimpleNamespace

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.admin.app import build_admin_app
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.dataplane.app import DataPlane, quiet_aborts
from proxy.dataplane.runtime import Runtime
from proxy.metrics import Metrics
from proxy.ops.auth import resolve_admin_token
from proxy.ops.checkpoint import Checkpointer
from proxy.ops.history import TrafficHistory
from proxy.ops.reload import Reloader, file_sha256

log = logging.getLogger("fender")


class _HeadRejected(Exception):
    """Raised from a parser callback to stop parsing; ``_reject`` holds the answer."""


# Answers to requests refused while parsing the head: status line, reason, body.
_HEAD_ERRORS = {
    "header_too_large": (b"HTTP/1.1 431 Request Header Fields Too Large\r\n", b"request head too large"),
    # 414 keeps the reason header_too_large (the request line is part of the head).
    "uri_too_long": (b"HTTP/1.1 414 URI Too Long\r\n", b"request target too long"),
    "bad_request": (b"HTTP/1.1 400 Bad Request\r\n", b"malformed request"),
    "underscore_header": (
        b"HTTP/1.1 400 Bad Request\r\n",
        b"header names with underscores are refused",
    ),
    "header_timeout": (b"HTTP/1.1 408 Request Timeout\r\n", b"the request head did not arrive in time"),
    "unsupported_transfer_coding": (
        b"HTTP/1.1 501 Not Implemented\r\n",
        b"only the chunked transfer coding is supported",
    ),
    "http_version": (b"HTTP/1.1 505 HTTP Version Not Supported\r\n", b"only HTTP/1.0 and 1.1 are served"),
}
_REASON = {"uri_too_long": "header_too_large"}
_HEAD_ERROR_RESPONSES = {
    reason: b"".join(
        [
            status_line,
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % (len(text) + 9),
            b"x-fender-error: %s\r\n" % _REASON.get(reason, reason).encode(),
            b"connection: close\r\n\r\n",
            b"fender: %s\n" % text,
        ]
    )
    for reason, (status_line, text) in _HEAD_ERRORS.items()
}
_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})
_LINGER_SECONDS = 2.0  # longest wait for a refused client to stop sending (NGINX lingering_timeout 5s)
_UNDERSCORE_ACTIONS = {"allow": 0, "drop": 1, "reject": 2}


class CorkedTransport:
    """Coalesces the writes of one event-loop turn into one system call.

    uvicorn writes a response head and its body separately; for the common
    small response that is two ``write`` system calls where one will do.
    Writes are buffered and flushed once at the end of the current loop turn
    (``call_soon``), so nothing waits longer than that; everything else is
    passed to the real transport.
    """

    __slots__ = ("_transport", "_buffer", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._buffer: list[bytes] = []
        self._loop = loop

    def write(self, data: bytes) -> None:
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(data)

    def _flush(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        self._buffer = []
        if self._transport.is_closing():
            return
        self._transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._buffer))

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class FenderHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, hardened for the edge of a service.

    llhttp (under httptools, strict mode) already refuses with 400: Content-Length
    together with Transfer-Encoding, duplicate or non-numeric Content-Length,
    a Transfer-Encoding whose last coding is not chunked, obs-fold, control
    bytes and bare CR/LF in header lines, and bad chunk sizes; uvicorn then
    closes the connection. This class adds what neither does:

    - bounded request heads: ``max_request_line`` (414), ``max_header_bytes``
      and ``max_header_count`` (431), counted in the parser callbacks;
    - ``header_timeout`` (408): from the connection opening, or the first byte
      of a further request, until the head is complete (uvicorn has none, so a
      client could hold a connection by sending nothing or a byte a minute);
    - ``send_timeout``: a client that leaves the response unread (writes
      paused by flow control) for that long is cut;
    - ``max_requests_per_connection``: the last one is answered with
      ``Connection: close``;
    - header names with ``_``: dropped, refused (400) or allowed;
    - chunked trailer fields are dropped, never merged into the header list;
    - a Transfer-Encoding other than exactly ``chunked`` (e.g. ``gzip,
      chunked``, which llhttp accepts) gets 501, and Transfer-Encoding in an
      HTTP/1.0 request 400 (RFC 9112 6.1: its framing is faulty); HTTP
      versions other than 1.0/1.1 (0.9, 2.0 over text) get 505;
    - CONNECT (any target form) gets 400: Fender is no tunnel;
    - absolute-form targets: the authority is recorded so the data plane can
      refuse targets for other hosts.

    Every refusal closes the connection and is counted in
    ``fender_local_responses_total{route="-"}``. The class attributes are set
    from the policy by :meth:`configure`.
    """

    max_header_bytes = 32 * 1024
    max_header_count = 100
    max_request_line = 8 * 1024
    header_timeout = 10.0
    send_timeout = 60.0
    max_requests_per_connection = 1000
    underscores = 1  # _UNDERSCORE_ACTIONS
    rejected: dict = {}  # reason -> pre-bound counter child

    _head_bytes = 0
    _head_count = 0
    _url_bytes = 0
    _reject = ""
    _transfer_encoding: bytes | None = None
    _head_timer = None
    _send_timer = None
    _served = 0
    _unstarted: asyncio.Task | None = None
    _linger_timer = None
    _in_trailers = False
    _active = None  # the cycle whose app task runs
    _discard = False  # malformed input while a response was being written: close after it

    @classmethod
    def configure(cls, server, metrics: Metrics) -> None:
        """Take the limits from ``policy.server`` and bind the rejection counters once."""
        cls.max_header_bytes = server.max_header_bytes
        cls.max_header_count = server.max_header_count
        cls.max_request_line = server.max_request_line
        cls.header_timeout = server.header_timeout
        cls.send_timeout = server.send_timeout
        cls.max_requests_per_connection = server.max_requests_per_connection
        cls.underscores = _UNDERSCORE_ACTIONS[server.headers_with_underscores]
        cls.rejected = {
            reason: metrics.local_responses.labels("-", _REASON.get(reason, reason))
            for reason in _HEAD_ERRORS
        }

    # -- connection events

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, minus its warning log line per malformed request (a log flood
        # any client could trigger); refusals are counted in metrics instead.
        if self._linger_timer is not None or self._discard:
            return  # refused connection closing: discard
        self._unset_keepalive_if_required()
        # Between requests (or before the first): bytes start a new head, time it.
        # (Blank lines before a request line never reach on_message_begin.)
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade (websocket, h2c) is not offered: the Upgrade header was dropped
            # as hop-by-hop and the request is served as plain HTTP/1.1. The parser
            # reads no further requests after an upgrade, so close after this one.
            if self.cycle is not None:
                self.cycle.keep_alive = False
        except httptools.HttpParserError:
            self.send_400_response("")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        # The client has not read for send_timeout: drop it, the app's send() sees a disconnect.
        self.transport.abort()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is incomplete while an earlier request is served:
            # finish that one, then close instead of writing 408 into its response.
            self.cycle.keep_alive = False
            return
        self._reject = "header_timeout"
        self.send_400_response("")

    # -- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm_head_timer()
        self._head_bytes = 0
        self._head_count = 0
        self._url_bytes = 0
        self._transfer_encoding = None
        self._in_trailers = False

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        self._head_bytes += len(url)
        if self._url_bytes > self.max_request_line or self._head_bytes > self.max_header_bytes:
            self._reject = "uri_too_long"
            raise _HeadRejected
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._head_count += 1
        if self._head_bytes > self.max_header_bytes or self._head_count > self.max_header_count:
            self._reject = "header_too_large"
            raise _HeadRejected
        if self._in_trailers:
            # Chunked trailer fields: llhttp reports them like headers and uvicorn would
            # append them to the header list the app reads (when the head and trailers
            # arrive together). They are never merged into the head (RFC 9110 6.5.1)
            # nor forwarded.
            return
        name = name.lower()
        if b"_" in name and self.underscores:
            if self.underscores == 2:
                self._reject = "underscore_header"
                raise _HeadRejected
            return  # dropped (NGINX underscores_in_headers off)
        if name == b"transfer-encoding":
            self._transfer_encoding = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._in_trailers = True
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._reject = "http_version"
            raise _HeadRejected
        if self.parser.get_method() == b"CONNECT":
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
        url = self.url
        if url[:1] != b"/" and url != b"*":
            # Absolute-form (RFC 9112 3.2.2): remember the authority it names,
            # so the data plane can refuse targets for other hosts.
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                parsed = None
            if parsed is not None and parsed.host:
                authority = parsed.host if parsed.port is None else b"%s:%d" % (parsed.host, parsed.port)
                self.scope["fender.authority"] = authority
        super().on_headers_complete()
        self._served += 1
        if self._served >= self.max_requests_per_connection and self.cycle is not None:
            self.cycle.keep_alive = False  # uvicorn answers with Connection: close, then closes

    def _start_asgi_task(self, cycle, app) -> None:
        # uvicorn's, keeping the task until it starts running: a body error found in
        # the same read as the head (a bad chunk size) cancels it before it forwards anything.
        task = self.loop.create_task(self._run_asgi(cycle, app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        self._unstarted = task

    async def _run_asgi(self, cycle, app) -> None:
        if self._unstarted is asyncio.current_task():
            self._unstarted = None
        self._active = cycle
        try:
            await cycle.run_asgi(app)
        finally:
            if self._active is cycle:
                self._active = None

    def send_400_response(self, msg: str) -> None:
        reason = self._reject or "bad_request"
        self._cancel_head_timer()
        if self._unstarted is not None:
            self._unstarted.cancel()
            self._unstarted = None
        counter = self.rejected.get(reason)
        if counter is not None:
            counter.inc()
        if self.transport.is_closing() or self._linger_timer is not None or self._discard:
            return
        active = self._active
        if active is not None and active.response_started and not active.response_complete:
            # An earlier request's response is being written: never put a 400 in the
            # middle of it. Serve nothing more, read nothing more, close after it.
            self._discard = True
            self.pipeline.clear()
            active.keep_alive = False
            return
        self.transport.write(_HEAD_ERROR_RESPONSES[reason])
        # Lingering close (as NGINX): send FIN after the answer and discard what the
        # client still sends for a moment. Closing at once would make the kernel answer
        # that unread data with RST, and the RST destroys the 4xx before the client reads it.
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.close()
            return
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(_LINGER_SECONDS, self.transport.close)


class _GranianServer:
    """The data listener on granian's embedded server, behind the interface Fender uses for uvicorn.

    granian runs the HTTP/1.1 protocol in Rust and calls the same ASGI
    application; it binds its own socket, so it takes a host and port.
    """

    def __init__(self, app, host: str, port: int, server_options) -> None:
        from granian.constants import HTTPModes, Interfaces
        from granian.server.common import HTTP1Settings
        from granian.server.embed import Server

        self.host = host
        self.port = port
        self._exit = asyncio.Event()
        self.force_exit = False
        self.config = SimpleNamespace(timeout_graceful_shutdown=30.0)
        self._server = Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.ASGINL,
            http=HTTPModes.http1,
            websockets=False,
            log_enabled=False,
            backlog=1024,
            http1_settings=HTTP1Settings(
                header_read_timeout=int(server_options.header_timeout * 1000),
                keep_alive=True,
                max_buffer_size=max(server_options.max_header_bytes, 65536),
            ),
        )
        self._task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._task = asyncio.ensure_future(self._server.serve())
        deadline = asyncio.get_running_loop().time() + 10.0
        while True:  # bounded: granian binds in its own startup; wait until it accepts
            if self._task.done():
                self._task.result()
                raise RuntimeError("granian stopped during startup")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"granian did not listen on {self.host}:{self.port}") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()

    async def main_loop(self) -> None:
        await self._exit.wait()

    async def shutdown(self, sockets=None) -> None:
        self._server.stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.config.timeout_graceful_shutdown)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()


class _Server(uvicorn.Server):
    # Signals are handled once for both listeners by Fender, not by each server.
    def capture_signals(self):
        return contextlib.nullcontext()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (accepted
    # ones copy the listener's), else a head and body written apart wait ~40ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Fender:
    """One Fender instance: data plane + admin listener, started and stopped together.

    Lifecycle: :meth:`start`; then :meth:`run_until_signalled` (SIGHUP reloads,
    SIGTERM drains, SIGINT drains without the delay) or :meth:`stop`. The
    running policy changes through :attr:`reloader` (see proxy/ops/reload.py),
    which builds a new Runtime and calls :meth:`swap`.
    """

    def __init__(
        self,
        policy,
        source: str = "",
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        engine: str | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        # The data listener's HTTP server: the policy's server.engine unless the command line says otherwise.
        self.engine = engine or policy.server.engine
        self.policy = policy
        self.started_policy = policy  # what the listeners were set up with
        self.source = source
        self.clock = clock
        self._apply_listener_limits(policy)
        self.runtime = Runtime(policy, self.metrics, source, clock)
        self.dataplane = DataPlane(self.runtime)
        self.metrics.policy.info(
            {"source": source or "-", "version": str(policy.version), "engine": self.engine}
        )
        self.reloader = Reloader(self, file_sha256(source) if source else None)
        self.checkpointer = (
            Checkpointer(policy.checkpoint, self.metrics, lambda: self.runtime, clock)
            if policy.checkpoint is not None
            else None
        )
        self.draining = False
        self.admin_token: str | None = None
        # Recent per-route traffic for the status page (sampled off the request path).
        self.history = TrafficHistory(self.metrics, clock, ticker=SYSTEM_CLOCK)
        self.admin_app = build_admin_app(self)
        self._servers: list[_Server | _GranianServer] = []
        self._tasks: list[asyncio.Task] = []
        self._drain_task: asyncio.Task | None = None
        self._skip_delay = asyncio.Event()
        self._finished = False
        self._running = False  # start() finished: signals act at once instead of waiting
        self._signals_installed = False
        self._early_signals: list[tuple] = []
        self.data_port = 0
        self.admin_port = 0
        quiet_aborts()

    def _apply_listener_limits(self, policy) -> None:
        # New client connections read these (the protocol class attributes).
        FenderHttpProtocol.configure(policy.server, self.metrics)

    def swap(self, runtime: Runtime) -> Runtime:
        """Make ``runtime`` serve new requests; returns the previous one (still serving its requests)."""
        old = self.runtime
        self.runtime = runtime
        self.dataplane.runtime = runtime  # the atomic switch: read once per request
        self.policy = runtime.policy
        self._apply_listener_limits(runtime.policy)
        self.metrics.policy.info(
            {"source": self.source or "-", "version": str(runtime.policy.version), "engine": self.engine}
        )
        return old

    def _configs(self) -> tuple[uvicorn.Config, uvicorn.Config]:
        server = self.policy.server
        data = uvicorn.Config(
            self.dataplane,
            loop="none",
            http=FenderHttpProtocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            # Fender decides whom to trust for X-Forwarded-* itself (server.trusted_proxies).
            proxy_headers=False,
            server_header=False,
            # The data plane passes the upstream's Date and adds one only when missing (RFC 9110 6.6.1).
            date_header=False,
            timeout_keep_alive=max(1, round(server.keepalive_timeout)),
            # uvicorn refuses once len(connections) >= limit, counting the new one: +1 serves max_connections.
            limit_concurrency=server.max_connections + 1,
            timeout_graceful_shutdown=self.policy.drain.timeout,
        )
        admin = uvicorn.Config(
            self.admin_app,
            loop="none",
            http="httptools",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        return data, admin

    async def start(
        self, data_sock: socket.socket | None = None, admin_sock: socket.socket | None = None
    ) -> None:
        """Bind (unless sockets are given), start both listeners, return once they accept.

        Raises :class:`~proxy.ops.auth.AdminAuthError` before binding anything
        when the admin listener would be reachable beyond loopback without a token.
        """
        policy = self.policy
        self.admin_token = resolve_admin_token(policy)
        if self.checkpointer is not None:
            self.checkpointer.restore(self.runtime)
        data_sock = data_sock or bind_socket(policy.listen.host, policy.listen.port)
        admin_sock = admin_sock or bind_socket(policy.admin.host, policy.admin.port)
        await self.runtime.start()
        self.data_port = data_sock.getsockname()[1]
        self.admin_port = admin_sock.getsockname()[1]
        for index, (config, sock) in enumerate(zip(self._configs(), (data_sock, admin_sock), strict=True)):
            if index == 0 and self.engine == "granian":
                # granian binds by itself: hand it the address and free the socket we were given.
                host, port = sock.getsockname()[:2]
                sock.close()
                server = _GranianServer(self.dataplane, host, port, policy.server)
            else:
                config.load()
                server = _Server(config)
                server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
            self._servers.append(server)
            self._tasks.append(asyncio.ensure_future(self._run(server)))
        self.reloader.start()
        if self.checkpointer is not None:
            self.checkpointer.start()
        self.history.start()
        self._running = True
        for action, args in self._early_signals:  # signals that arrived while starting
            action(*args)
        self._early_signals.clear()
        log.info(
            "proxy on %s:%d, admin on %s:%d, policy %s",
            policy.listen.host,
            self.data_port,
            policy.admin.host,
            self.admin_port,
            self.source or "-",
        )

    @staticmethod
    async def _run(server: _Server | _GranianServer) -> None:
        await server.main_loop()
        await server.shutdown()

    def request_stop(self) -> None:
        for server in self._servers:
            server.should_exit = True

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        """Stop at once (no drain delay): listeners close, in-flight requests get drain.timeout."""
        self.request_stop()
        await self.wait()
        await self._finish()

    async def _finish(self) -> None:
        """After the listeners stopped: background work, last checkpoint, close the runtime."""
        if self._finished:
            return
        self._finished = True
        await self.history.stop()
        await self.reloader.stop()
        if self.checkpointer is not None:
            await self.checkpointer.stop()
            await self.checkpointer.write()
        await self.runtime.close()

    # -- drain ---------------------------------------------------------------------

    def begin_drain(self, delay: float | None = None) -> None:
        """Start draining (SIGTERM); a second call skips what is left of the delay."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain(delay))
        elif not self._skip_delay.is_set():
            self._skip_delay.set()
        else:
            # A third signal: stop waiting for in-flight requests (uvicorn then cancels them).
            log.warning("forced stop: in-flight requests are cut")
            for server in self._servers:
                server.force_exit = True

    async def drain(self, delay: float | None = None) -> None:
        """Readiness 503 now; serve for ``drain.delay``; close the listener; wait for in-flight requests."""
        options = self.policy.drain
        delay = options.delay if delay is None else delay
        self.draining = True
        self.metrics.draining.set(1)
        log.info(
            "draining: /readyz is 503; still serving for %.1fs, then up to %.1fs for in-flight requests",
            delay,
            options.timeout,
        )
        if delay > 0 and not self._skip_delay.is_set():
            sleeper = asyncio.ensure_future(self.clock.sleep(delay))
            skipper = asyncio.ensure_future(self._skip_delay.wait())
            await asyncio.wait((sleeper, skipper), return_when=asyncio.FIRST_COMPLETED)
            for task in (sleeper, skipper):
                task.cancel()
        data, admin = self._servers
        data.config.timeout_graceful_shutdown = options.timeout
        data.should_exit = True
        await self._tasks[0]
        log.info("drained: no request in flight; stopping")
        admin.should_exit = True

    def request_reload(self) -> None:
        asyncio.ensure_future(self.reloader.reload("signal"))

    def install_signal_handlers(self) -> None:
        """SIGTERM drains, SIGINT drains without the delay, SIGHUP reloads.

        Call before :meth:`start`: the listeners accept connections before start
        returns, and a SIGHUP with no handler would end the process. A signal that
        arrives while starting is acted on once start is done.
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_signal, self.begin_drain, ())
        loop.add_signal_handler(signal.SIGINT, self._on_signal, self.begin_drain, (0.0,))
        loop.add_signal_handler(signal.SIGHUP, self._on_signal, self.request_reload, ())
        self._signals_installed = True

    def _on_signal(self, action, args: tuple) -> None:
        if self._running:
            action(*args)
        else:
            self._early_signals.append((action, args))

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._signals_installed:
            self.install_signal_handlers()
        try:
            await self.wait()
            await self._finish()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
