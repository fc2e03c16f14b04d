"""HTTP/2 to https:// replicas, chosen by ALPN (``protocol: h2`` offers h2; ``auto`` offers h2 then
http/1.1): a grpcio server over TLS behind Fender's cleartext h2c listener, an h2-package TLS server,
HTTP/1.1-only TLS servers, and the clean failure of ``h2`` against a replica that will not speak it.
Certificates come from tests/support/certs.py; every peer is real, on loopback."""

from __future__ import annotations

import asyncio
import logging
import textwrap

import httpx
import pytest

from proxy.options.tls import UpstreamTLSOptions
from proxy.upstream.alpn import AutoPool
from proxy.upstream.errors import ALPNMismatch
from proxy.upstream.http2 import H2Pool
from proxy.upstream.tls import UpstreamTLS
from tests.support.certs import Certs
from tests.support.grpc_peers import EchoService, GrpcReplica, channel, method
from tests.support.h2_client import H2Client
from tests.support.h2_upstream import H2Upstream
from tests.support.procs import wait_until
from tests.support.raw_upstream import RawUpstream, ok


@pytest.fixture
def certs(tmp_path) -> Certs:
    return Certs(tmp_path / "certs")


@pytest.fixture
async def h2_tls(certs):
    servers: list[H2Upstream] = []

    async def start(**options) -> H2Upstream:
        server = await H2Upstream(ssl=certs.server.server_context(), **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def policy(port: int, certs: Certs, protocol: str, upstream: str = "", route: str = "") -> str:
    return (
        textwrap.dedent(
            f"""
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        upstreams:
          api:
            replicas: [{{url: "https://127.0.0.1:{port}"}}]
            protocol: {protocol}
            tls: {{ca_file: {certs.ca_file}}}
        """
        )
        + textwrap.indent(textwrap.dedent(upstream), "    ")
        + "routes:\n  - name: all\n    upstream: api\n    timeout: 5s\n"
        + textwrap.indent(textwrap.dedent(route), "    ")
    )


def sample(fender, name: str, labels: dict[str, str]) -> float:
    return fender.metrics.registry.get_sample_value(name, labels) or 0.0


def grpc_call(port: int, name: str, request, kind: str = "unary_unary"):
    with channel(port) as chan:
        result = method(chan, name, kind)(request, timeout=10)
        return list(result) if kind in ("unary_stream", "stream_stream") else result


async def in_thread(fn, *args):
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 30)


# --------------------------------------------------------------------------- gRPC over TLS


async def test_grpc_client_through_h2c_listener_reaches_a_tls_grpc_replica(start_fender, certs):
    """grpcio client -(h2c)-> Fender -(TLS, ALPN h2)-> grpcio server with the test CA's certificate;
    the gRPC health check speaks the same TLS HTTP/2 and finds the replica serving."""
    replica = GrpcReplica(EchoService("tls"), tls=(certs.server.cert, certs.server.key))
    try:
        fender = await start_fender(
            policy(
                replica.port,
                certs,
                "h2",
                upstream="health_check: {grpc: true, interval: 100ms, timeout: 100ms, unhealthy_threshold: 1}\n",
            )
        )
        port = fender.data_port
        assert await in_thread(grpc_call, port, "Unary", b"hi") == b"tls:hi"
        streamed = await in_thread(grpc_call, port, "ServerStream", b"3", "unary_stream")
        assert streamed == [b"tls:0", b"tls:1", b"tls:2"]
        sent = iter([b"x", b"y"])
        assert await in_thread(grpc_call, port, "ClientStream", sent, "stream_unary") == b"tls:x+y"
        upstream = fender.runtime.upstreams["api"]
        pool = upstream.replicas[0].pool
        assert isinstance(pool, H2Pool) and pool.tls is not None
        assert pool.connections_opened == 1 and pool.tls_handshakes == 1  # three calls, one connection
        handshakes = {"upstream": "api", "session": "full"}
        assert sample(fender, "fender_upstream_tls_handshakes_total", handshakes) >= 1
        # Health probes over their own TLS h2 connection: SERVING keeps it in; NOT_SERVING takes it out.
        checker = upstream.health
        assert checker is not None
        await wait_until(lambda: checker._pools[0].connections_opened >= 1, within=10, what="a TLS probe")
        assert upstream.picker.states[0].active_healthy
        replica.set_health("", "NOT_SERVING")
        await wait_until(lambda: not upstream.picker.states[0].active_healthy, within=10, what="probe fails")
    finally:
        replica.stop()


# --------------------------------------------------------------------------- protocol: h2


async def test_h2_to_a_tls_h2_server_from_http1_and_h2c_clients(start_fender, certs, h2_tls):
    up = await h2_tls()
    fender = await start_fender(policy(up.port, certs, "h2"))
    async with httpx.AsyncClient() as client:
        response = await client.post(fender.url + "/echo", content=b"over tls")
    assert response.status_code == 200 and response.content == b"over tls"
    assert response.headers["x-seen-scheme"] == "https"  # :scheme of a TLS hop
    async with H2Client(fender.data_port) as h2c:
        sids = [h2c.request(f"/echo?{n}", authority="api") for n in range(3)]
        answers = [await h2c.response(sid) for sid in sids]
    assert [a.status for a in answers] == [200, 200, 200]
    pool = fender.runtime.upstreams["api"].replicas[0].pool
    assert isinstance(pool, H2Pool)
    assert (pool.connections_opened, up.connections) == (1, 1)  # multiplexed over one TLS connection


async def test_h2_pool_over_tls_resumes_the_session_on_new_connections(certs, h2_tls):
    up = await h2_tls()
    tls = UpstreamTLS(UpstreamTLSOptions(ca_file=certs.ca_file), "tls", ("h2",))
    pool = H2Pool("127.0.0.1", up.port, max_keepalive=0, connect_timeout=5, tls=tls.client("127.0.0.1"))
    try:
        for _ in range(3):  # max_keepalive 0: each request on a new connection
            response = await pool.request(b"GET", b"/echo", [(b"host", b"a")], head_timeout=5)
            assert response.status == 200
            await response.read()
            response.close()
            await wait_until(lambda: pool.idle == 0 and pool.in_use == 0, what="the connection closed")
    finally:
        await pool.close()
    assert pool.tls_handshakes == 3
    assert pool.tls_resumed == 2  # the second and third resumed the first one's session


async def test_h2_to_a_replica_that_does_not_choose_h2_fails_cleanly(start_fender, certs, caplog):
    """protocol: h2 and a TLS replica that picks http/1.1 by ALPN (or ignores ALPN): 502 tls_failure,
    the cause in the error log and the metric; not a byte of HTTP/2 went to it."""
    for alpn in (["http/1.1"], None):
        ctx = certs.server.server_context()
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        async with RawUpstream(ok(b"h1 only"), ssl=ctx, expect_errors=True) as up:
            fender = await start_fender(policy(up.port, certs, "h2"))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="fender.upstream"):
                async with httpx.AsyncClient() as client:
                    response = await client.get(fender.url + "/x")
            assert response.status_code == 502
            assert response.headers["x-fender-error"] == "tls_failure"
            errors = {"upstream": "api", "reason": "tls_failure"}
            assert sample(fender, "fender_upstream_errors_total", errors) == 1
            lines = [r.getMessage() for r in caplog.records if r.name == "fender.upstream"]
            chosen = "none"  # offered h2 only: no protocol in common
            assert any(f"does not speak HTTP/2 over TLS (ALPN: {chosen})" in line for line in lines), lines
            assert up.requests == []  # nothing reached it as a request
            await fender.stop()


# --------------------------------------------------------------------------- protocol: auto


async def test_auto_speaks_http1_to_an_http1_only_tls_replica(start_fender, certs):
    for alpn in (["http/1.1"], None):  # chose http/1.1, or chose nothing (no ALPN on the server)
        ctx = certs.server.server_context()
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        async with RawUpstream(ok(b"h1"), ssl=ctx) as up:
            fender = await start_fender(policy(up.port, certs, "auto"))
            async with httpx.AsyncClient() as client:
                for _ in range(3):
                    response = await client.get(fender.url + "/x")
                    assert response.status_code == 200 and response.text == "h1"
            pool = fender.runtime.upstreams["api"].replicas[0].pool
            assert isinstance(pool, AutoPool) and pool.chosen == "http1"
            # The first connect learnt the choice (HTTP/2 pool, closed unused); then one keep-alive connection.
            assert pool.switches == 1 and pool.http1.connections_opened == 1
            assert len(up.requests) == 3
            assert pool.http1.tls_resumed == 1  # the HTTP/1.1 pool resumed the session the first connect made
            await fender.stop()


async def test_auto_speaks_h2_to_an_h2_tls_replica(start_fender, certs, h2_tls):
    up = await h2_tls()
    fender = await start_fender(policy(up.port, certs, "auto"))
    async with httpx.AsyncClient() as client:
        responses = await asyncio.gather(*(client.get(fender.url + f"/echo?{n}") for n in range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.headers["x-seen-scheme"] == "https" for r in responses)
    pool = fender.runtime.upstreams["api"].replicas[0].pool
    assert isinstance(pool, AutoPool) and pool.chosen == "h2" and pool.switches == 0
    assert pool.http1.connections_opened == 0 and up.connections == 1


async def test_auto_pool_follows_a_replica_that_changes_its_choice(certs, h2_tls):
    """The HTTP/1.1 side of an auto pool closes a connection on which the replica chose h2 and the
    request goes over HTTP/2 instead (nothing was sent, so no retry is spent)."""
    up = await h2_tls()
    tls = UpstreamTLS(UpstreamTLSOptions(ca_file=certs.ca_file), "tls", ("h2", "http/1.1"))
    from proxy.upstream.alpn import auto_pools

    pool = auto_pools("127.0.0.1", up.port, tls.client("127.0.0.1"), connect_timeout=5)
    pool.current = pool.http1  # as if the replica had chosen http/1.1 before
    try:
        response = await pool.request(b"GET", b"/echo", [(b"host", b"a")], head_timeout=5)
        assert response.status == 200 and response.http_version == "2"
        response.close()
        assert pool.chosen == "h2" and pool.switches == 1
        assert pool.http1.tls_handshakes == 1 and pool.http1.in_use == 0  # closed unused, slot given back
        with pytest.raises(ALPNMismatch):
            await pool.http1.request(b"GET", b"/", [(b"host", b"a")], head_timeout=5)
    finally:
        await pool.close()


async def test_http_health_checks_of_tls_replicas_speak_the_upstreams_protocol(start_fender, certs, h2_tls):
    """An HTTP probe of an https:// replica goes in the upstream's protocol: HTTP/2 by ALPN for h2 (an
    HTTP/1.1 probe would fail against an h2-only replica), what the replica chooses for auto."""
    up = await h2_tls()
    health = "health_check: {path: /echo, interval: 100ms, timeout: 100ms, unhealthy_threshold: 1}\n"
    for protocol, kind in (("h2", H2Pool), ("auto", AutoPool)):
        fender = await start_fender(policy(up.port, certs, protocol, upstream=health))
        checker = fender.runtime.upstreams["api"].health
        assert checker is not None
        probe = checker._pools[0]
        assert isinstance(probe, kind)
        before = len(up.requests)
        # Two probes: the first one's result is in (a failed one would have taken the replica out).
        await wait_until(lambda n=before: len(up.requests) > n + 1, within=10, what="probes over TLS h2")
        assert fender.runtime.upstreams["api"].picker.states[0].active_healthy
        assert probe.tls_handshakes >= 1 and up.requests[-1][1][b":scheme"] == b"https"
        await fender.stop()
