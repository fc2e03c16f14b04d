"""Fender's upstream client (proxy.upstream) against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import socket

import pytest

from proxy.upstream import (
    BadResponse,
    ConnectFailure,
    ConnectTimeout,
    PoolOverflow,
    RequestBodyError,
    ResetBeforeHeaders,
    ResetMidBody,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)
from proxy.upstream.connection import HIGH_WATER
from tests.support.raw_upstream import (
    RawUpstream,
    Request,
    Responder,
    echo,
    hang,
    ok,
    raw,
    reset,
    sequence,
    status,
)

HOST = [(b"host", b"upstream")]
MiB = 1024 * 1024
# A recv() returns at most 256 KiB (asyncio and uvloop), on top of the pause threshold.
BUFFER_BOUND = HIGH_WATER + 256 * 1024


@contextlib.asynccontextmanager
async def pool_for(up: RawUpstream, **kwargs):
    pool = UpstreamPool("127.0.0.1", up.port, **kwargs)
    try:
        yield pool
    finally:
        await pool.close()


async def read_all(resp) -> bytes:
    parts = []
    for _ in range(100_000):
        chunk = await resp.read()
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
    raise AssertionError("body did not end")


async def get(pool: UpstreamPool, target: bytes = b"/", **kwargs):
    resp = await pool.request(b"GET", target, HOST, **kwargs)
    return resp, await read_all(resp)


async def settle(predicate, max_yields: int = 100) -> None:
    """Let other tasks run until ``predicate()`` holds (bounded number of loop iterations)."""
    for _ in range(max_yields):
        if predicate():
            return
        await asyncio.sleep(0)
    assert predicate()


def assert_clean(pool: UpstreamPool) -> None:
    assert (pool.in_use, pool.idle, pool.pending) == (0, 0, 0)


# -- keep-alive -------------------------------------------------------------------


async def scenario_keepalive_reuse() -> None:
    async with RawUpstream(ok(b"hello")) as up, pool_for(up) as pool:
        for _ in range(3):
            resp, body = await get(pool)
            assert (resp.status, body, resp.http_version) == (200, b"hello", "1.1")
            assert resp.headers == [(b"content-length", b"5")]
        assert up.connections == 1 and pool.connections_opened == 1
        assert (pool.in_use, pool.idle) == (0, 1)
        assert [r.connection for r in up.requests] == [1, 1, 1]


async def test_keepalive_reuse() -> None:
    await scenario_keepalive_reuse()


async def test_max_keepalive_and_idle_timeout() -> None:
    gate = asyncio.Event()

    async def held(req: Request, conn: Responder) -> None:
        await gate.wait()
        await conn.send(200, (), b"x")

    async with RawUpstream(held) as up, pool_for(up, max_keepalive=2, keepalive_idle_timeout=0.3) as pool:
        tasks = [asyncio.create_task(get(pool)) for _ in range(5)]
        await up.wait_until(lambda: len(up.requests) == 5)
        assert pool.in_use == 5
        gate.set()
        for _resp, body in await asyncio.gather(*tasks):
            assert body == b"x"
        # Two kept, three closed at release.
        assert (pool.in_use, pool.idle) == (0, 2)
        await up.wait_until(lambda: up.disconnects == 3)
        # The kept ones are closed once idle for keepalive_idle_timeout.
        await up.wait_until(lambda: up.disconnects == 5, within=3)
        assert pool.idle == 0


async def test_idle_connection_closed_by_upstream_is_not_used(monkeypatch) -> None:
    # The poll(2) probe runs only for connections idle longer than STALE_PROBE_AFTER (upstreams close
    # idle keep-alive connections after seconds); here the upstream closes at once, so probe always.
    import proxy.upstream.pool as pool_module

    monkeypatch.setattr(pool_module, "STALE_PROBE_AFTER", 0.0)
    closers: list[Responder] = []

    async def remember(req: Request, conn: Responder) -> None:
        closers.append(conn)
        await conn.send(200, (), b"ok")

    for how in ("close", "reset"):
        closers.clear()
        async with RawUpstream(remember) as up, pool_for(up) as pool:
            await get(pool)
            assert pool.idle == 1
            getattr(closers[0], how)()  # FIN / RST while the connection sits idle
            await up.wait_until(lambda: up.disconnects == 1)
            resp, body = await get(pool)
            assert body == b"ok"
            assert up.connections == 2
            assert [r.connection for r in up.requests] == [1, 2]


async def test_reused_connection_failing_after_write_is_not_resent() -> None:
    async with RawUpstream(sequence(ok(b"first"), reset)) as up, pool_for(up) as pool:
        await get(pool)
        with pytest.raises(ResetBeforeHeaders) as info:
            await pool.request(b"POST", b"/pay", HOST, body=b"x")
        assert info.value.request_sent is True and info.value.reason == "reset"
        assert len(up.requests) == 2 and up.connections == 1  # no silent resend
        assert_clean(pool)


# -- response framing ----------------------------------------------------------------


async def scenario_chunked_with_trailers() -> None:
    async def chunked(req: Request, conn: Responder) -> None:
        await conn.send_head(200, [("transfer-encoding", "chunked"), ("x-a", "1")])
        for part in (b"hel", b"lo ", b"world"):
            await conn.send_chunk(part)
        await conn.end_chunks([("x-checksum", "abc")])

    async with RawUpstream(chunked) as up, pool_for(up) as pool:
        for _ in range(2):
            resp, body = await get(pool)
            assert body == b"hello world"
            assert resp.headers == [(b"transfer-encoding", b"chunked"), (b"x-a", b"1")]  # trailers dropped
        assert up.connections == 1


async def test_chunked_with_trailers() -> None:
    await scenario_chunked_with_trailers()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.0 200 OK\r\nx-a: 1\r\n\r\nuntil close",  # HTTP/1.0, no length
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",  # no length
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nuntil close",  # not chunked
    ],
)
async def test_read_until_close(response: bytes) -> None:
    async with RawUpstream(raw(response, close=True)) as up, pool_for(up) as pool:
        for n in (1, 2):
            resp, body = await get(pool)
            assert (resp.status, body) == (200, b"until close")
            assert not resp.keep_alive
            assert up.connections == n
            assert_clean(pool)


@pytest.mark.parametrize(
    ("response", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nhi", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: Keep-Alive\r\n\r\nhi", True),
    ],
)
async def test_connection_reuse_rules(response: bytes, reused: bool) -> None:
    async with RawUpstream(raw(response)) as up, pool_for(up) as pool:
        for _ in range(2):
            resp, body = await get(pool)
            assert body == b"hi" and resp.keep_alive is reused
        assert up.connections == (1 if reused else 2)
        assert pool.idle == (1 if reused else 0)


async def test_interim_responses_are_skipped() -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone"
    )
    async with RawUpstream(raw(response)) as up, pool_for(up) as pool:
        for _ in range(2):
            resp = await pool.request(b"POST", b"/", HOST, body=b"data")
            assert resp.status == 201 and resp.headers == [(b"content-length", b"4")]
            assert await read_all(resp) == b"done"
        assert up.connections == 1


async def test_head_204_304_and_empty_bodies() -> None:
    async def no_bodies(req: Request, conn: Responder) -> None:
        code = int(req.target[1:] or 200)
        if req.method == b"HEAD":
            await conn.send_head(200, [("content-length", "1000")])
        elif code in (204, 304):
            await conn.send_head(code, [("content-length", "5")])
        else:
            await conn.send(200, (), b"")

    async with RawUpstream(no_bodies) as up, pool_for(up) as pool:
        cases = [(b"HEAD", b"/", 200), (b"GET", b"/204", 204), (b"GET", b"/304", 304), (b"GET", b"/", 200)]
        for _ in range(2):
            for method, target, code in cases:
                resp = await pool.request(method, target, HOST)
                assert resp.status == code and not resp.has_body()
                assert pool.in_use == 0  # released before the caller even reads
                assert await resp.read() == b""
        assert up.connections == 1


async def test_bytes_after_a_head_response_prevent_reuse() -> None:
    # A broken upstream sending a body with a HEAD response: the body never
    # leaks into the next exchange, the connection is dropped.
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"
    async with RawUpstream(raw(response)) as up, pool_for(up) as pool:
        resp = await pool.request(b"HEAD", b"/", HOST)
        assert await resp.read() == b""
        resp, body = await get(pool)
        assert body == b"body"
        assert up.connections == 2


# -- request framing -------------------------------------------------------------------


async def test_request_framing() -> None:
    async with RawUpstream(echo) as up, pool_for(up) as pool:
        headers = [(b"host", b"svc"), (b"x-dup", b"1"), (b"x-dup", b"2")]
        resp = await pool.request(b"GET", b"/a?b=c", headers)
        assert await read_all(resp) == b""
        resp = await pool.request(b"POST", b"/empty", headers)
        await read_all(resp)
        resp = await pool.request(b"PUT", b"/small", headers, body=b"payload")
        assert await read_all(resp) == b"payload"
        big = os.urandom(200_000)
        resp = await pool.request(b"PATCH", b"/big", headers, body=big)
        assert await read_all(resp) == big
        assert dict(resp.headers)[b"x-echo-method"] == b"PATCH"
        echoed = json.loads(dict(resp.headers)[b"x-echo-headers"])
        assert echoed[:3] == [["host", "svc"], ["x-dup", "1"], ["x-dup", "2"]]

        get_req, post_req, put_req, _ = up.requests
        assert get_req.raw == b"GET /a?b=c HTTP/1.1\r\nhost: svc\r\nx-dup: 1\r\nx-dup: 2\r\n\r\n"
        assert post_req.header("content-length") == b"0"
        assert put_req.raw.endswith(b"content-length: 7\r\n\r\npayload")
        assert up.connections == 1


async def test_streamed_request_bodies() -> None:
    def stream_of(*parts: bytes):
        it = iter(parts)

        async def body_stream() -> bytes:
            return next(it, b"")

        return body_stream

    async with RawUpstream(echo) as up, pool_for(up) as pool:
        resp = await pool.request(b"POST", b"/", HOST, body_stream=stream_of(b"ab", b"", b"never"))
        assert await read_all(resp) == b"ab"
        assert up.requests[-1].header("transfer-encoding") == b"chunked"

        resp = await pool.request(b"POST", b"/", HOST, body_stream=stream_of(b"abc", b"de"), content_length=5)
        assert await read_all(resp) == b"abcde"
        assert up.requests[-1].header("content-length") == b"5"
        assert up.connections == 1

        with pytest.raises(RequestBodyError):
            await pool.request(b"POST", b"/", HOST, body_stream=stream_of(b"abc"), content_length=5)
        with pytest.raises(RequestBodyError):
            await pool.request(b"POST", b"/", HOST, body_stream=stream_of(b"abcdef"), content_length=5)
        assert_clean(pool)


# -- faults -------------------------------------------------------------------------------


async def test_connect_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        pool = UpstreamPool("127.0.0.1", port)
        with pytest.raises(ConnectFailure) as info:
            await pool.request(b"GET", b"/", HOST)
        assert info.value.request_sent is False and info.value.reason == "connect_failure"
        assert_clean(pool)


async def test_connect_timeout_on_saturated_backlog() -> None:
    # listen(0) and never accept: once the accept queue is full the kernel
    # drops further SYNs, so a connect never completes.
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(address)
            if not select.select([], [filler], [], 0.2)[1]:
                break  # this one hangs: the backlog is saturated
        else:
            pytest.fail("could not saturate the listen backlog")
        pool = UpstreamPool(*address, connect_timeout=0.2)
        with pytest.raises(ConnectTimeout) as info:
            await pool.request(b"GET", b"/", HOST)
        assert info.value.request_sent is False and info.value.reason == "connect_timeout"
        assert_clean(pool)
        # Cancelled while connecting: the slot is freed too.
        connecting = asyncio.create_task(pool.request(b"GET", b"/", HOST))
        await settle(lambda: pool.in_use == 1)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        assert_clean(pool)


async def test_black_hole_head_timeout() -> None:
    async with RawUpstream(hang) as up, pool_for(up) as pool:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout) as info:
            await pool.request(b"GET", b"/", HOST, head_timeout=0.2)
        assert 0.15 < loop.time() - start < 2
        assert info.value.request_sent is True and info.value.reason == "timeout"
        assert_clean(pool)
        await up.wait_until(lambda: up.disconnects == 1)


async def test_idle_timeout_mid_body() -> None:
    async def stalls(req: Request, conn: Responder) -> None:
        await conn.send_head(200, [("content-length", "10")])
        conn.write(b"12345")
        await conn.hang()

    async with RawUpstream(stalls) as up, pool_for(up) as pool:
        resp = await pool.request(b"GET", b"/", HOST, idle_timeout=0.2)
        assert await resp.read() == b"12345"
        with pytest.raises(UpstreamTimeout):
            await resp.read()
        assert_clean(pool)
        await up.wait_until(lambda: up.disconnects == 1)


async def scenario_resets() -> None:
    async def mid_body(req: Request, conn: Responder) -> None:
        await conn.send_head(200, [("content-length", "100000")])
        conn.write(b"x" * 1000)
        await conn.drain()
        if req.target == b"/rst":
            conn.reset()
        else:
            conn.close()

    async with RawUpstream(mid_body) as up, pool_for(up) as pool:
        for target in (b"/rst", b"/fin"):
            resp = await pool.request(b"GET", target, HOST)
            received = b""
            with pytest.raises(ResetMidBody) as info:
                for _ in range(100):
                    received += await resp.read()
            assert info.value.reason == "reset_mid_body" and info.value.request_sent
            assert received == b"x" * len(received) and len(received) <= 1000
            assert_clean(pool)
    async with RawUpstream(reset) as up, pool_for(up) as pool:
        with pytest.raises(ResetBeforeHeaders) as info:
            await pool.request(b"GET", b"/", HOST)
        assert info.value.request_sent is True
        assert_clean(pool)


async def test_resets() -> None:
    await scenario_resets()


async def test_fin_before_headers() -> None:
    async with RawUpstream(raw(b"HTTP/1.1 200 OK\r\ncontent-", close=True)) as up, pool_for(up) as pool:
        with pytest.raises(ResetBeforeHeaders):
            await pool.request(b"GET", b"/", HOST)
        assert_clean(pool)


@pytest.mark.parametrize(
    "response",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",  # head > max_response_head
        b"HTTP/1.1 200 OK\r\n" + b"x-many: 1234567890\r\n" * 5000,  # head that never ends
    ],
)
async def test_bad_responses(response: bytes) -> None:
    async with RawUpstream(raw(response)) as up, pool_for(up) as pool:
        with pytest.raises(BadResponse) as info:
            resp = await pool.request(b"GET", b"/", HOST)
            await read_all(resp)  # the chunked case fails in the body
        assert info.value.reason == "bad_response"
        assert_clean(pool)
        await up.wait_until(lambda: up.disconnects == 1)


async def test_head_within_limit_split_across_reads() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"x-many: 1234567890\r\n" * 2000 + b"content-length: 2\r\n\r\n"

    async def slow_head(req: Request, conn: Responder) -> None:
        for i in range(0, len(head), 1000):
            conn.write(head[i : i + 1000])
            await conn.drain()
        conn.write(b"ok")

    async with RawUpstream(slow_head) as up, pool_for(up, max_response_head=65536) as pool:
        resp, body = await get(pool)
        assert body == b"ok" and len(resp.headers) == 2001
    async with RawUpstream(slow_head) as up, pool_for(up, max_response_head=16384) as pool:
        with pytest.raises(BadResponse):
            await pool.request(b"GET", b"/", HOST)


# -- flow control -----------------------------------------------------------------------------


async def scenario_big_download(total: int = 64 * MiB) -> None:
    block = os.urandom(MiB)
    paused: list[asyncio.Event] = []

    async def big(req: Request, conn: Responder) -> None:
        paused.append(conn.write_paused)
        await conn.send_head(200, [("content-length", str(total))])
        for _ in range(total // MiB):
            conn.write(block)
            await conn.drain()

    async with RawUpstream(big) as up, pool_for(up) as pool:
        resp = await pool.request(b"GET", b"/", HOST, idle_timeout=5)
        # Not reading: the client stops reading the socket, kernel buffers
        # fill up and the server's writes get paused.
        await up.wait_until(lambda: bool(paused))
        await asyncio.wait_for(paused[0].wait(), 5)
        assert 0 < resp.buffered <= BUFFER_BOUND
        digest, received = hashlib.sha256(), 0
        for _ in range(100_000):
            chunk = await resp.read()
            if not chunk:
                break
            assert len(chunk) <= BUFFER_BOUND
            digest.update(chunk)
            received += len(chunk)
        assert received == total
        assert digest.digest() == hashlib.sha256(block * (total // MiB)).digest()
        assert resp.buffered_peak <= BUFFER_BOUND
        assert (pool.in_use, pool.idle) == (0, 1)


async def test_big_download_bounded_buffer() -> None:
    await scenario_big_download()


async def test_big_upload_with_drain() -> None:
    total = 64 * MiB
    block = os.urandom(256 * 1024)
    supplied = 0
    in_flight_at_start: list[int] = []

    async def body_stream() -> bytes:
        nonlocal supplied
        if supplied >= total:
            return b""
        supplied += len(block)
        return block

    async def hashes(req: Request, conn: Responder) -> None:
        # Read nothing at first: a client ignoring flow control would pull the
        # whole body from body_stream() into memory meanwhile.
        await asyncio.sleep(0.2)
        in_flight_at_start.append(supplied)
        digest = hashlib.sha256()
        for _ in range(100_000):
            chunk = await req.read_body()
            if not chunk:
                break
            digest.update(chunk)
        await conn.send(200, (), digest.hexdigest().encode())

    async with RawUpstream(hashes, stream_request_body=True) as up, pool_for(up) as pool:
        expected = hashlib.sha256(block * (total // len(block))).hexdigest().encode()
        resp = await pool.request(b"PUT", b"/up", HOST, body_stream=body_stream, idle_timeout=5)
        assert await read_all(resp) == expected
        assert up.requests[0].body_length == total
        assert in_flight_at_start[0] <= 16 * MiB, in_flight_at_start
        # Same with a declared content-length.
        supplied = 0
        resp = await pool.request(
            b"PUT", b"/up", HOST, body_stream=body_stream, content_length=total, idle_timeout=5
        )
        assert await read_all(resp) == expected
        assert up.connections == 1


async def test_early_response_during_upload() -> None:
    supplied = 0

    async def body_stream() -> bytes:
        nonlocal supplied
        supplied += 65536
        return b"u" * 65536  # endless: only an early response stops it

    async def too_large(req: Request, conn: Responder) -> None:
        await conn.send(413, [("connection", "close")], b"too big")
        for _ in range(100_000):  # keep draining so the client is not reset
            if not await req.read_body():
                break

    async with RawUpstream(too_large, stream_request_body=True) as up, pool_for(up) as pool:
        resp = await pool.request(b"POST", b"/", HOST, body_stream=body_stream, idle_timeout=5)
        assert resp.status == 413
        assert await read_all(resp) == b"too big"
        assert supplied < 64 * MiB
        assert_clean(pool)  # not reused
        await up.wait_until(lambda: up.disconnects == 1)
        resp, body = await get(pool)
        assert resp.status == 413 and up.connections == 2


async def test_early_response_while_blocked_on_drain() -> None:
    # The upstream answers and stops reading: the client, stuck waiting for
    # the transport to drain, is woken by the response head.
    async def body_stream() -> bytes:
        return b"u" * 65536

    async def refuse(req: Request, conn: Responder) -> None:
        await conn.send(413, (), b"no")
        await conn.hang()

    async with RawUpstream(refuse, stream_request_body=True) as up, pool_for(up) as pool:
        resp = await pool.request(b"POST", b"/", HOST, body_stream=body_stream)
        assert resp.status == 413 and await read_all(resp) == b"no"
        assert_clean(pool)  # closed with a RST (the paused server cannot notice)
        resp, _ = await get(pool)
        assert resp.status == 413 and up.connections == 2


async def test_upload_stall_times_out() -> None:
    async def body_stream() -> bytes:
        return b"u" * 65536

    async def never_reads(req: Request, conn: Responder) -> None:
        await conn.hang()

    async with RawUpstream(never_reads, stream_request_body=True) as up, pool_for(up) as pool:
        with pytest.raises(UpstreamTimeout) as info:
            await pool.request(b"POST", b"/", HOST, body_stream=body_stream, idle_timeout=0.2)
        assert info.value.request_sent is True
        assert_clean(pool)


async def test_slow_downstream_body_does_not_count_against_head_timeout() -> None:
    parts = [b"a", b"b", b""]

    async def slow_client() -> bytes:
        await asyncio.sleep(0.15)  # a slow downstream client, 0.45 s in total
        return parts.pop(0)

    async with RawUpstream(echo) as up, pool_for(up) as pool:
        resp = await pool.request(b"POST", b"/", HOST, body_stream=slow_client, head_timeout=0.3)
        assert await read_all(resp) == b"ab"


# -- pool limits ------------------------------------------------------------------------------------


async def test_max_connections_fifo() -> None:
    gate = asyncio.Event()

    async def first_blocks(req: Request, conn: Responder) -> None:
        if req.target == b"/blocker":
            await gate.wait()
        await conn.send(200, (), req.target)

    async with RawUpstream(first_blocks) as up, pool_for(up, max_connections=1) as pool:
        blocker = asyncio.create_task(get(pool, b"/blocker"))
        await up.wait_until(lambda: len(up.requests) == 1)
        waiters = [asyncio.create_task(get(pool, b"/%d" % i)) for i in range(3)]
        await settle(lambda: pool.pending == 3)
        assert pool.in_use == 1
        gate.set()
        await blocker
        results = await asyncio.gather(*waiters)
        assert [body for _, body in results] == [b"/0", b"/1", b"/2"]
        assert [r.target for r in up.requests] == [b"/blocker", b"/0", b"/1", b"/2"]
        assert up.connections == 1
        assert (pool.in_use, pool.idle, pool.pending) == (0, 1, 0)


async def test_pool_overflow() -> None:
    async with (
        RawUpstream(hang) as up,
        pool_for(up, max_connections=1, max_pending=1, connect_timeout=0.2) as pool,
    ):
        stuck = asyncio.create_task(pool.request(b"GET", b"/", HOST))
        await up.wait_until(lambda: len(up.requests) == 1)
        waiting = asyncio.create_task(pool.request(b"GET", b"/", HOST))
        await settle(lambda: pool.pending == 1)
        with pytest.raises(PoolOverflow) as info:  # too many waiters: immediately
            await pool.request(b"GET", b"/", HOST)
        assert info.value.request_sent is False and info.value.reason == "pool_overflow"
        with pytest.raises(PoolOverflow):  # waited connect_timeout
            await waiting
        assert pool.pending == 0 and up.connections == 1
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert_clean(pool)


async def test_slot_freed_by_a_failure_goes_to_a_waiter() -> None:
    gate = asyncio.Event()

    async def fail_first(req: Request, conn: Responder) -> None:
        if req.target == b"/fail":
            await gate.wait()
            conn.reset()
        else:
            await conn.send(200, (), b"ok")

    async with RawUpstream(fail_first) as up, pool_for(up, max_connections=1) as pool:
        failing = asyncio.create_task(pool.request(b"GET", b"/fail", HOST))
        await up.wait_until(lambda: len(up.requests) == 1)
        waiter = asyncio.create_task(get(pool))
        await settle(lambda: pool.pending == 1)
        gate.set()
        with pytest.raises(ResetBeforeHeaders):
            await failing
        resp, body = await waiter
        assert body == b"ok" and up.connections == 2


# -- cancellation -----------------------------------------------------------------------------------


async def scenario_cancel_mid_body() -> None:
    async def partial(req: Request, conn: Responder) -> None:
        await conn.send_head(200, [("content-length", "100")])
        conn.write(b"abc")
        await conn.hang()

    async with RawUpstream(partial) as up, pool_for(up) as pool:
        resp = await pool.request(b"GET", b"/", HOST)
        assert await resp.read() == b"abc"
        reader = asyncio.create_task(resp.read())
        await settle(lambda: resp._waiter is not None)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert_clean(pool)
        await up.wait_until(lambda: up.disconnects == 1)

        # asyncio.timeout around a read behaves the same.
        resp = await pool.request(b"GET", b"/", HOST)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await read_all(resp)
        assert_clean(pool)
        await up.wait_until(lambda: up.disconnects == 2)


async def test_cancel_mid_body() -> None:
    await scenario_cancel_mid_body()


async def test_cancel_waiting_for_head_and_for_a_connection() -> None:
    async with RawUpstream(hang) as up, pool_for(up, max_connections=1) as pool:
        first = asyncio.create_task(pool.request(b"GET", b"/", HOST))
        await up.wait_until(lambda: len(up.requests) == 1)
        second = asyncio.create_task(pool.request(b"GET", b"/", HOST))
        await settle(lambda: pool.pending == 1)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert (pool.in_use, pool.pending) == (1, 0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert_clean(pool)
        await up.wait_until(lambda: up.disconnects == 1)


async def test_close_abandons_unread_body() -> None:
    async with RawUpstream(ok(b"z" * 5 * MiB)) as up, pool_for(up) as pool:
        resp = await pool.request(b"GET", b"/", HOST)
        assert await resp.read()
        resp.close()
        assert_clean(pool)
        with pytest.raises(UpstreamError):
            await resp.read()
        async with await pool.request(b"GET", b"/", HOST) as resp:
            assert resp.status == 200
        assert_clean(pool)
        await up.wait_until(lambda: up.disconnects == 2)


async def test_close_pool() -> None:
    async with RawUpstream(status(204)) as up:
        pool = UpstreamPool("127.0.0.1", up.port)
        await pool.request(b"GET", b"/", HOST)
        assert pool.idle == 1
        await pool.close()
        assert pool.idle == 0
        await up.wait_until(lambda: up.disconnects == 1)
        with pytest.raises(ConnectFailure):
            await pool.request(b"GET", b"/", HOST)


# -- the same core scenarios on uvloop (Fender's production loop) -------------------------------


@pytest.mark.parametrize(
    "scenario",
    [
        scenario_keepalive_reuse,
        scenario_chunked_with_trailers,
        scenario_resets,
        scenario_cancel_mid_body,
        lambda: scenario_big_download(16 * MiB),
    ],
    ids=["keepalive", "chunked", "resets", "cancel", "download"],
)
def test_on_uvloop(scenario) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 20))
