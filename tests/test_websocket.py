"""WebSocket (and any Upgrade protocol) through Fender: a real websockets server and client.

The server is the `websockets` package on a free loopback port; the client
connects to Fender, whose route allows (or not) the upgrade. Tunnels are
byte splices, so the frames the client and server exchange are theirs, not
Fender's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy.clock import ManualClock
from proxy.config import load_policy
from proxy.server.fender import Fender, bind_socket
from tests.conftest import ROOT, free_port, policy_text, wait_port
from tests.support.procs import wait_until
from tests.support.raw_upstream import RawUpstream, status

_LIMIT = 10.0  # bound on every wait in this file; the pass case takes milliseconds


class WsServer:
    """A websockets echo server on 127.0.0.1; the message "close-please" makes it close with code 4000."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = asyncio.Event()
        self.handlers: list = []

    async def handler(self, ws) -> None:
        self.connections += 1
        self.handlers.append(ws)
        try:
            async for message in ws:
                if message == "close-please":
                    await ws.close(code=4000, reason="server says bye")
                    return
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def __aenter__(self) -> WsServer:
        self._server = await serve(self.handler, "127.0.0.1", 0, max_size=32 * 1024 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()


def _policy(port: int, routes: str = "", server: str = "") -> str:
    return policy_text(
        port,
        routes
        or """
        - name: live
          match: {path_prefix: /ws}
          upstream: echo
        - name: plain
          match: {path_prefix: /plain}
          upstream: echo
          upgrades: []
        """,
        server=server,
    )


_HANDSHAKE = (
    b"GET /ws/x HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def _response_head(port: int, request: bytes) -> bytes:
    """Send ``request`` on a new connection and return the response head (the connection is closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(_LIMIT):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def _metrics(fender) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(fender.admin_url + "/metrics")).text


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}}")


async def test_text_and_binary_frames_echo_through_a_tunnel(start_fender):
    async with WsServer() as server:
        fender = await start_fender(_policy(server.port))
        async with asyncio.timeout(_LIMIT):
            async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/echo") as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
                await ws.send(b"\x00\x01\xfe\xff")
                assert await ws.recv() == b"\x00\x01\xfe\xff"
                for i in range(50):
                    await ws.send(f"message {i}")
                    assert await ws.recv() == f"message {i}"
                text = await _metrics(fender)
                assert _metric(text, "fender_tunnels_open", route="live") == 1
                async with httpx.AsyncClient() as client:
                    status = (await client.get(fender.admin_url + "/admin/status")).json()
                by_route = {r["name"]: r["open_tunnels"] for r in status["routes"]}
                assert by_route == {"live": 1, "plain": 0}
            await server.closed.wait()
        text = await _metrics(fender)
        assert (
            _metric(text, "fender_upgrades_total", route="live", protocol="websocket", outcome="switched")
            == 1
        )
        assert server.connections == 1


async def test_a_16_mib_message_crosses_with_bounded_memory_in_fender(fender_process):
    """Backpressure both ways: a 16 MiB message is relayed without Fender ever holding it.

    Fender runs as its own process so its peak RSS can be read; a Fender that buffered the
    message (once each way) would grow by at least 16 MiB.
    """
    async with WsServer() as server:
        port = free_port()
        text = _policy(server.port).replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
        fender = fender_process(text)
        await asyncio.to_thread(fender.start, port)
        payload = os.urandom(16 * 1024 * 1024)
        async with asyncio.timeout(60):
            async with connect(f"ws://127.0.0.1:{port}/ws/big", max_size=32 * 1024 * 1024) as ws:
                await ws.send(b"warm-up" * 1000)  # the tunnel's own code paths allocated once
                assert len(await ws.recv()) == 7000
                before = fender.peak_rss_mib()
                await ws.send(payload)
                echoed = await ws.recv()
                after = fender.peak_rss_mib()
        assert echoed == payload
        assert after - before < 6, f"Fender's peak RSS grew {after - before:.1f} MiB for a 16 MiB message"


async def test_server_initiated_close_reaches_the_client(start_fender):
    async with WsServer() as server:
        fender = await start_fender(_policy(server.port))
        async with asyncio.timeout(_LIMIT):
            async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/x") as ws:
                await ws.send("close-please")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
        assert closed.value.rcvd.code == 4000
        assert closed.value.rcvd.reason == "server says bye"


async def test_client_close_reaches_the_server_and_frees_the_upstream_connection(start_fender):
    async with WsServer() as server:
        fender = await start_fender(_policy(server.port))
        async with asyncio.timeout(_LIMIT):
            async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/x") as ws:
                await ws.send("one")
                assert await ws.recv() == "one"
            await server.closed.wait()
            pool = fender.runtime.upstreams["echo"].replicas[0].pool
            # The upstream side's close is processed a few loop turns after the server's handler ends.
            await wait_until(lambda: pool.in_use == 0, what="the tunnel's pool slot freed")
        assert pool.in_use == 0 and pool.idle == 0  # a tunnel's connection never returns to the pool
        text = await _metrics(fender)
        assert _metric(text, "fender_tunnels_open", route="live") == 0
        assert _metric(text, "fender_tunnel_duration_seconds_count", route="live") == 1


async def test_upstream_killed_mid_tunnel_closes_the_client_and_spares_others(start_fender):
    async with WsServer() as server:
        fender = await start_fender(_policy(server.port))
        async with asyncio.timeout(_LIMIT):
            other = await connect(f"ws://127.0.0.1:{fender.data_port}/ws/other")
            victim = await connect(f"ws://127.0.0.1:{fender.data_port}/ws/victim")
            await victim.send("ping")
            assert await victim.recv() == "ping"
            # Kill the victim's server side abruptly (no close frame): its TCP connection is reset.
            server.handlers[1].transport.abort()
            with pytest.raises(ConnectionClosed):
                await victim.recv()
            await other.send("still here")
            assert await other.recv() == "still here"
            fresh = await connect(f"ws://127.0.0.1:{fender.data_port}/ws/fresh")
            await fresh.send("new")
            assert await fresh.recv() == "new"
            await fresh.close()
            await other.close()


async def test_idle_tunnel_is_closed_after_upgrade_idle_timeout(start_fender):
    clock = ManualClock()
    async with WsServer() as server:
        routes = """
        - name: live
          match: {path_prefix: /ws}
          upstream: echo
          upgrade_idle_timeout: 30s
        """
        fender = await start_fender(_policy(server.port, routes), clock=clock)
        tunnels = fender.dataplane.tunnels
        async with asyncio.timeout(_LIMIT):
            async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/x", ping_interval=None) as ws:
                await ws.send("a")
                assert await ws.recv() == "a"
                clock.advance(29)
                assert tunnels.sweep() == 0  # not idle long enough yet
                await ws.send("b")  # activity restarts the idle time
                assert await ws.recv() == "b"
                clock.advance(29)
                assert tunnels.sweep() == 0
                clock.advance(2)
                assert tunnels.sweep() == 1
                with pytest.raises(ConnectionClosed):
                    await ws.recv()


async def test_route_without_upgrades_refuses_with_403_and_never_forwards(start_fender):
    async with WsServer() as server:
        fender = await start_fender(_policy(server.port))
        async with asyncio.timeout(_LIMIT):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{fender.data_port}/plain/ws"):
                    pass
        response = refused.value.response
        assert response.status_code == 403
        assert response.headers["x-fender-error"] == "upgrade_not_allowed"
        assert server.connections == 0
        text = await _metrics(fender)
        assert _metric(text, "fender_upgrades_total", route="plain", outcome="not_allowed") == 1


async def test_h2c_upgrade_is_ignored_and_served_as_http11(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port))
    head = await _response_head(
        fender.data_port,
        b"GET /h2c HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200 ")
    names = {name.lower() for name, _ in echo_upstream.requests[-1]["headers"]}
    assert "upgrade" not in names and "http2-settings" not in names


async def test_upstream_declining_the_upgrade_is_relayed_as_a_normal_response(start_fender, echo_upstream):
    """An HTTP server that ignores Upgrade answers 200: the client gets that answer, no tunnel."""
    fender = await start_fender(_policy(echo_upstream.port))
    head = await _response_head(fender.data_port, _HANDSHAKE)
    assert head.startswith(b"HTTP/1.1 200 ")
    sent = {name.lower(): value for name, value in echo_upstream.requests[-1]["headers"]}
    assert sent["upgrade"] == "websocket" and "upgrade" in sent["connection"].lower()
    text = await _metrics(fender)
    assert _metric(text, "fender_upgrades_total", route="live", protocol="websocket", outcome="declined") == 1
    with pytest.raises(AssertionError):
        _metric(text, "fender_upgrades_total", route="live", protocol="websocket", outcome="switched")


async def test_a_reload_leaves_an_open_tunnel_on_its_runtime(tmp_path):
    async with WsServer() as server:
        path = tmp_path / "policy.yaml"
        text = _policy(server.port).replace(
            "admin: 127.0.0.1:0\n", "admin: 127.0.0.1:0\nreload: {watch: false}\n"
        )
        path.write_text(text)
        fender = Fender(load_policy(path), str(path))
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        try:
            first = fender.runtime
            async with asyncio.timeout(_LIMIT):
                async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/x") as ws:
                    await ws.send("before")
                    assert await ws.recv() == "before"
                    path.write_text(text.replace("upstream: echo", "upstream: echo\n    timeout: 7s", 1))
                    attempt = await fender.reloader.reload("api")
                    assert attempt.result == "applied", attempt
                    assert fender.runtime is not first
                    assert first.active == 0  # the tunnel holds no request of the old runtime
                    await ws.send("after")
                    assert await ws.recv() == "after"
        finally:
            await fender.stop()


def test_drain_waits_for_a_tunnel_then_closes_it_at_the_grace(tmp_path):
    """SIGTERM: the open tunnel keeps working through drain.delay, and is closed once drain.timeout passes."""

    async def scenario() -> None:
        async with WsServer() as server:
            port = free_port()
            policy = tmp_path / "p.yaml"
            policy.write_text(
                textwrap.dedent(
                    f"""
                    listen: 127.0.0.1:{port}
                    admin: 127.0.0.1:{free_port()}
                    drain: {{delay: 0s, timeout: 1s}}
                    upstreams:
                      echo: {{replicas: [{{url: "http://127.0.0.1:{server.port}"}}]}}
                    routes:
                      - {{name: live, upstream: echo}}
                    """
                )
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "run",
                str(policy),
                "--log-level",
                "warning",
                cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                await asyncio.to_thread(wait_port, port)
                async with asyncio.timeout(_LIMIT):
                    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                        await ws.send("x")
                        assert await ws.recv() == "x"
                        proc.send_signal(signal.SIGTERM)
                        await ws.send("during drain")
                        assert await ws.recv() == "during drain"
                        with pytest.raises(ConnectionClosed):
                            await ws.recv()  # closed by Fender at the end of drain.timeout
                    assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    asyncio.run(scenario())


async def test_an_open_tunnel_holds_its_upstream_connection_against_the_pool_limit(start_fender):
    async with WsServer() as server:
        upstreams = """
          echo1:
            replicas: [{url: "http://127.0.0.1:PORT"}]
            pool: {max_connections: 1, connect_timeout: 200ms}
        """.replace("PORT", str(server.port))
        routes = """
        - name: live
          upstream: echo1
        """
        fender = await start_fender(policy_text(server.port, routes, upstreams=upstreams))
        async with asyncio.timeout(_LIMIT):
            async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/one") as ws:
                await ws.send("held")
                assert await ws.recv() == "held"
                with pytest.raises(InvalidStatus) as second:
                    async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/two"):
                        pass
                assert second.value.response.status_code == 503
                assert second.value.response.headers["x-fender-error"] == "pool_overflow"
            # Closed: the slot is free again, and a new tunnel opens.
            pool = fender.runtime.upstreams["echo1"].replicas[0].pool
            await wait_until(lambda: pool.in_use == 0, what="the tunnel's pool slot freed")
            async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/three") as ws:
                await ws.send("again")
                assert await ws.recv() == "again"


async def test_upgrade_passes_admission_and_is_not_retried_after_an_answer(start_fender):
    async with RawUpstream(status(503, b"busy")) as up:
        routes = """
        - name: live
          upstream: echo
          retry: {attempts: 3, retry_on: [5xx], backoff: {initial: 1ms, max: 2ms}}
          rate_limit: {rate: 1/s, burst: 2, key: route}
        """
        fender = await start_fender(policy_text(up.port, routes))
        statuses = []
        for _ in range(3):
            head = await _response_head(fender.data_port, _HANDSHAKE)
            statuses.append(int(head.split(b" ", 2)[1]))
    # The upstream's 503 is relayed without a retry (an upgrade is retried only before an answer);
    # the rate limit counts upgrades like any request: the third is refused before the upstream.
    assert statuses == [503, 503, 429]
    assert len(up.requests) == 2


async def test_an_open_tunnel_counts_against_server_max_connections(start_fender):
    async with WsServer() as server:
        fender = await start_fender(_policy(server.port, server="max_connections: 1\n"))
        async with asyncio.timeout(_LIMIT):
            async with connect(f"ws://127.0.0.1:{fender.data_port}/ws/one") as ws:
                await ws.send("held")
                assert await ws.recv() == "held"
                head = await _response_head(fender.data_port, b"GET /plain/x HTTP/1.1\r\nHost: svc\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503 ")
                assert b"x-fender-error: connection_limit" in head.lower()


async def test_half_close_is_passed_on_through_a_tunnel(start_fender):
    """The client shuts its sending half; the upstream sees EOF yet can still answer, and the client reads it."""
    saw_eof = asyncio.Event()

    async def upgrading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
        received = await reader.read()  # up to EOF: the client's half-close, passed on by Fender
        saw_eof.set()
        writer.write(b"got " + received)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upgrading, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        routes = """
        - name: t
          upstream: echo
          upgrades: [test]
        """
        fender = await start_fender(policy_text(port, routes))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        try:
            writer.write(b"GET /t HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n")
            async with asyncio.timeout(_LIMIT):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                writer.write(b"hello")
                writer.write_eof()
                await saw_eof.wait()
                assert await reader.read() == b"got hello"
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_upgrade_protocols_compare_case_insensitively_and_bad_tokens_are_refused_at_their_line():
    from proxy.config import PolicyError, parse_policy

    routes = """
    - name: live
      upstream: echo
      upgrades: [WebSocket]
    """
    policy = parse_policy(policy_text(1, routes), "p.yaml")
    assert policy.routes[0].upgrades == ("websocket",)
    text = policy_text(1, routes.replace("[WebSocket]", '["web socket"]'))
    with pytest.raises(PolicyError) as refused:
        parse_policy(text, "p.yaml")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "web socket" in t)
    assert f"p.yaml:{line}:" in str(refused.value) and "upgrades" in str(refused.value)
