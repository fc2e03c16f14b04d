"""Deadline propagation (Fender-Deadline-Ms) and explanations (Fender-Trace), over real sockets."""

from __future__ import annotations

import asyncio
import json

import httpx

from proxy.config import parse_policy
from proxy.dataplane.app import _trusted_peer
from proxy.dataplane.runtime import Runtime
from proxy.metrics import Metrics
from tests.conftest import policy_text
from tests.support.metrics import get_metrics, metric_value
from tests.support.raw_upstream import RawUpstream, echo


def upstream_header(response: httpx.Response, name: str) -> list[str]:
    return [v for k, v in json.loads(response.headers["x-echo-headers"]) if k == name]


async def test_time_left_is_sent_upstream_and_can_be_turned_off(start_fender):
    async with RawUpstream(echo) as up:
        routes = """
        - {name: on, upstream: echo, match: {path_prefix: /on}, timeout: 3s}
        - {name: off, upstream: echo, propagate_deadline: false}
        """
        fender = await start_fender(policy_text(up.port, routes=routes))
        async with httpx.AsyncClient() as client:
            on = await client.get(fender.url + "/on")
            off = await client.get(fender.url + "/off")
    [sent] = upstream_header(on, "fender-deadline-ms")
    assert 0 < int(sent) <= 3000
    assert upstream_header(off, "fender-deadline-ms") == []


async def test_an_incoming_deadline_shortens_the_route_deadline(start_fender):
    async def hangs(req, conn):
        await conn.hang()

    async with RawUpstream(echo) as up, RawUpstream(hangs) as stuck:
        routes = """
        - {name: fast, upstream: echo, match: {path_prefix: /fast}, timeout: 10s}
        - {name: stuck, upstream: stuck, timeout: 30s}
        """
        upstreams = f"""
        stuck:
          replicas: [{{url: http://127.0.0.1:{stuck.port}}}]
        """
        fender = await start_fender(policy_text(up.port, routes=routes, upstreams=upstreams))
        async with httpx.AsyncClient(timeout=10) as client:
            # The caller gives 1500ms: the upstream is told no more than that, whatever the route allows.
            r = await client.get(fender.url + "/fast", headers={"fender-deadline-ms": "1500"})
            [sent] = upstream_header(r, "fender-deadline-ms")
            assert 0 < int(sent) <= 1500
            # A longer caller deadline does not extend the route's own.
            r = await client.get(fender.url + "/fast", headers={"fender-deadline-ms": "99999999"})
            assert 9000 < int(upstream_header(r, "fender-deadline-ms")[0]) <= 10000
            # A caller that has given up: no upstream call at all.
            r = await client.get(fender.url + "/fast", headers={"fender-deadline-ms": "0"})
            assert r.status_code == 504 and r.headers["x-fender-error"] == "timeout"
            assert len(up.requests) == 2
            # A hung upstream is abandoned at the caller's deadline, not the route's 30s.
            r = await client.get(fender.url + "/stuck", headers={"fender-deadline-ms": "300"})
            assert r.status_code == 504 and r.headers["x-fender-error"] == "timeout"


async def test_a_chain_of_fenders_stops_working_when_the_first_gives_up(start_fender):
    async def hangs(req, conn):
        await conn.hang()

    async with RawUpstream(hangs) as stuck:
        inner = await start_fender(
            policy_text(stuck.port, routes="- {name: inner, upstream: echo, timeout: 30s}")
        )
        outer = await start_fender(
            policy_text(inner.data_port, routes="- {name: outer, upstream: echo, timeout: 400ms}")
        )
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(outer.url + "/")
        assert r.status_code == 504
        for _ in range(100):  # bounded: the inner Fender answers its own 504 within its shortened deadline
            if metric_value(await get_metrics(inner), "fender_local_responses_total", reason="timeout"):
                break
            await asyncio.sleep(0.05)
        assert metric_value(await get_metrics(inner), "fender_local_responses_total", reason="timeout") == 1
        [request] = stuck.requests
        assert 0 < int(request.header(b"fender-deadline-ms")) < 400


async def test_explain_lists_breaker_tries_and_backoff_in_order(start_fender):
    calls = 0

    async def fail_once(req, conn):
        nonlocal calls
        calls += 1
        await conn.send(503 if calls == 1 else 200, [], b"")

    async with RawUpstream(fail_once) as up:
        routes = """
        - name: all
          upstream: echo
          explain: true
          circuit_breaker: {}
          retry: {backoff: {initial: 2ms, max: 2ms, jitter: none}}
        """
        fender = await start_fender(policy_text(up.port, routes=routes))
        async with httpx.AsyncClient() as client:
            r = await client.get(fender.url + "/")
    assert r.status_code == 200
    entries = r.headers["fender-trace"].split("; ")
    replica = f"127.0.0.1:{up.port}"
    assert entries[0] == "breaker echo closed"
    assert entries[1].startswith(f"try {replica} 503 ")
    assert entries[2] == "retry 1 after 503, backoff 2.0ms"
    assert entries[3].startswith(f"try {replica} 200 ")
    assert len(entries) == 4


async def test_fender_explain_header_is_honoured_from_loopback_and_tracing_is_off_otherwise(start_fender):
    async with RawUpstream(echo) as up:
        fender = await start_fender(policy_text(up.port))
        async with httpx.AsyncClient() as client:
            plain = await client.get(fender.url + "/")
            asked = await client.get(fender.url + "/", headers={"fender-explain": "1"})
    assert "fender-trace" not in plain.headers
    assert asked.headers["fender-trace"].startswith(f"try 127.0.0.1:{up.port} 200 ")
    # Fender's own request headers are not passed on upstream.
    assert upstream_header(asked, "fender-explain") == []


def test_only_loopback_and_trusted_proxies_may_ask_for_explanations():
    text = policy_text(1, server="trusted_proxies: [10.1.0.0/16]\n")
    runtime = Runtime(parse_policy(text, "t.yaml"), Metrics())
    assert _trusted_peer(("127.0.0.1", 5000), runtime)
    assert _trusted_peer(("::1", 5000), runtime)
    assert _trusted_peer(("10.1.2.3", 5000), runtime)
    assert not _trusted_peer(("10.2.0.1", 5000), runtime)
    assert not _trusted_peer(None, runtime)
