"""Overload: Fender sheds instead of queueing without bound, slow clients cost a bounded amount
of memory, and fds come back after the storm. The memory tests run Fender as a subprocess
and read its RSS and fds from /proc; they end with FenderSubprocess.check() (alive, admin
answers, fds back to baseline).

Pending (built in parallel by the policy issues): bulkhead and rate-limit shedding.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import policy_text
from tests.support import procs
from tests.support.raw_client import RawClient, exchange, run_load
from tests.support.raw_upstream import RawUpstream, ok

checked_fender = procs.checked_fender
checked_fender_process = procs.checked_fender_process

H = b"Host: svc\r\n"
GET = b"GET / HTTP/1.1\r\n" + H + b"\r\n"


async def test_pool_overflow_sheds_with_503_while_the_upstream_is_still_busy(checked_fender):
    release = asyncio.Event()

    async def held(req, conn):
        await asyncio.wait_for(release.wait(), 10)
        await conn.send(200, (), b"done")

    async with RawUpstream(held) as up:
        text = policy_text(up.port, "- name: all\n  upstream: echo\n  timeout: 10s\n")
        pool = "    pool: {max_connections: 1, max_keepalive: 1, max_pending: 2, connect_timeout: 10s}\n"
        text = text.replace("    replicas: [", pool + "    replicas: [")
        fender = await checked_fender(text)
        tasks = [asyncio.ensure_future(exchange(fender.data_port, GET, timeout=10)) for _ in range(10)]
        # 1 request holds the only connection, 2 wait for it: the other 7 are shed at once,
        # while the upstream has not answered anything yet
        await up.wait_until(lambda: len(up.requests) == 1)
        done: set = set()
        async with asyncio.timeout(5):
            while len(done) < 7:
                finished, _ = await asyncio.wait(set(tasks) - done, return_when=asyncio.FIRST_COMPLETED)
                done |= finished
        shed = [t.result() for t in done]
        # the upstream is still busy: it has the one request, and the three admitted ones are all pending
        assert len(up.requests) == 1 and not any(t.done() for t in set(tasks) - done)
        assert len(shed) == 7 and {r.status for r in shed} == {503}
        assert {r.headers[b"x-fender-error"] for r in shed} == {b"pool_overflow"}
        release.set()
        served = await asyncio.gather(*(t for t in tasks if t not in done))
        assert [r.status for r in served] == [200, 200, 200]
        assert len(up.requests) == 3


async def test_a_connection_flood_beyond_the_cap_is_refused_and_normal_traffic_recovers(checked_fender):
    async with RawUpstream(ok()) as up:
        fender = await checked_fender(
            policy_text(up.port, server="max_connections: 20\nheader_timeout: 500ms\n")
        )
        # 20 idle connections fill the cap (held until the header timeout); 40 more flood in with requests
        held = [RawClient(fender.data_port) for _ in range(20)]
        flood = [RawClient(fender.data_port) for _ in range(40)]
        try:
            for client in held + flood:
                await client.__aenter__()
            accepted = fender._servers[0].server_state.connections
            await procs.wait_until(lambda: len(accepted) == 60, what=lambda: f"{len(accepted)} accepted")
            for client in flood:
                await client.send(GET)
            # the admin port stays up meanwhile
            async with httpx.AsyncClient(timeout=5) as admin:
                assert (await admin.get(fender.admin_url + "/healthz")).status_code == 200
            refused = await asyncio.gather(*(c.response(timeout=5) for c in flood))
            cut = await asyncio.gather(*(c.response(timeout=5) for c in held))
        finally:
            for client in held + flood:
                client.close()
        # every request beyond the cap was refused (the cap acted), every idle one cut by the header timeout
        assert [(r.status, r.headers.get(b"x-fender-error")) for r in refused] == [
            (503, b"connection_limit")
        ] * 40
        assert [r.status for r in cut] == [408] * 20
        assert up.requests == []
        # after the flood: a steady client gets everything
        load = await run_load(fender.url, rate=50, seconds=0.6, connections=2)
        assert load.client_visible_errors() == 0, load


async def test_slow_clients_cost_bounded_memory_and_release_their_fds(checked_fender_process):
    async with RawUpstream(ok(b"fine")) as up:
        routes = "- name: all\n  upstream: echo\n  idle_timeout: 1s\n"
        text = policy_text(up.port, routes, server="header_timeout: 1s\n")
        fender = await checked_fender_process(text, lambda: up.open_connections)
        # warm up the process (imports, first request paths) before measuring
        load = await run_load(fender.url, rate=50, seconds=0.5, connections=2)
        assert load.client_visible_errors() == 0
        before = fender.rss_kib()
        slow = [RawClient(fender.port) for _ in range(300)]
        for client in slow:
            await client.__aenter__()
        try:
            # slowloris heads (each just under 4 KiB) and slow POST bodies (buffered by Fender
            # before any upstream connection is taken, as they fit the 64 KiB buffering limit)
            heads = b"GET / HTTP/1.1\r\nHost: svc\r\nX-Pad: " + b"p" * 4000
            posts = b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 60000\r\n\r\n" + b"b" * 4000
            await asyncio.gather(*(c.send(heads if i % 2 else posts) for i, c in enumerate(slow)))
            await procs.wait_until(lambda: fender.fds() >= fender.base_fds + 300, within=5)
            during = fender.rss_kib()
            normal = await run_load(fender.url, rate=40, seconds=0.5, connections=2)
            answers = await asyncio.gather(*(c.response(timeout=10) for c in slow), return_exceptions=True)
        finally:
            for client in slow:
                client.close()
        # a concurrent normal client saw no errors
        assert normal.client_visible_errors() == 0, normal
        # the slow ones were cut by the header timeout (408) or the body idle timeout (408)
        statuses = [a.status for a in answers if not isinstance(a, BaseException)]
        assert len(statuses) >= 290 and set(statuses) == {408}, set(statuses)
        # memory per slow connection stays within a fixed buffer (64 KiB is uvicorn's read high-water mark)
        growth = during - before
        print(f"RSS before {before} KiB, with 300 slow clients {during} KiB (+{growth} KiB)")
        assert growth < 300 * 64, f"RSS grew {growth} KiB for 300 slow clients"
        # (checked_fender_process then checks: alive, admin answers, fds back to baseline)
