"""End-to-end behaviour of the core proxy: a real Fender between a client and real upstreams."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest

from tests.conftest import pattern_bytes, policy_text, raw_request
from tests.support.metrics import get_metrics, metric_value


async def test_get_is_proxied_with_forwarding_headers(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient() as client:
        response = await client.get(fender.url + "/items/1?b=2&a=1", headers={"X-Forwarded-For": "6.6.6.6"})
    assert response.status_code == 200
    seen = response.json()
    headers = dict(seen["headers"])
    assert seen["path"] == "/items/1" and seen["query"] == "b=2&a=1"
    assert headers["host"] == f"127.0.0.1:{fender.data_port}"  # Host preserved
    assert headers["x-forwarded-for"] == "127.0.0.1"  # an untrusted client cannot choose it
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{fender.data_port}"
    assert headers["via"] == "1.1 fender"
    assert headers["x-request-id"] == response.headers["x-request-id"]
    # hop-by-hop fields of the upstream's response never reach the client
    assert "x-upstream-private" not in response.headers
    assert "keep-alive" not in response.headers
    assert response.headers["via"] == "1.1 fender"


async def test_request_hop_by_hop_headers_are_dropped(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    raw = (
        b"GET /x HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"TE: gzip, trailers;q=1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Request-Id: client-id-1\r\n"
        b"Accept: */*\r\n\r\n"
    )
    response = await raw_request(fender.data_port, raw)
    assert response.startswith(b"HTTP/1.1 200")
    names = {name for name, _ in echo_upstream.requests[-1]["headers"]}
    assert not names & {"x-secret", "keep-alive", "proxy-connection"}
    # TE is hop-by-hop: only its "trailers" is passed on (a proxy that relays trailers may say so).
    assert [v for n, v in echo_upstream.requests[-1]["headers"] if n == "te"] == ["trailers"]
    assert "accept" in names
    assert dict(echo_upstream.requests[-1]["headers"])["x-request-id"] == "client-id-1"
    assert b"x-request-id: client-id-1" in response


async def test_rewrite_host(echo_upstream, start_fender):
    routes = """
      - name: all
        upstream: echo
        rewrite_host: true
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes))
    async with httpx.AsyncClient() as client:
        response = await client.get(fender.url + "/", headers={"Host": "public.example"})
    headers = dict(response.json()["headers"])
    assert headers["host"] == f"127.0.0.1:{echo_upstream.port}"
    assert headers["x-forwarded-host"] == "public.example"


async def test_routing_first_match_methods_and_404(echo_upstream, start_fender):
    routes = """
      - name: reads
        match: {path_prefix: /public/, methods: [GET, HEAD]}
        upstream: echo
      - name: exact
        match: {path: /login}
        upstream: echo
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes))
    async with httpx.AsyncClient() as client:
        assert (await client.get(fender.url + "/public/a")).status_code == 200
        assert (await client.head(fender.url + "/public/a")).status_code == 200
        assert (await client.post(fender.url + "/login", content=b"x")).status_code == 200
        post = await client.post(fender.url + "/public/a", content=b"x")
        # normalisation happens before matching: this is /admin, which no route takes
        sneaky = await client.get(fender.url + "/public/../admin")
        missing = await client.get(fender.url + "/nowhere")
    for response in (post, sneaky, missing):
        assert response.status_code == 404
        assert response.headers["x-fender-error"] == "no_route"
    assert len(echo_upstream.requests) == 3
    text = await get_metrics(fender)
    assert metric_value(text, "fender_no_route_total") == 3
    assert metric_value(text, "fender_requests_total", route="reads", method="GET", status_class="2xx") == 1
    assert metric_value(text, "fender_requests_total", route="exact", method="POST", status_class="2xx") == 1


async def test_connect_failure_is_502_and_counted(start_fender):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    fender = await start_fender(policy_text(dead_port))
    async with httpx.AsyncClient() as client:
        response = await client.get(fender.url + "/")
    assert response.status_code == 502
    assert response.headers["x-fender-error"] == "connect_failure"
    text = await get_metrics(fender)
    assert metric_value(text, "fender_upstream_errors_total", upstream="echo", reason="connect_failure") == 1
    assert metric_value(text, "fender_local_responses_total", route="all", reason="connect_failure") == 1
    assert metric_value(text, "fender_requests_total", route="all", status_class="5xx") == 1


async def test_slow_upstream_is_504(echo_upstream, start_fender):
    routes = """
      - name: all
        upstream: echo
        timeout: 200ms
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes))
    async with httpx.AsyncClient() as client:
        slow = await client.get(fender.url + "/slow?ms=1000")
        fast = await client.get(fender.url + "/slow?ms=0")
    assert slow.status_code == 504
    assert slow.headers["x-fender-error"] == "timeout"
    assert fast.status_code == 200
    text = await get_metrics(fender)
    assert metric_value(text, "fender_upstream_errors_total", reason="timeout") == 1


async def test_body_limits_413(echo_upstream, start_fender):
    routes = """
      - name: all
        upstream: echo
        max_body: 1KiB
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes))
    async with httpx.AsyncClient() as client:
        ok = await client.post(fender.url + "/hash", content=b"a" * 1024)
        declared = await client.post(fender.url + "/hash", content=b"a" * 1025)

        async def chunks():
            for _ in range(4):
                yield b"b" * 512

        chunked = await client.post(fender.url + "/hash", content=chunks())
    assert ok.status_code == 200 and ok.json()["body_length"] == 1024
    assert declared.status_code == 413 and declared.headers["x-fender-error"] == "body_too_large"
    assert chunked.status_code == 413
    # the declared-too-large request never reached the upstream
    assert [r["body_length"] for r in echo_upstream.requests][:1] == [1024]
    assert all(r["body_length"] != 1025 for r in echo_upstream.requests)


async def test_request_head_limits_431_and_414(echo_upstream, start_fender):
    server = """
      max_header_bytes: 4KiB
      max_header_count: 20
    """
    fender = await start_fender(policy_text(echo_upstream.port, server=server))
    big_header = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 5000 + b"\r\n\r\n"
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(25)) + b"\r\n"
    long_url = b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    for raw, status in ((big_header, b"431"), (many, b"431"), (long_url, b"414")):
        response = await raw_request(fender.data_port, raw)
        assert response.startswith(b"HTTP/1.1 " + status), response[:80]
        assert b"x-fender-error: header_too_large" in response
    assert echo_upstream.requests == []
    # a request within the limits still works
    async with httpx.AsyncClient() as client:
        assert (await client.get(fender.url + "/", headers={"X-Ok": "v" * 1000})).status_code == 200


async def test_no_open_proxy(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    other = await raw_request(
        fender.data_port, b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example.internal\r\n\r\n"
    )
    assert other.startswith(b"HTTP/1.1 400") and b"absolute-form" in other
    connect = await raw_request(
        fender.data_port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
    )
    assert connect.startswith(b"HTTP/1.1 400")
    assert echo_upstream.requests == []
    # absolute form naming the Host it is sent to is plain HTTP/1.1 and is served
    same = await raw_request(fender.data_port, b"GET http://svc.local/ok HTTP/1.1\r\nHost: svc.local\r\n\r\n")
    assert same.startswith(b"HTTP/1.1 200")
    assert echo_upstream.requests[-1]["path"] == "/ok"


async def test_malformed_requests_get_4xx_and_others_unaffected(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient() as client:
        # a keep-alive client in the middle of its work
        assert (await client.get(fender.url + "/before")).status_code == 200
        for raw in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
            b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        ):
            response = await raw_request(fender.data_port, raw)
            assert response.startswith(b"HTTP/1.1 400"), (raw, response[:100])
        assert (await client.get(fender.url + "/after")).status_code == 200
    assert [r["path"] for r in echo_upstream.requests] == ["/before", "/after"]


async def test_head_and_no_body_statuses(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient() as client:
        head = await client.head(fender.url + "/x")
        no_content = await client.get(fender.url + "/status/204")
        not_modified = await client.get(fender.url + "/status/304")
        teapot = await client.get(fender.url + "/status/418")
    assert head.status_code == 200 and head.content == b""
    assert no_content.status_code == 204 and no_content.content == b""
    assert not_modified.status_code == 304
    assert teapot.status_code == 418 and teapot.json()["path"] == "/status/418"


async def test_streaming_both_ways_checked_by_hash(echo_upstream, start_fender):
    fender = await start_fender(
        policy_text(
            echo_upstream.port,
            """
      - name: all
        upstream: echo
        max_body: 0B
    """,
        )
    )
    size = 48 * 1024 * 1024
    async with httpx.AsyncClient(timeout=60) as client:
        digest = hashlib.sha256()
        received = 0
        async with client.stream("GET", fender.url + f"/stream?size={size}") as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                digest.update(chunk)
                received += len(chunk)
        assert received == size
        assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()

        async def upload():
            step = 256 * 1024
            for offset in range(0, size, step):
                yield pattern_bytes(step, offset)

        response = await client.post(fender.url + "/hash", content=upload())
    assert response.json()["body_length"] == size
    assert response.json()["body_sha256"] == hashlib.sha256(pattern_bytes(size)).hexdigest()


async def _dying_upstream(behaviour: bytes):
    """A raw upstream that reads one request head and then sends `behaviour` and closes."""

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(behaviour)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_upstream_dying_mid_body_cuts_only_that_response(echo_upstream, start_fender):
    server, port = await _dying_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"a" * 10)
    upstreams = f"""
    dying:
      replicas: [{{url: http://127.0.0.1:{port}}}]
    """
    routes = """
      - name: dying
        match: {path_prefix: /dying}
        upstream: dying
      - name: all
        upstream: echo
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes, upstreams))
    async with server, httpx.AsyncClient() as client:
        healthy = client.build_request("GET", fender.url + "/fine")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(fender.url + "/dying")
        assert (await client.send(healthy)).status_code == 200
        cut = await raw_request(fender.data_port, b"GET /dying HTTP/1.1\r\nHost: a\r\n\r\n")
        assert cut.startswith(b"HTTP/1.1 200") and cut.endswith(b"a" * 10)
    text = await get_metrics(fender)
    assert metric_value(text, "fender_upstream_errors_total", upstream="dying", reason="reset_mid_body") == 2


async def test_upstream_closing_before_response_is_502(start_fender, echo_upstream):
    server, port = await _dying_upstream(b"")
    fender = await start_fender(policy_text(port))
    async with server, httpx.AsyncClient() as client:
        response = await client.get(fender.url + "/")
    assert response.status_code == 502 and response.headers["x-fender-error"] == "reset"


async def test_request_body_idle_timeout_is_408(echo_upstream, start_fender):
    routes = """
      - name: all
        upstream: echo
        idle_timeout: 200ms
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes))
    # declares 10 bytes, sends 3, then stalls
    response = await raw_request(
        fender.data_port, b"POST /hash HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc", timeout=5
    )
    assert response.startswith(b"HTTP/1.1 408")
    assert echo_upstream.requests == []


async def test_admin_endpoints(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient() as client:
        await client.get(fender.url + "/warm")
        health = await client.get(fender.admin_url + "/healthz")
        ready = await client.get(fender.admin_url + "/readyz")
        config = await client.get(fender.admin_url + "/admin/config")
        routes = await client.get(fender.admin_url + "/admin/routes")
        metrics = await client.get(fender.admin_url + "/metrics")
    assert health.status_code == 200
    assert ready.status_code == 200 and ready.json()["ready"] is True
    policy = config.json()["policy"]
    assert policy["routes"][0]["timeout"] == "15s"  # defaults filled in, in policy notation
    assert policy["upstreams"]["echo"]["pool"]["connect_timeout"] == "1s"
    assert routes.json()["routes"][0]["name"] == "all"
    assert routes.json()["routes"][0]["replicas"][0]["name"] == f"127.0.0.1:{echo_upstream.port}"
    for family in (
        "fender_requests_total",
        "fender_request_duration_seconds_bucket",
        "fender_requests_in_flight",
        "fender_upstream_request_duration_seconds_bucket",
        "fender_upstream_requests_total",
    ):
        assert family in metrics.text
    assert metric_value(metrics.text, "fender_upstream_requests_total", upstream="echo", outcome="2xx") == 1


async def test_readyz_is_503_when_an_upstream_is_unreachable(start_fender):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    fender = await start_fender(policy_text(dead_port))
    async with httpx.AsyncClient() as client:
        ready = await client.get(fender.admin_url + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["upstreams"]["echo"]["reachable"] is False


async def test_keepalive_connection_reused_across_requests(echo_upstream, start_fender):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient() as client:
        for i in range(5):
            assert (await client.get(fender.url + f"/n{i}")).status_code == 200
    replica = fender.runtime.upstreams["echo"].replicas[0]
    assert replica.pool.idle == 1 and replica.pool.in_use == 0


def test_json_of_every_local_reason_is_documented():
    # The reason table of docs/requests.md and proxy/kernel/reasons.py say the same, both ways.
    import re
    from pathlib import Path

    from proxy.kernel.reasons import LOCAL_STATUS

    readme = (Path(__file__).resolve().parent.parent / "docs" / "requests.md").read_text()
    section = readme.split("## Errors Fender answers itself", 1)[1].split("\n## ", 1)[0]
    documented = {m[1]: int(m[0]) for m in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", section, re.M)}
    for reason, status in LOCAL_STATUS.items():
        if reason == "reset_mid_body":
            assert "`reset_mid_body`" in readme
            continue
        assert documented.get(reason) == status, reason
    assert set(documented) <= set(LOCAL_STATUS), set(documented) - set(LOCAL_STATUS)
    json.dumps(LOCAL_STATUS)


async def test_exactly_one_date_header(echo_upstream, start_fender):
    """The upstream's Date is passed on; Fender adds one only where there is none (local answers)."""
    fender = await start_fender(policy_text(echo_upstream.port))
    proxied = await raw_request(fender.data_port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    local = await raw_request(fender.data_port, b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n")
    for response in (proxied, local):
        head = response.split(b"\r\n\r\n", 1)[0].lower()
        assert head.count(b"\r\ndate: ") == 1, head
