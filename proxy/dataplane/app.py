"""The data-path ASGI application.

Pure ASGI on purpose (no framework): per request it parses what it needs from
the raw header pairs in one pass, matches a route, runs the route's pipeline
and streams the reply back. Everything else was decided when the policy
loaded (see runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.dataplane.headers import RequestHead, add_forwarding, http_date, new_request_id, response_headers
from proxy.dataplane.paths import normalise_path
from proxy.dataplane.router import host_without_port
from proxy.dataplane.runtime import RouteRuntime, Runtime
from proxy.grpc import request_is_grpc
from proxy.kernel.exchange import (
    BodyTooLarge,
    ClientGone,
    Exchange,
    LocalReply,
    Reply,
    RequestBodyTimeout,
    wait_disconnect,
)
from proxy.kernel.fields import TRAILERS
from proxy.tunnel import Tunnel, TunnelSet
from proxy.upstream import UpstreamError

log = logging.getLogger("fender")

_NO_ROUTE_NAME = "-"
_KNOWN_UPGRADES = frozenset({"websocket"})  # protocol label values besides a route's own list


class ResponseAborted(Exception):
    """The upstream failed after the response head was sent: the server must cut this client connection.

    uvicorn closes the client connection when the application raises after
    the response started; ``quiet_aborts`` keeps that expected case out of the
    error log (it is counted in metrics instead).
    """


class _QuietAborts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ResponseAborted | ClientGone)


def quiet_aborts() -> None:
    logging.getLogger("uvicorn.error").addFilter(_QuietAborts())


class BodyStream:
    """Feeds the client's request body to the upstream client, chunk by chunk.

    ``trailers``: the request's trailer fields once the body ended (Fender's protocols hand them on
    the last message); the upstream client sends them after the body where its framing can carry
    them (chunked HTTP/1.1, HTTP/2)."""

    __slots__ = ("_receive", "_limit", "_idle", "_received", "_done", "trailers")

    def __init__(self, receive, limit: int, idle_timeout: float) -> None:
        self._receive = receive
        self._limit = limit
        self._idle = idle_timeout
        self._received = 0
        self._done = False
        self.trailers: list[tuple[bytes, bytes]] | None = None

    @property
    def done(self) -> bool:
        """The whole body was received (nothing more will be read from the client)."""
        return self._done

    async def __call__(self) -> bytes:
        while not self._done:
            try:
                async with asyncio.timeout(self._idle):
                    message = await self._receive()
            except TimeoutError:
                raise RequestBodyTimeout from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            body = message.get("body", b"")
            self._done = done = not message.get("more_body", False)
            if done:
                self.trailers = message.get(TRAILERS)
            self._received += len(body)
            if self._limit and self._received > self._limit:
                raise BodyTooLarge
            if body:
                return body
        return b""


class BufferedBody:
    """A body read whole that had trailers: sent as a stream of one chunk, so the upstream client
    sends the trailers after it (the same contract as :class:`BodyStream`)."""

    __slots__ = ("_body", "done", "trailers")

    def __init__(self, body: bytes, trailers: list[tuple[bytes, bytes]]) -> None:
        self._body = body
        self.done = True
        self.trailers: list[tuple[bytes, bytes]] | None = trailers

    async def __call__(self) -> bytes:
        body, self._body = self._body, b""
        return body


async def read_body(receive, limit: int, idle_timeout: float, trailers: list | None = None) -> bytes:
    """Read a small request body whole (its Content-Length is already checked); its trailer fields,
    if any came, are added to ``trailers``."""
    parts: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(idle_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                body = message.get("body", b"")
                if body:
                    received += len(body)
                    if limit and received > limit:
                        raise BodyTooLarge
                    parts.append(body)
                if not message.get("more_body", False):
                    if trailers is not None:
                        trailers += message.get(TRAILERS, ())
                    break
    except TimeoutError:
        raise RequestBodyTimeout from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _accepts_trailers(headers: list[tuple[bytes, bytes]]) -> bool:
    """The client sent TE: trailers (RFC 9110 10.1.4); otherwise trailers are dropped (6.5)."""
    for name, value in headers:
        if name == b"te" and value.lower().find(b"trailers") >= 0:
            return True
    return False


# ASGI extension of Fender's own HTTP protocol (proxy/server/protocol.py): the response head
# message may carry the first body part. Other servers (granian) get the standard two messages.
_INLINE_BODY = "fender.response.body"


def _start(status: int, headers, body: bytes, more: bool) -> dict:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": headers,
        "body": body,
        "more_body": more,
    }


_LOOPBACK = ("127.0.0.1", "::1")
_MAX_TRACE = 4096


def _trusted_peer(client, runtime) -> bool:
    """Fender-Explain is honoured from loopback and from server.trusted_proxies only."""
    if not client:
        return False
    peer = client[0]
    return peer in _LOOPBACK or runtime.trusted.trusts(peer)


def _trace_value(trace: list[str]) -> bytes:
    value = "; ".join(trace).encode("latin-1", "replace")
    return value if len(value) <= _MAX_TRACE else value[: _MAX_TRACE - 3] + b"..."


class DataPlane:
    """ASGI callable for the proxy listener. ``runtime`` may be swapped at any time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Open tunnels (upgraded connections) of every runtime: idle checks and shutdown.
        self.tunnels = TunnelSet(runtime.clock)
        self.tunnels.on_sweep = self._report_tunnel_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                # granian's own WebSocket handling (off there): Fender tunnels upgrades only on its
                # own HTTP protocol (the default engine). Refused before any upgrade: a 403.
                await send({"type": "websocket.close", "code": 1008})
            return  # lifespan is off
        runtime = self.runtime
        started = time.perf_counter()
        head = RequestHead(scope["headers"])
        method = scope["method"]
        if head.bad is not None:
            await self._local(
                runtime, None, send, method, LocalReply("bad_request", head.bad, close=True), head, scope
            )
            return
        path = normalise_path(scope.get("raw_path") or scope["path"].encode())
        if path is None:
            reply = LocalReply("bad_request", "request target must be an absolute path", close=True)
            await self._local(runtime, None, send, method, reply, head, scope)
            return
        if head.host is None and scope["http_version"] == "1.1":
            # close: a client this confused about HTTP/1.1 gets no second chance on this connection
            reply = LocalReply("bad_request", "missing Host header", close=True)
            await self._local(runtime, None, send, method, reply, head, scope)
            return
        authority = scope.get("fender.authority")
        if authority is not None and authority != head.host:
            # An absolute-form target naming another host: Fender is not an open proxy.
            reply = LocalReply("bad_request", "absolute-form target for another host", close=True)
            await self._local(runtime, None, send, method, reply, head, scope)
            return
        route = runtime.router.match(method, host_without_port(head.host), path, scope["headers"])
        if route is None:
            runtime.metrics.no_route.inc()
            detail = f"{method} {path.decode('latin-1')[:200]}"
            await self._local(runtime, None, send, method, LocalReply("no_route", detail), head, scope)
            return

        metrics = route.metrics
        metrics.in_flight.inc()
        runtime.active += 1  # a reload retires this runtime only once its requests are done
        try:
            await self._proxy(runtime, route, scope, receive, send, method, path, head, started)
        finally:
            metrics.in_flight.dec()
            runtime.active -= 1
            if runtime.idle_waiter is not None:
                runtime.request_done()

    async def _proxy(self, runtime, route: RouteRuntime, scope, receive, send, method, path, head, started):
        query = scope["query_string"]
        target = path + b"?" + query if query else path
        client = scope.get("client")
        add_forwarding(
            head,
            client[0] if client else None,
            b"https" if scope.get("scheme") == "https" else b"http",
            scope["http_version"],
            runtime.trusted,
        )
        length = head.content_length
        max_body = route.max_body
        if max_body and length is not None and length > max_body:
            await self._local(
                runtime, route, send, method, LocalReply("body_too_large", close=True), head, scope
            )
            return
        body = b""
        body_stream: BodyStream | BufferedBody | None = None
        content_length = None
        if length is None and not head.chunked or length == 0:
            pass
        elif length is not None and length <= route.buffer_limit:
            trailers: list[tuple[bytes, bytes]] = []
            try:
                body = await read_body(receive, max_body, route.idle_timeout, trailers)
            except BodyTooLarge:
                await self._local(
                    runtime, route, send, method, LocalReply("body_too_large", close=True), head, scope
                )
                return
            except RequestBodyTimeout:
                reply = LocalReply("request_body_timeout", close=True)
                await self._local(runtime, route, send, method, reply, head, scope)
                return
            except ClientGone:
                return
            if trailers:  # (an HTTP/2 request with content-length and trailers)
                body_stream, content_length, body = BufferedBody(body, trailers), len(body), b""
        else:
            body_stream = BodyStream(receive, max_body, route.idle_timeout)
            content_length = length

        upgrade = scope.get("fender.upgrade")
        if upgrade is not None:
            # Connection: upgrade with a protocol the client wants to switch to (proxy/tunnel.py).
            protocols = upgrade.protocols
            if not route.upgrades.issuperset(protocols):
                label = protocols[0] if protocols[0] in _KNOWN_UPGRADES else "other"
                route.upgrade_metrics.upgrade(label, "not_allowed").inc()
                reply = LocalReply("upgrade_not_allowed", f"Upgrade: {upgrade.value.decode('latin-1')[:100]}")
                reply.headers.append((b"connection", b"close"))
                await self._local(runtime, route, send, method, reply, head, scope)
                return
            head.forward += ((b"connection", b"upgrade"), (b"upgrade", upgrade.value))
        exchange = Exchange(
            method,
            target,
            head.forward,
            head.host,
            body,
            body_stream,
            content_length,
            head.request_id,
            route.name,
            started,
            head.client,
            scope["headers"],
            runtime.clock.now() + route.timeout,
        )
        if head.deadline_ms is not None and head.deadline_ms < route.timeout * 1000:
            # A calling Fender gives up after this long: never work past that (deadline propagation).
            exchange.deadline = runtime.clock.now() + head.deadline_ms / 1000
        if head.grpc_timeout is not None:
            # A gRPC client's deadline: never past the route's timeout; the time left goes upstream.
            exchange.grpc_deadline = True
            if head.grpc_timeout < exchange.deadline - runtime.clock.now():
                exchange.deadline = runtime.clock.now() + head.grpc_timeout
        if route.explain or (head.explain and _trusted_peer(client, runtime)):
            exchange.trace = []  # layers add entries with ex.note(); sent back as Fender-Trace
        if body_stream is None:
            exchange.receive = receive
        if upgrade is not None:
            exchange.upgrade = upgrade
        if _INLINE_BODY in scope.get("extensions", ()):
            # Fender's own HTTP protocol: it offers fender.response.interim with fender.response.body,
            # so 103 Early Hints and other 1xx are relayed as they arrive (and _respond knows it).
            exchange.interim = send
        rewrite = route.rewrite
        if rewrite is not None:
            # rewrite_prefix: the upstream gets the replacement in place of the matched prefix,
            # normalised again (never `..` or `//`); the cache key and the logs keep the client's.
            prefix, replacement = rewrite
            upstream_path = normalise_path(replacement + path[len(prefix) :]) or replacement
            exchange.upstream_target = upstream_path + b"?" + query if query else upstream_path
            if exchange.trace is not None:
                exchange.note(f"rewrite {path.decode('latin-1')} -> {upstream_path.decode('latin-1')}")
        try:
            answer = await route.pipeline(exchange)
        except ClientGone:
            return
        await self._respond(runtime, route, scope, receive, send, method, answer, exchange, started)

    async def _respond(
        self, runtime, route, scope, receive, send, method, reply: Reply, ex: Exchange, started
    ):
        status = reply.status
        if ex.upgrade is not None and status != 101:
            self._upgrade_refused(route, ex.upgrade, reply)
        if isinstance(reply, LocalReply):
            route.metrics.local(reply.reason).inc()
            if status >= 400 and request_is_grpc(ex.request_headers):
                reply.as_grpc()  # metrics and the access log keep the reply's HTTP status
            headers = reply.headers + [(b"date", http_date()), (b"x-request-id", ex.request_id)]
        else:
            headers = response_headers(reply.headers, ex.request_id)
        if ex.response_headers:
            headers.extend(ex.response_headers)
        if ex.trace is not None:
            headers.append((b"fender-trace", _trace_value(ex.trace)))
        metrics = route.metrics
        metrics.request_counter(method, status).inc()
        metrics.duration.observe(time.perf_counter() - started)
        if runtime.access_log:
            runtime.access_log.write(scope, method, status, reply, ex, started)
        inline = ex.interim is not None  # the server is Fender's own protocol (see _proxy)
        if method == "HEAD" or not reply.has_body():
            if status == 101 and ex.upgrade is not None:
                await self._tunnel(runtime, route, send, reply, ex, headers)
                return
            if method != "HEAD":
                # 204/304 carry no body; an ASGI server may hold a 304's Content-Length against it.
                headers = [h for h in headers if h[0] != b"content-length"]
            reply.close()
            if inline:
                await send(_start(reply.status, headers, b"", False))
                return
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        watcher = None
        try:
            if inline and reply.complete:
                # The whole body is here (the usual small response): head and body in one message.
                # The second read returns b"" without waiting; it is what tells a storing or
                # slot-holding reply that the body ended.
                chunk = await reply.read()
                following = await reply.read()
                if not following and reply.trailers is None:
                    await send(_start(reply.status, headers, chunk, False))
                    return
                await send(_start(reply.status, headers, chunk, True))
                chunk = following
            else:
                await send({"type": "http.response.start", "status": reply.status, "headers": headers})
                chunk = await reply.read()
            while chunk:
                # Each piece leaves as soon as it is here; never wait for the next one first (a
                # stream that goes quiet must not hold its last event). Only a body that has
                # fully arrived is joined into one final message: that read does not wait.
                if reply.complete:
                    following = await reply.read()
                    if not following:
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    chunk = following
                    continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watcher is None:
                    stream = ex.body_stream
                    if stream is not None and not getattr(stream, "done", True):
                        # Still uploading (a bidirectional stream): receive() belongs to the upload,
                        # which notices a client that leaves.
                        pass
                    else:
                        # A long body: notice a client that leaves, so the upstream read stops too.
                        watcher = asyncio.ensure_future(wait_disconnect(receive))
                elif watcher.done():
                    reply.close()
                    return
                chunk = await reply.read()
            trailers = reply.trailers
            if trailers is not None and inline and _accepts_trailers(ex.request_headers):
                # Response trailers for a client that said TE: trailers (Fender's own protocol only).
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
        except UpstreamError as error:
            reply.close()
            if ex.upstream_name is not None:
                upstream = runtime.upstreams[ex.upstream_name]
                upstream.metrics.error(error.reason).inc()
                upstream.faults.report(ex.replica_name or "-", ex.route_name, error, ex.request_id)
            route.metrics.local(error.reason).inc()
            raise ResponseAborted(error.reason) from None
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _tunnel(self, runtime, route: RouteRuntime, send, reply, ex: Exchange, headers) -> None:
        """The upstream switched protocols: relay its 101 and splice the two connections until one ends."""
        offer = ex.upgrade
        assert offer is not None  # only a request that offered to switch protocols gets a 101
        metrics = route.upgrade_metrics
        label = offer.protocols[0] if offer.protocols[0] in route.upgrades else "other"
        upstream_end = reply.upgraded_end
        client_end = offer.client_end
        if upstream_end is None or client_end is None or client_end.lost:
            # The client left, or its request went on past the head (a body) before the switch.
            reply.close()
            metrics.upgrade(label, "failed").inc()
            return
        switched = [h for h in headers if h[0] != b"content-length" and h[0] != b"transfer-encoding"]
        value = next((v for n, v in reply.headers if n == b"upgrade"), offer.value)
        switched += ((b"connection", b"upgrade"), (b"upgrade", value))
        await send({"type": "http.response.start", "status": 101, "headers": switched})
        metrics.upgrade(label, "switched").inc()
        tunnel = Tunnel(client_end, upstream_end, runtime.clock, route.upgrade_idle_timeout)
        tunnel.metrics = metrics
        tunnel.route_name = route.name
        tunnels = self.tunnels
        tunnels.add(tunnel)
        gauge = metrics.open
        gauge.inc()
        # A tunnel is no request in flight: a reload retires this runtime without waiting for it
        # (it keeps what it uses), and in_flight counts requests. Counted back for __call__'s finally.
        route.metrics.in_flight.dec()
        runtime.active -= 1
        if runtime.idle_waiter is not None:
            runtime.request_done()
        try:
            tunnel.start()
            await asyncio.shield(tunnel.done)
        finally:
            # Drain's grace passed (the task is cancelled), the client or the upstream left, or idle.
            tunnel.close("shutdown")
            tunnels.discard(tunnel)
            gauge.dec()
            tunnel.report()
            metrics.closed(runtime.clock.now() - tunnel.started)
            reply.close()
            route.metrics.in_flight.inc()
            runtime.active += 1

    @staticmethod
    def _upgrade_refused(route: RouteRuntime, offer, reply: Reply) -> None:
        label = offer.protocols[0] if offer.protocols[0] in route.upgrades else "other"
        outcome = "failed" if isinstance(reply, LocalReply) else "declined"
        route.upgrade_metrics.upgrade(label, outcome).inc()

    def _report_tunnel_bytes(self) -> None:
        for tunnel in self.tunnels.open:
            tunnel.report()

    async def _local(
        self, runtime: Runtime, route, send, method: str, reply: LocalReply, head: RequestHead, scope: dict
    ):
        request_id = head.request_id or new_request_id()
        if route is None:
            runtime.metrics.local_responses.labels(_NO_ROUTE_NAME, reply.reason).inc()
        else:
            route.metrics.local(reply.reason).inc()
            route.metrics.request_counter(method, reply.status).inc()
        if reply.status >= 400 and request_is_grpc(scope["headers"]):
            reply.as_grpc()  # metrics count the reply's HTTP status
        headers = reply.headers + [(b"date", http_date()), (b"x-request-id", request_id)]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        body = b"" if method == "HEAD" else reply.body
        await send({"type": "http.response.body", "body": body, "more_body": False})
