"""The HTTP/2 upstream client (upstreams.X.protocol: h2) against real h2c servers on loopback.

The replica is tests/support/h2_upstream.py (the h2 package, scriptable per path) or a grpcio server;
the client is Fender's H2Pool directly, or an HTTP/1.1 client through Fender.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.config import PolicyError, parse_policy
from proxy.upstream import UpstreamTimeout
from proxy.upstream.http2 import STREAM_WINDOW, H2Pool, StreamReset, request_headers
from tests.conftest import raw_request
from tests.support.h2_upstream import H2Upstream
from tests.support.metrics import get_metrics, metric_value
from tests.support.procs import wait_until


@pytest.fixture
async def h2_upstream():
    servers: list[H2Upstream] = []

    async def start(**options) -> H2Upstream:
        server = await H2Upstream(**options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def pools():
    made: list[H2Pool] = []

    def make(port: int, **options) -> H2Pool:
        # A loaded machine may take a while to answer SETTINGS: the default 1s would make tests flaky.
        options.setdefault("connect_timeout", 5.0)
        pool = H2Pool("127.0.0.1", port, **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


async def get(pool: H2Pool, path: str, **options):
    return await pool.request(b"GET", path.encode(), [(b"host", b"replica")], head_timeout=5, **options)


async def read_all(resp) -> bytes:
    parts = []
    for _ in range(10_000):
        chunk = await resp.read()
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
    raise AssertionError("body did not end")


def h2_policy(port: int, extra: str = "", route: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams:
  svc:
    replicas: [{{url: http://127.0.0.1:{port}}}]
    protocol: h2
{extra}
routes:
  - name: all
    upstream: svc
{route}
"""


# --------------------------------------------------------------------------- translation


def test_the_http1_head_becomes_an_http2_one():
    out = request_headers(
        b"POST",
        b"/a?b=1",
        [
            (b"host", b"svc.internal:81"),
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"te", b"trailers, deflate"),
            (b"X-Custom", b"1"),
        ],
        12,
    )
    assert out[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/a?b=1"),
        (b":authority", b"svc.internal:81"),
    ]
    assert out[4:] == [(b"te", b"trailers"), (b"x-custom", b"1"), (b"content-length", b"12")]


async def test_http1_client_to_h2_replica_host_hop_by_hop_and_trailers(h2_upstream, start_fender):
    up = await h2_upstream()
    fender = await start_fender(h2_policy(up.port, route="    rewrite_host: false"))
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r = await client.post(
            "/echo",
            content=b"hello h2",
            headers={"host": "svc.example", "connection": "x-hop", "x-hop": "1", "te": "trailers"},
        )
    assert r.status_code == 200
    assert r.content == b"hello h2"
    assert r.headers["x-seen-authority"] == "svc.example"
    assert r.headers["x-seen-te"] == "trailers"
    assert r.headers["x-seen-length"] == "8"
    assert r.headers["x-seen-connection"] == "-"
    path, headers = up.requests[-1]
    assert path == "/echo" and b"x-hop" not in headers and b"host" not in headers
    # Response trailers reach an HTTP/1.1 client that said TE: trailers, as a chunked trailer section.
    raw = await raw_request(
        fender.data_port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nContent-Length: 2\r\n\r\nhi",
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"\r\n0\r\nx-trailer: done\r\n\r\n" in raw


async def test_streamed_request_body_through_fender(h2_upstream, start_fender):
    up = await h2_upstream()
    fender = await start_fender(h2_policy(up.port))
    body = bytes(range(256)) * 2048  # 512 KiB: above the replica's 64 KiB window and Fender's buffer limit

    async def chunks():
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    async with httpx.AsyncClient(base_url=fender.url, timeout=10) as client:
        r = await client.post("/echo", content=chunks())
    assert r.status_code == 200
    assert r.content == body
    assert r.headers["x-seen-length"] == "-"  # chunked in, no length out: the stream's end frames it


# --------------------------------------------------------------------------- multiplexing


async def test_concurrent_requests_share_one_connection(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port, max_connections=4)
    calls = [asyncio.ensure_future(get(pool, "/hold")) for _ in range(20)]
    await wait_until(lambda: up.held == 20, within=5)
    assert up.connections == 1
    assert up.peak_streams == 20
    assert pool.streams == 20 and pool.in_use == 1
    up.release.set()
    responses = await asyncio.gather(*calls)
    assert [await read_all(r) for r in responses] == [b"held"] * 20
    await wait_until(lambda: pool.streams == 0, within=5)
    assert pool.idle == 1 and pool.in_use == 0


async def test_a_full_connection_opens_another_up_to_max_connections(h2_upstream, pools):
    up = await h2_upstream(max_concurrent_streams=2)
    pool = pools(up.port, max_connections=3, max_concurrent_streams=100)
    calls = [asyncio.ensure_future(get(pool, "/hold")) for _ in range(7)]
    await wait_until(lambda: up.held == 6, within=5)
    assert up.connections == 3  # the replica's SETTINGS (2 streams) lowered the pool's 100
    assert up.peak_streams == 2
    await wait_until(lambda: pool.pending == 1, within=5)  # the 7th waits for a stream
    up.release.set()
    responses = await asyncio.gather(*calls)
    assert [r.status for r in responses] == [200] * 7
    assert up.connections == 3


async def test_pool_max_concurrent_streams_caps_a_connection(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port, max_connections=2, max_concurrent_streams=3)
    calls = [asyncio.ensure_future(get(pool, "/hold")) for _ in range(6)]
    await wait_until(lambda: up.held == 6, within=5)
    assert up.connections == 2 and up.peak_streams == 3
    up.release.set()
    assert [r.status for r in await asyncio.gather(*calls)] == [200] * 6


# --------------------------------------------------------------------------- faults


async def test_refused_stream_was_not_sent_and_reset_was(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port)
    with pytest.raises(StreamReset) as refused:
        await get(pool, "/refuse")
    assert refused.value.reason == "stream_reset"
    assert refused.value.request_sent is False
    with pytest.raises(StreamReset) as reset:
        await get(pool, "/reset")
    assert reset.value.request_sent is True
    assert "INTERNAL_ERROR" in str(reset.value)
    # A stream's reset leaves the connection to the others.
    assert (await get(pool, "/echo")).status == 200
    assert up.connections == 1


async def test_head_timeout_fails_one_stream_only(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port)
    with pytest.raises(UpstreamTimeout) as timeout:
        await pool.request(b"GET", b"/hold", [(b"host", b"r")], head_timeout=0.2)
    assert timeout.value.reason == "timeout"
    assert (await get(pool, "/echo")).status == 200
    assert up.connections == 1


async def test_graceful_goaway_moves_new_requests_to_a_new_connection(h2_upstream, pools):
    up = await h2_upstream(goaway_after=2)
    pool = pools(up.port)
    statuses = []
    for _ in range(3):
        resp = await get(pool, "/echo")
        statuses.append(resp.status)
        await read_all(resp)
    assert statuses == [200, 200, 200]
    assert up.connections == 2
    assert pool.goaways == 1
    assert len(up.requests) == 3  # nothing was sent twice


async def test_streams_above_goaway_last_id_are_sent_again_on_a_new_connection(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port)
    calls = [asyncio.ensure_future(get(pool, "/hold")) for _ in range(3)]
    await wait_until(lambda: up.held == 3, within=5)
    up.goaway_all(last_stream_id=1)  # streams 3 and 5 were "never processed"
    await wait_until(lambda: up.held == 5, within=5)  # ... so they came again, on a second connection
    assert up.connections == 2
    up.release.set()
    responses = await asyncio.gather(*calls)
    assert [r.status for r in responses] == [200, 200, 200]
    assert pool.goaways == 1


async def test_replica_closing_fails_its_streams_as_reset(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port)
    call = asyncio.ensure_future(get(pool, "/hold"))
    await wait_until(lambda: up.held == 1, within=5)
    for conn in list(up._conns):
        conn.writer.transport.abort()
    with pytest.raises(Exception) as failed:
        await call
    assert getattr(failed.value, "reason", None) == "reset"
    assert (await get(pool, "/echo")).status == 200  # a new connection
    assert up.connections == 2


# --------------------------------------------------------------------------- flow control


async def test_an_unread_body_is_bounded_by_the_stream_window_and_others_flow(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port)
    size = 4 * 1024 * 1024
    big = await get(pool, f"/big?{size}")
    await wait_until(lambda: up.big_sent >= STREAM_WINDOW, within=5)
    # The slow reader holds its window; another stream on the same connection is not stalled.
    other = await pool.request(b"POST", b"/echo", [(b"host", b"r")], body=b"x" * 1000, head_timeout=5)
    assert await read_all(other) == b"x" * 1000
    assert up.connections == 1
    assert big.buffered <= STREAM_WINDOW
    assert up.big_sent <= STREAM_WINDOW  # the replica could send no more than the window
    total = 0
    for _ in range(100_000):
        chunk = await big.read()
        if not chunk:
            break
        total += len(chunk)
    assert total == size
    assert big.buffered_peak <= STREAM_WINDOW


async def test_a_large_request_body_waits_for_the_replica_window(h2_upstream, pools):
    up = await h2_upstream()
    pool = pools(up.port)
    body = bytes(range(251)) * 4000  # ~1 MB, 15x the replica's initial window
    resp = await pool.request(b"PUT", b"/echo", [(b"host", b"r")], body=body, head_timeout=10)
    assert await read_all(resp) == body


# --------------------------------------------------------------------------- policy


def test_protocol_and_max_concurrent_streams_in_the_policy():
    policy = parse_policy(
        h2_policy(9, extra="    pool: {max_connections: 4, max_concurrent_streams: 50}"), "p.yaml"
    )
    upstream = policy.upstreams["svc"]
    assert upstream.protocol == "h2"
    assert upstream.pool.max_concurrent_streams == 50
    assert (
        parse_policy(h2_policy(9).replace("protocol: h2", "protocol: auto"), "p.yaml")
        .upstreams["svc"]
        .protocol
        == "auto"
    )
    with pytest.raises(PolicyError) as bad:
        parse_policy(h2_policy(9).replace("protocol: h2", "protocol: h3"), "p.yaml")
    assert "p.yaml:7:15" in str(bad.value)


async def test_auto_is_http1_on_cleartext(start_fender, echo_upstream):
    fender = await start_fender(h2_policy(echo_upstream.port).replace("protocol: h2", "protocol: auto"))
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r = await client.get("/x")
    assert r.status_code == 200
    pool = fender.runtime.upstreams["svc"].replicas[0].pool
    assert getattr(pool, "protocol", "http1") == "http1"


async def test_streams_and_connections_in_the_metrics(h2_upstream, start_fender):
    up = await h2_upstream()
    fender = await start_fender(h2_policy(up.port))
    async with httpx.AsyncClient(base_url=fender.url, timeout=10) as client:
        calls = [asyncio.ensure_future(client.get("/hold")) for _ in range(5)]
        await wait_until(lambda: up.held == 5, within=5)
        text = await get_metrics(fender)
        up.release.set()
        assert [r.status_code for r in await asyncio.gather(*calls)] == [200] * 5
    assert metric_value(text, "fender_upstream_pool_streams", upstream="svc") == 5
    assert metric_value(text, "fender_upstream_pool_connections", upstream="svc", state="in_use") == 1
    after = await get_metrics(fender)
    assert metric_value(after, "fender_upstream_pool_streams", upstream="svc") == 0
    assert metric_value(after, "fender_upstream_pool_connections", upstream="svc", state="idle") == 1


async def test_stream_reset_is_counted_and_answered_502(h2_upstream, start_fender):
    up = await h2_upstream()
    fender = await start_fender(h2_policy(up.port, route="    retry: {attempts: 1}"))
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r = await client.get("/reset")
    assert r.status_code == 502
    assert r.headers["x-fender-error"] == "stream_reset"
    text = await get_metrics(fender)
    assert metric_value(text, "fender_upstream_errors_total", upstream="svc", reason="stream_reset") == 1


async def test_refused_stream_is_retried_by_the_default_retry_on(h2_upstream, start_fender):
    up = await h2_upstream()
    fender = await start_fender(h2_policy(up.port, route="    retry: {attempts: 3, backoff: {initial: 1ms}}"))
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r = await client.post("/refuse", content=b"x")  # a POST: retried only because nothing was processed
    assert r.headers["x-fender-error"] == "stream_reset"
    assert [path for path, _ in up.requests] == ["/refuse"] * 3


async def test_bodies_read_after_their_stream_ended_give_the_connection_window_back(h2_upstream, pools):
    """Responses that complete before they are read (the usual small answer) must not shrink the
    connection's window: 100 of 200 KB (more than the 16 MiB window) pass on one connection."""
    up = await h2_upstream()
    pool = pools(up.port)
    for _ in range(100):
        resp = await get(pool, "/big?200000")
        await wait_until(lambda resp=resp: resp.complete, within=5)
        assert len(await read_all(resp)) == 200000
    assert up.connections == 1


async def test_a_response_contradicting_its_content_length_fails_only_its_stream(h2_upstream, pools):
    """RFC 9113 8.1.1: a malformed response is a stream error; the other streams of the connection
    (one held while it happens) complete and the connection stays in the pool."""
    from proxy.upstream import BadResponse

    up = await h2_upstream()
    pool = pools(up.port)
    held = asyncio.ensure_future(get(pool, "/hold"))
    await wait_until(lambda: up.held == 1, within=5)
    bad = await get(pool, "/badlength")  # the head is fine; the body breaks it
    with pytest.raises(BadResponse, match="malformed HTTP/2 response"):
        await read_all(bad)
    up.release.set()
    assert await read_all(await held) == b"held"
    assert await read_all(await get(pool, "/echo")) == b""
    assert (up.connections, pool.connections_opened) == (1, 1)
