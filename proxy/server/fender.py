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

import uvicorn

from proxy.admin.app import build_admin_app
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.dataplane.app import DataPlane, quiet_aborts
from proxy.dataplane.runtime import Runtime
from proxy.metrics import Metrics
from proxy.ops.auth import resolve_admin_token
from proxy.ops.checkpoint import Checkpointer
from proxy.ops.history import TrafficHistory
from proxy.ops.preflight import StartupError, bind_listener
from proxy.ops.reload import Reloader, file_sha256
from proxy.server.protocol import FenderHttpProtocol
from proxy.server.tls import HandshakeErrors, ServerTLS, TLSAcceptor
from proxy.upstream.tlscontext import ALPN_H2_HTTP1, ALPN_HTTP1, TLSFileError

log = logging.getLogger("fender")


class _ExitFlag:
    """``should_exit`` (the flag uvicorn's Server and Fender use) backed by an event, so a loop
    waiting for it wakes at once instead of polling."""

    _exit: asyncio.Event

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()


class _GranianServer(_ExitFlag):
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

    async def main_loop(self) -> None:
        await self._exit.wait()

    async def shutdown(self, sockets=None) -> None:
        self._server.stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.config.timeout_graceful_shutdown)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()


class _Server(_ExitFlag, uvicorn.Server):
    """uvicorn's server, stopped on an event instead of its fixed waits.

    uvicorn notices ``should_exit`` on a 0.1 s tick and its shutdown sleeps 0.1 s before it
    looks at what is still open, so every stop paid up to 0.2 s per listener. Here the main
    loop wakes as soon as ``should_exit`` is set, and a shutdown with no request in flight
    closes its idle connections and stops at once; with work in flight it is uvicorn's
    graceful shutdown.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        tls: ServerTLS | None = None,
        header_timeout=None,
        handshake_errors: HandshakeErrors | None = None,
    ) -> None:
        self._exit = asyncio.Event()
        # HTTPS: connections are accepted by a TLSAcceptor (proxy/server/tls.py) in place of
        # asyncio's server; header_timeout() bounds the handshake plus the first request head.
        self.tls = tls
        self._header_timeout = header_timeout
        self._handshake_errors = handshake_errors
        super().__init__(config)

    async def startup(self, sockets=None) -> None:
        if self.tls is None or not sockets:
            await super().startup(sockets)
            return
        await self.lifespan.startup()
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            # As uvicorn's own startup builds its protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        errors = self._handshake_errors or HandshakeErrors()
        # uvicorn only calls close() and wait_closed() of its servers: an acceptor has both.
        acceptors = [
            TLSAcceptor(
                sock,
                create_protocol,
                self.tls,
                self._header_timeout,
                errors,
                config.backlog,
                # uvicorn's limit is max_connections + 1 (see Fender._configs)
                max_pending=lambda: (config.limit_concurrency or 2049) - 1,
            )
            for sock in sockets
        ]
        for acceptor in acceptors:
            await acceptor.start()
        self.servers = acceptors  # type: ignore[assignment]
        self.started = True

    async def _stop_accepting(self) -> None:
        """Stop accepting, then let the connections already accepted reach their protocol.

        asyncio accepts a connection in one loop turn and attaches its transport to the server
        in the next; closing the server in between drops that socket unclosed (CPython 3.11's
        ``Server._attach`` asserts and the error is swallowed). Taking the listeners off the
        selector first, then a few loop turns (accept task, transport, ``connection_made``),
        makes them ordinary connections, which the shutdown below closes or lets finish.
        """
        loop = asyncio.get_running_loop()
        listening = [sock for server in self.servers for sock in getattr(server, "sockets", None) or ()]
        if not listening:
            return
        for sock in listening:
            loop.remove_reader(sock.fileno())
        for _ in range(3):
            await asyncio.sleep(0)

    # Signals are handled once for both listeners by Fender, not by each server.
    def capture_signals(self):
        return contextlib.nullcontext()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            # on_tick refreshes the Date header when counter % 10 == 0 (uvicorn ticks each 0.1 s):
            # here one tick a second, or at once when should_exit is set.
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._exit.wait()

    async def shutdown(self, sockets=None) -> None:
        state = self.server_state
        await self._stop_accepting()
        for server in self.servers:
            server.close()
        if state.connections and not state.tasks:
            # Only idle keep-alive connections: asked to shut down they close at once, which
            # takes a loop turn or two (bounded here), not uvicorn's 0.1 s.
            for connection in list(state.connections):
                connection.shutdown()
            for _ in range(10):
                if not state.connections:
                    break
                await asyncio.sleep(0)
        if state.connections or state.tasks:
            await super().shutdown(sockets)
            return
        for sock in sockets or []:
            sock.close()
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


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
        self.protocol = FenderHttpProtocol.for_listener()  # this Fender's own limits
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
        self.tls: ServerTLS | None = None  # server.tls as a context, watched (None: plain HTTP)
        self.admin_tls: ServerTLS | None = None
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
        # New client connections read these (this Fender's protocol class attributes).
        self.protocol.configure(policy.server, self.metrics)

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
            http=self.protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            # Fender decides whom to trust for X-Forwarded-* itself (server.trusted_proxies).
            proxy_headers=False,
            server_header=False,
            # The data plane passes the upstream's Date and adds one only when missing (RFC 9110 6.6.1).
            date_header=False,
            # keepalive_timeout and the other connection limits: self.protocol.configure().
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

        Raises :class:`~proxy.ops.preflight.StartupError` (one line saying what failed) when the
        admin token cannot be read (before binding anything) or a listener cannot bind.
        """
        policy = self.policy
        self.admin_token = resolve_admin_token(policy)
        # The data listener offers h2 first in ALPN when HTTP/2 is on (the protocol switches on
        # selected_alpn_protocol(), server/protocol.py); the admin listener stays HTTP/1.1.
        data_alpn = ALPN_H2_HTTP1 if policy.server.http2.enabled else ALPN_HTTP1
        self.tls = self._server_tls(policy.server.tls, ("server", "tls"), "proxy", data_alpn)
        self.admin_tls = self._server_tls(getattr(policy, "admin_tls", None), ("admin_tls",), "admin")
        if self.checkpointer is not None:
            self.checkpointer.restore(self.runtime)
        data_sock = data_sock or bind_listener(bind_socket, policy.listen, "proxy listener", ("listen",))
        if admin_sock is None:
            try:
                admin_sock = bind_listener(bind_socket, policy.admin, "admin listener", ("admin",))
            except Exception:
                data_sock.close()  # nothing is left bound when start fails
                raise
        await self.runtime.start()
        self.data_port = data_sock.getsockname()[1]
        self.admin_port = admin_sock.getsockname()[1]
        for index, (config, sock) in enumerate(zip(self._configs(), (data_sock, admin_sock), strict=True)):
            server: _GranianServer | _Server
            if index == 0 and self.engine == "granian":
                # granian binds by itself: hand it the address and free the socket we were given.
                host, port = sock.getsockname()[:2]
                sock.close()
                server = _GranianServer(self.dataplane, host, port, policy.server)
            else:
                config.load()
                tls = self.tls if index == 0 else self.admin_tls
                server = _Server(
                    config,
                    tls,
                    header_timeout=lambda: self.protocol.header_timeout,
                    handshake_errors=HandshakeErrors(
                        self.metrics.tls_handshake_errors, "proxy" if index == 0 else "admin"
                    ),
                )
                server.lifespan = config.lifespan_class(config)
                if tls is not None:
                    tls.start()
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
            "proxy on %s://%s:%d, admin on %s://%s:%d, policy %s",
            "http" if self.tls is None else "https",
            policy.listen.host,
            self.data_port,
            "http" if self.admin_tls is None else "https",
            policy.admin.host,
            self.admin_port,
            self.source or "-",
        )

    def refresh_tls(self, policy) -> None:
        """On a reload (its files checked already): re-read changed certificate files, take a changed
        server.tls block; upstream TLS settings of a kept upstream re-read their files too."""
        if self.tls is not None and policy.server.tls is not None:
            try:
                self.tls.update(policy.server.tls)
            except TLSFileError as exc:
                log.error("server.tls: %s; the previous settings stay", exc)
        if self.admin_tls is not None:
            self.admin_tls.refresh()
        for upstream in self.runtime.upstreams.values():
            if upstream.tls is not None:
                upstream.tls.refresh()

    def _server_tls(
        self, options, at: tuple[str, ...], listener: str, alpn: tuple[str, ...] = ("http/1.1",)
    ) -> ServerTLS | None:
        """A listener's TLS context from its block, or None; a file that cannot be used is a StartupError."""
        if options is None:
            return None
        counter = self.metrics.tls_certificate_reloads
        try:
            return ServerTLS(
                options, ".".join(at), alpn, on_rotate=lambda result: counter.labels(listener, result).inc()
            )
        except TLSFileError as exc:
            raise StartupError(str(exc), (*at, exc.field)) from None

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
        for tls in (self.tls, self.admin_tls):
            if tls is not None:
                await tls.close()
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
