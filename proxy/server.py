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
from proxy.ops.reload import Reloader, file_sha256

log = logging.getLogger("fender")


class _HeadTooLarge(Exception):
    pass


_HEAD_ERRORS = {
    414: b"HTTP/1.1 414 URI Too Long\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}


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

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class FenderHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with request-head limits and absolute-form detection.

    uvicorn does not bound the request head, so a client could send headers
    until memory runs out. Counting bytes in the parser callbacks stops it at
    ``max_header_bytes`` (431, or 414 for the target alone) and
    ``max_header_count`` (431). The class attributes are set from the policy.
    """

    max_header_bytes = 32 * 1024
    max_header_count = 100

    _head_bytes = 0
    _head_count = 0
    _head_error = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_count = 0
        self._head_error = 0

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.max_header_bytes:
            self._head_error = 414
            raise _HeadTooLarge
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._head_count += 1
        if self._head_bytes > self.max_header_bytes or self._head_count > self.max_header_count:
            self._head_error = 431
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
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

    def send_400_response(self, msg: str) -> None:
        status = self._head_error
        if not status:
            super().send_400_response(msg)
            return
        body = b"fender: request head too large\n"
        self.transport.write(
            b"".join(
                [
                    _HEAD_ERRORS[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"x-fender-error: header_too_large\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()


class _Server(uvicorn.Server):
    # Signals are handled once for both listeners by Fender, not by each server.
    def capture_signals(self):
        return contextlib.nullcontext()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
        self, policy, source: str = "", metrics: Metrics | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.metrics = metrics or Metrics()
        self.policy = policy
        self.started_policy = policy  # what the listeners were set up with
        self.source = source
        self.clock = clock
        self._apply_listener_limits(policy)
        self.runtime = Runtime(policy, self.metrics, source, clock)
        self.dataplane = DataPlane(self.runtime)
        self.metrics.policy.info({"source": source or "-", "version": str(policy.version)})
        self.reloader = Reloader(self, file_sha256(source) if source else None)
        self.checkpointer = (
            Checkpointer(policy.checkpoint, self.metrics, lambda: self.runtime, clock)
            if policy.checkpoint is not None
            else None
        )
        self.draining = False
        self.admin_token: str | None = None
        self.admin_app = build_admin_app(self)
        self._servers: list[_Server] = []
        self._tasks: list[asyncio.Task] = []
        self._drain_task: asyncio.Task | None = None
        self._skip_delay = asyncio.Event()
        self._finished = False
        self.data_port = 0
        self.admin_port = 0
        quiet_aborts()

    @staticmethod
    def _apply_listener_limits(policy) -> None:
        # New client connections read these (the protocol class attributes).
        FenderHttpProtocol.max_header_bytes = policy.server.max_header_bytes
        FenderHttpProtocol.max_header_count = policy.server.max_header_count

    def swap(self, runtime: Runtime) -> Runtime:
        """Make ``runtime`` serve new requests; returns the previous one (still serving its requests)."""
        old = self.runtime
        self.runtime = runtime
        self.dataplane.runtime = runtime  # the atomic switch: read once per request
        self.policy = runtime.policy
        self._apply_listener_limits(runtime.policy)
        self.metrics.policy.info({"source": self.source or "-", "version": str(runtime.policy.version)})
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
            limit_concurrency=server.max_connections,
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
        for config, sock in zip(self._configs(), (data_sock, admin_sock), strict=True):
            config.load()
            server = _Server(config)
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
            self._servers.append(server)
            self._tasks.append(asyncio.ensure_future(self._run(server)))
        self.reloader.start()
        if self.checkpointer is not None:
            self.checkpointer.start()
        log.info(
            "proxy on %s:%d, admin on %s:%d, policy %s",
            policy.listen.host,
            self.data_port,
            policy.admin.host,
            self.admin_port,
            self.source or "-",
        )

    @staticmethod
    async def _run(server: _Server) -> None:
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

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain)
        loop.add_signal_handler(signal.SIGINT, self.begin_drain, 0.0)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
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
