"""Limits on what one client may hold: request line, head, head time, body time, keep-alive,
requests per connection, connections, unread responses. Real sockets, short timeouts set in
the policy; every test ends with the ``checked_fender`` checks (alive, no fd/task leak)."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import policy_text
from tests.support import procs
from tests.support.metrics import metric_value
from tests.support.raw_client import RawClient, exchange, run_load
from tests.support.raw_upstream import RawUpstream, echo, ok

checked_fender = procs.checked_fender

H = b"Host: svc\r\n"


async def test_request_line_limit_is_414_and_closes(checked_fender):
    async with RawUpstream(echo) as up:
        fender = await checked_fender(policy_text(up.port, server="max_request_line: 1KiB\n"))
        at_limit = b"/" + b"a" * 1023
        response = await exchange(fender.data_port, b"GET " + at_limit + b" HTTP/1.1\r\n" + H + b"\r\n")
        assert response.status == 200
        over = b"GET /" + b"a" * 1024 + b" HTTP/1.1\r\n" + H + b"\r\n"
        response = await exchange(fender.data_port, [over[:600], over[600:]])
        assert response.status == 414 and response.closed
        assert up.requests[0].target == at_limit and len(up.requests) == 1


async def test_default_request_line_limit_is_8kib(checked_fender):
    async with RawUpstream(echo) as up:
        fender = await checked_fender(policy_text(up.port))
        response = await exchange(fender.data_port, b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\n" + H + b"\r\n")
        assert response.status == 414
        response = await exchange(fender.data_port, b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\n" + H + b"\r\n")
        assert response.status == 200


async def test_header_count_and_size_limits_are_431(checked_fender):
    async with RawUpstream(echo) as up:
        fender = await checked_fender(
            policy_text(up.port, server="max_header_count: 10\nmax_header_bytes: 2KiB\n")
        )
        nine_more = b"".join(b"X-%d: v\r\n" % i for i in range(9))
        assert (
            await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + nine_more + b"\r\n")
        ).status == 200
        ten_more = nine_more + b"X-9: v\r\n"
        response = await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + ten_more + b"\r\n")
        assert response.status == 431 and response.closed
        big = b"X-Big: " + b"v" * 2100 + b"\r\n"
        response = await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + big + b"\r\n")
        assert response.status == 431 and response.closed
        assert len(up.requests) == 1


async def test_two_fenders_in_one_process_keep_their_own_head_limits(checked_fender):
    # Each Fender's listener has its own protocol class: the second one's 1KiB limit must not
    # become the first one's (the limits were class attributes of one shared class).
    async with RawUpstream(echo) as up:
        roomy = await checked_fender(policy_text(up.port, server="max_header_bytes: 4KiB\n"))
        tight = await checked_fender(policy_text(up.port, server="max_header_bytes: 1KiB\n"))
        head = b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 2000 + b"\r\n\r\n"
        assert (await exchange(tight.data_port, head)).status == 431
        assert (await exchange(roomy.data_port, head)).status == 200
        assert len(up.requests) == 1


async def test_slowloris_head_is_cut_with_408_while_a_normal_client_sees_no_errors(checked_fender):
    async with RawUpstream(ok(b"fine")) as up:
        fender = await checked_fender(policy_text(up.port, server="header_timeout: 300ms\n"))
        slow = [RawClient(fender.data_port) for _ in range(20)]
        for client in slow:
            await client.__aenter__()
        try:
            # each sends part of a head, then one byte every 50ms: never a complete head
            await asyncio.gather(*(c.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: ") for c in slow))
            trickle = asyncio.gather(*(c.send([b"a"] * 6, delay=0.05) for c in slow))
            load = await run_load(fender.url, rate=50, seconds=1.0, connections=2)
            await trickle
            responses = await asyncio.gather(*(c.response(timeout=3) for c in slow))
        finally:
            for client in slow:
                client.close()
        assert [r.status for r in responses] == [408] * 20
        assert all(r.closed and r.headers[b"x-fender-error"] == b"header_timeout" for r in responses)
        assert load.client_visible_errors() == 0 and load.count(200) == 50, load
        assert len(up.requests) == 50


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(checked_fender):
    async with RawUpstream(ok()) as up:
        fender = await checked_fender(policy_text(up.port, server="header_timeout: 200ms\n"))
        async with RawClient(fender.data_port) as client:
            response = await client.response(timeout=3)
        assert response.status == 408 and response.closed
        # blank lines alone do not keep a connection open either
        async with RawClient(fender.data_port) as client:
            await client.send([b"\r\n"] * 5, delay=0.05)
            assert (await client.response(timeout=3)).status == 408


async def test_header_timeout_applies_to_each_request_on_a_keepalive_connection(checked_fender):
    async with RawUpstream(ok()) as up:
        fender = await checked_fender(policy_text(up.port, server="header_timeout: 300ms\n"))
        async with RawClient(fender.data_port) as client:
            await client.send(b"GET /1 HTTP/1.1\r\n" + H + b"\r\n")
            assert (await client.response()).status == 200
            await client.send(b"GET /2 HTTP/1.1\r\nHo")
            second = await client.response(timeout=3)
        assert second.status == 408 and second.closed
        assert [r.target for r in up.requests] == [b"/1"]


async def test_slow_post_is_cut_by_the_body_idle_timeout(checked_fender):
    async with RawUpstream(echo) as up:
        routes = "- name: all\n  upstream: echo\n  idle_timeout: 300ms\n"
        fender = await checked_fender(policy_text(up.port, routes))
        async with RawClient(fender.data_port) as client:
            await client.send(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
            response = await client.response(timeout=3)
        assert response.status == 408 and response.headers[b"x-fender-error"] == b"request_body_timeout"
        assert response.closed
        assert up.requests == []


async def test_streamed_body_over_max_body_is_refused_without_reading_it_all(checked_fender):
    async with RawUpstream(echo, stream_request_body=True) as up:
        routes = "- name: all\n  upstream: echo\n  max_body: 1KiB\n"
        fender = await checked_fender(policy_text(up.port, routes))
        async with RawClient(fender.data_port) as client:
            await client.send(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
            await client.send([b"400\r\n" + b"x" * 1024 + b"\r\n"] * 2)
            response = await client.response(timeout=3)
            # the client never finished its body: the answer came as soon as the limit was crossed
        assert response.status == 413 and response.closed
        assert not any(r.complete for r in up.requests)


async def test_keepalive_idle_connections_are_closed(checked_fender):
    async with RawUpstream(ok()) as up:
        fender = await checked_fender(policy_text(up.port, server="keepalive_timeout: 1s\n"))
        async with RawClient(fender.data_port) as client:
            await client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
            response = await client.response()
            assert response.status == 200 and not response.closed
            assert await client.wait_closed(timeout=4)


async def test_max_requests_per_connection_closes_after_the_last(checked_fender):
    async with RawUpstream(echo) as up:
        fender = await checked_fender(policy_text(up.port, server="max_requests_per_connection: 3\n"))
        async with RawClient(fender.data_port) as client:
            await client.send(b"".join(b"GET /%d HTTP/1.1\r\n%s\r\n" % (i, H) for i in range(5)))
            responses = [await client.response() for _ in range(3)]
            assert await client.wait_closed()
        assert [r.headers[b"x-echo-target"] for r in responses] == [b"/0", b"/1", b"/2"]
        assert responses[2].headers[b"connection"] == b"close"
        assert b"connection" not in responses[0].headers
        assert [r.target for r in up.requests] == [b"/0", b"/1", b"/2"]


async def test_connection_cap_sheds_with_503_and_admin_keeps_answering(checked_fender):
    async with RawUpstream(ok()) as up:
        fender = await checked_fender(policy_text(up.port, server="max_connections: 4\n"))
        held = [RawClient(fender.data_port) for _ in range(4)]
        try:
            for client in held:
                await client.__aenter__()
                await client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
                assert (await client.response()).status == 200
            shed = await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + b"\r\n")
            assert shed.status == 503 and shed.closed
            assert shed.headers[b"x-fender-error"] == b"connection_limit"
            async with httpx.AsyncClient(timeout=5) as admin:
                assert (await admin.get(fender.admin_url + "/healthz")).status_code == 200
                metrics = await admin.get(fender.admin_url + "/metrics")
            assert metrics.status_code == 200
            counted = metric_value(
                metrics.text, "fender_local_responses_total", route="-", reason="connection_limit"
            )
            assert counted == 1
        finally:
            for client in held:
                client.close()
        # once the held connections are gone, new clients are served again
        await procs.wait_until(lambda: len(fender._servers[0].server_state.connections) == 0)
        assert (await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + b"\r\n")).status == 200
        assert len(up.requests) == 5


async def test_slow_reader_is_cut_by_send_timeout_and_backpressure_reaches_the_upstream(checked_fender):
    big = 64 * 1024 * 1024  # far more than loopback socket buffers (a few MiB each) can hold
    state = {}

    async def huge(req, conn):
        await conn.send_head(200, [(b"content-length", str(big).encode())])
        state["sent"] = 0
        block = b"z" * 65536
        while state["sent"] < big and not conn.is_closed:
            conn.write(block)
            state["sent"] += len(block)
            await conn.drain()

    async with RawUpstream(huge) as up:
        fender = await checked_fender(policy_text(up.port, server="send_timeout: 500ms\n"))
        async with RawClient(fender.data_port) as client:
            client.writer.transport.pause_reading()  # a client that never reads
            await client.send(b"GET /big HTTP/1.1\r\n" + H + b"\r\n")
            # Fender gives up on the client, and the upstream connection is dropped too
            await up.wait_until(lambda: up.disconnects == 1, within=10)
        # the upstream was held back by flow control (kernel buffers only): far less than the body left it
        assert state["sent"] < big // 2, state


async def test_admin_is_loopback_by_default_and_refuses_writes(checked_fender):
    from proxy.config import parse_policy

    defaults = parse_policy(
        "upstreams: {a: {replicas: [{url: 'http://127.0.0.1:1'}]}}\nroutes: [{name: r, upstream: a}]\n"
    )
    assert defaults.admin.host == "127.0.0.1"
    async with RawUpstream(ok()) as up:
        fender = await checked_fender(policy_text(up.port))
        async with httpx.AsyncClient(base_url=fender.admin_url, timeout=5) as admin:
            config = (await admin.get("/admin/config")).json()
            for path in ("/healthz", "/readyz", "/metrics", "/admin/config", "/admin/routes"):
                for method in ("POST", "PUT", "DELETE", "PATCH"):
                    assert (await admin.request(method, path)).status_code == 405, (method, path)
                assert (await admin.get(path)).status_code in (200, 503)
            # GETs changed nothing
            assert (await admin.get("/admin/config")).json() == config
