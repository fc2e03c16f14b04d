"""Fleet mode (issue 10): shared cache tier, invalidations and global rate limits on Redis.

Every Redis here is a private redis-server the tests start on 127.0.0.1
(tests/support/redis_server.py); several in-process Fenders share it, like
sidecars of one fleet.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.config.loader import PolicyError, load_policy, parse_policy
from proxy.policies.cache import codec
from proxy.policies.cache.store import Entry, Variants
from proxy.server.fender import Fender, bind_socket
from proxy.state.redis import RedisBreaker
from tests.conftest import policy_text
from tests.support.fleet import (
    HOST,
    drain_writes,
    limit_policy,
    prefix,
    redis_time,
    start_fleet,
    wait_subscribed,
)
from tests.support.metrics import get_metrics, metric_value
from tests.support.raw_upstream import RawUpstream, delayed, status
from tests.support.redis_server import redis_server_fixture  # noqa: F401  (the redis_server fixture)


def fleet_policy(
    upstream_port: int, redis_url: str, prefix: str, route_extra: str = "", state_extra: str = ""
):
    routes = f"""
      - name: all
        upstream: echo
        cache: {{default_ttl: 60s}}
{route_extra}
    """
    return policy_text(upstream_port, routes=routes) + (
        f"state:\n  backend: redis\n  redis:\n    url: {redis_url}\n    key_prefix: '{prefix}'\n"
        f"    timeout: 200ms\n{state_extra}"
    )


def upstream_hits(echo, path: str) -> int:
    return sum(1 for r in echo.requests if r["path"] == path and r["method"] == "GET")


# --------------------------------------------------------------------------- without Redis


def test_global_scope_needs_redis_backend():
    text = policy_text(
        9,
        routes="""
      - name: all
        upstream: echo
        rate_limit: {rate: 10/s, scope: global}
    """,
    )
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    assert "scope: global" in str(err.value) and "backend: redis" in str(err.value)
    policy = parse_policy(text + "state: {backend: redis}\n", "p.yaml")
    assert policy.state.redis.url == "redis://127.0.0.1:6379/0"
    assert policy.state.redis.timeout == 0.05 and policy.state.redis.on_failure == "local"
    assert policy.routes[0].rate_limit[0].scope == "global"


def test_state_rejects_a_url_that_is_not_redis():
    text = policy_text(9) + "state: {backend: redis, redis: {url: 'http://x:1'}}\n"
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    assert "is not a Redis URL" in str(err.value)


def _entry(body: bytes, fresh: float = 60.0) -> Entry:
    return Entry(
        200,
        [(b"content-type", b"text/plain"), (b"etag", b'"v1"')],
        body,
        etag=b'"v1"',
        last_modified=None,
        date=1_700_000_000.0,
        vary=(b"accept-language",),
        selection=(b"de",),
        response_time=100.0,
        initial_age=2.0,
        lifetime=fresh,
        swr=5.0,
        sie=30.0,
        must_validate=False,
    )


def test_codec_round_trip_moves_times_between_clocks():
    value = Variants([_entry(b"hello \xff world"), _entry(b"")])
    blob = codec.encode(value, offset=1000.0)  # wall = layer clock + 1000
    back = codec.decode(blob, offset=400.0)  # another sidecar: wall = its clock + 400
    assert back is not None and len(back.entries) == 2
    first = back.entries[0]
    assert first.body == b"hello \xff world" and first.headers == value.entries[0].headers
    assert first.vary == (b"accept-language",) and first.selection == (b"de",)
    # Same wall-clock instants: 600 s later on the second sidecar's clock.
    assert first.response_time == pytest.approx(700.0)
    assert first.fresh_until == pytest.approx(value.entries[0].fresh_until + 600.0)
    assert first.stale_if_error_until == pytest.approx(value.entries[0].stale_if_error_until + 600.0)
    assert first.served_headers == value.entries[0].served_headers and first.size == value.entries[0].size
    # Redis keeps it until the last stale window ends: base 98 + 60 fresh + 30 stale-if-error.
    assert codec.expiry(value, now=100.0) == pytest.approx(88.0)


def test_codec_rejects_anything_damaged():
    blob = codec.encode(Variants([_entry(b"x" * 100)]), offset=0.0)
    assert codec.decode(blob, 0.0) is not None
    damaged = [
        blob[:-1],  # truncated (a partial write)
        blob + b"x",  # trailing bytes
        blob[:-5] + b"XXXXX",  # body bytes changed: checksum
        b"FNDc\x02" + blob[5:],  # another format version
        b"junk",
        b"",
        blob[:4] + b"\x01" + b"\xff\xff\xff\xff" + blob[9:],  # meta length lies
    ]
    for bad in damaged:
        assert codec.decode(bad, 0.0) is None, bad[:12]


def test_redis_breaker_opens_after_consecutive_failures_and_lets_one_trial_through():
    clock = ManualClock()
    changes: list[bool] = []
    breaker = RedisBreaker(3, 2.0, clock, on_change=changes.append)
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive any more
    breaker.failure()
    breaker.failure()
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    assert breaker.is_open and changes == [True]
    assert not breaker.allow()
    clock.advance(2.0)
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()  # nobody else meanwhile
    breaker.failure()  # trial failed: open for another 2 s
    assert not breaker.allow()
    clock.advance(2.0)
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and changes == [True, False]


# --------------------------------------------------------------------------- with a private Redis


async def test_a_response_stored_via_one_sidecar_is_a_hit_via_another(
    redis_server, echo_upstream, start_fender
):
    a, b, c = await start_fleet(start_fender, fleet_policy(echo_upstream.port, redis_server.url, prefix()))
    async with httpx.AsyncClient(headers=HOST) as client:
        first = await client.get(a.url + "/shared/1")
        assert first.status_code == 200 and "stored" in first.headers["cache-status"]
        await drain_writes(a)  # the L2 write runs in the background
        second = await client.get(b.url + "/shared/1")
        third = await client.get(b.url + "/shared/1")
    assert second.status_code == 200 and second.headers["cache-status"].startswith("fender; hit")
    assert second.json() == first.json()
    assert third.headers["cache-status"].startswith("fender; hit")
    assert upstream_hits(echo_upstream, "/shared/1") == 1
    # Redis keeps it as long as it is fresh (default_ttl 60s, no stale windows), no longer.
    state = a.runtime.exposed["state"]["redis"]
    pttl = int(redis_server.command("PTTL", state.cache_key(b"catalog.svc/shared/1"))[1:-2])
    assert 55_000 < pttl <= 60_001
    async with httpx.AsyncClient() as client:
        fleet = (await client.get(a.admin_url + "/admin/cache")).json()["fleet"]
    assert (
        fleet["breaker"] == "closed"
        and fleet["subscribed"]
        and fleet["key_prefix"] == state.options.key_prefix
    )
    metrics_b = await get_metrics(b)
    assert metric_value(metrics_b, "fender_cache_tier_hits_total", tier="l2") == 1  # then in B's L1
    assert metric_value(metrics_b, "fender_cache_tier_hits_total", tier="l1") == 1
    assert metric_value(metrics_b, "fender_redis_calls_total", op="get", outcome="ok") >= 1
    assert metric_value(metrics_b, "fender_redis_fallback") == 0


async def test_delete_via_one_sidecar_drops_the_entry_everywhere(redis_server, echo_upstream, start_fender):
    a, b, c = await start_fleet(start_fender, fleet_policy(echo_upstream.port, redis_server.url, prefix()))
    async with httpx.AsyncClient(headers=HOST) as client:
        for fender in (a, b):
            response = await client.get(fender.url + "/doc")
            assert response.status_code == 200
            await drain_writes(fender)
        stores = [f.runtime.exposed["cache"]["store"] for f in (a, b)]
        key = b"catalog.svc/doc"
        assert [sum(1 for k in s.keys() if k.endswith(b"/doc")) for s in stores] == [1, 1]
        before = upstream_hits(echo_upstream, "/doc")
        sent = time.perf_counter()
        deleted = await client.delete(c.url + "/doc")
        answered = time.perf_counter()
        assert deleted.status_code == 200
        # Propagation: from C's response to the last of A and B dropping the key (bounded wait).
        async with asyncio.timeout(5):
            while any(k.endswith(b"/doc") for s in stores for k in s.keys()):  # noqa: ASYNC110
                await asyncio.sleep(0.0005)  # polling the stores is the measurement itself
        dropped = time.perf_counter()
        propagation = dropped - answered
        print(
            f"invalidation: last sidecar dropped the key {propagation * 1000:.2f} ms after C's response "
            f"({(dropped - sent) * 1000:.2f} ms after the DELETE was sent)"
        )
        assert (
            redis_server.command("EXISTS", a.runtime.exposed["state"]["redis"].cache_key(key).decode())
            == b":0\r\n"
        )
        again = await client.get(a.url + "/doc")
        assert "fwd=miss" in again.headers["cache-status"]
    assert upstream_hits(echo_upstream, "/doc") == before + 1
    assert propagation < 1.0
    assert metric_value(await get_metrics(c), "fender_cache_invalidations_total", direction="sent") == 1
    for fender in (a, b):
        received = metric_value(
            await get_metrics(fender), "fender_cache_invalidations_total", direction="received"
        )
        assert received == 1


async def test_an_unreadable_stored_value_is_deleted_and_treated_as_a_miss(
    redis_server, echo_upstream, start_fender
):
    (a,) = await start_fleet(start_fender, fleet_policy(echo_upstream.port, redis_server.url, prefix()), n=1)
    state = a.runtime.exposed["state"]["redis"]
    key = state.cache_key(b"catalog.svc/broken").decode()
    blob = codec.encode(Variants([_entry(b"old body")]), 0.0)
    assert redis_server.command("SET", key, blob[:-3]) == b"+OK\r\n"  # a torn value
    async with httpx.AsyncClient(headers=HOST) as client:
        response = await client.get(a.url + "/broken")
    assert response.status_code == 200 and response.json()["path"] == "/broken"
    assert "fwd=miss" in response.headers["cache-status"]
    assert upstream_hits(echo_upstream, "/broken") == 1
    assert metric_value(await get_metrics(a), "fender_redis_calls_total", op="get", outcome="invalid") == 1
    await drain_writes(a)
    # Replaced by the fresh response (a valid value), never served torn.
    stored = redis_server.command("GET", key)
    assert codec.MAGIC in stored and b"old body" not in stored


async def test_concurrent_misses_across_the_fleet_cause_one_upstream_request(
    redis_server, echo_upstream, start_fender
):
    fleet = await start_fleet(start_fender, fleet_policy(echo_upstream.port, redis_server.url, prefix()))
    async with httpx.AsyncClient(timeout=10, headers=HOST) as client:
        replies = await asyncio.gather(*[client.get(fleet[i % 3].url + "/slow?ms=300") for i in range(12)])
    assert [r.status_code for r in replies] == [200] * 12
    assert upstream_hits(echo_upstream, "/slow") == 1
    statuses = [r.headers["cache-status"] for r in replies]
    assert sum("coalesced-fleet" in s for s in statuses) >= 2  # the other two sidecars waited on Redis
    assert len({r.text for r in replies}) == 1


# --------------------------------------------------------------------------- global rate limits


@pytest.mark.parametrize(("exact", "script_calls"), [(True, 30), (False, 13)])
async def test_global_burst_is_shared_exactly_by_three_sidecars(
    redis_server, echo_upstream, start_fender, exact, script_calls
):
    # 1/m refills once a minute: within this test only the burst of 10 can pass, across the fleet.
    # exact: one script per request. Leased: batches of at most 10% of the burst (1 token here), and
    # once a sidecar's renewal came back empty it refuses locally until the next token is due (60 s):
    # 10 renewals that got a token and one empty one per sidecar.
    text = limit_policy(
        echo_upstream.port,
        redis_server.url,
        f"{{rate: 1/m, burst: 10, scope: global, exact: {str(exact).lower()}}}",
    )
    fleet = await start_fleet(start_fender, text)
    async with httpx.AsyncClient() as client:
        replies = [await client.get(fleet[i % 3].url + f"/r/{i}") for i in range(30)]
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == 10 and statuses[:10] == [200] * 10 and statuses.count(429) == 20
    first, tenth, refused = replies[0], replies[9], replies[10]
    assert first.headers["ratelimit-policy"] == '"client_ip";q=1;w=60'
    assert first.headers["ratelimit"].startswith('"client_ip";r=9;t=')
    assert tenth.headers["ratelimit"].startswith('"client_ip";r=0;t=')
    # Full again after 10 emission intervals (600 s); the next token comes 60 s after the first request.
    assert 599 <= int(tenth.headers["ratelimit"].rsplit("t=", 1)[1]) <= 600
    assert 59 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-fender-error"] == "rate_limited"
    assert len(echo_upstream.requests) == 10
    limited = [
        metric_value(await get_metrics(f), "fender_ratelimit_requests_total", decision="limited")
        for f in fleet
    ]
    assert sum(limited) == 20
    assert (
        sum(
            [
                metric_value(await get_metrics(f), "fender_redis_calls_total", op="ratelimit", outcome="ok")
                for f in fleet
            ]
        )
        == script_calls
    )


@pytest.mark.slow
async def test_global_rate_over_a_real_time_window_is_within_five_percent(
    redis_server, echo_upstream, start_fender
):
    """20/s with a burst of 5, three sidecars hammered concurrently for ~3 s of Redis time.

    GCRA admits at most burst + floor(T x rate) over T seconds, plus what the sidecars' leases
    hold (one token each at this burst), and about that when requests keep coming (the burst
    absorbs the scheduling jitter of the senders). The window
    T is measured with Redis TIME (the script's clock) around the traffic, so it is slightly
    longer than the span of the decisions. Tolerance: 5% of the expected count (about 3).
    """
    rate, burst = 20, 5
    text = limit_policy(
        echo_upstream.port,
        redis_server.url,
        f"{{rate: {rate}/s, burst: {burst}, scope: global, headers: false}}",
    )
    fleet = await start_fleet(start_fender, text)
    admitted = 0
    refused = 0
    stop = asyncio.Event()

    async def hammer(fender, client) -> None:
        nonlocal admitted, refused
        for _ in range(5000):  # bounded; the 3 s window ends far earlier at this machine's pace
            if stop.is_set():
                return
            status = (await client.get(fender.url + "/w")).status_code
            if status == 200:
                admitted += 1
            else:
                assert status == 429
                refused += 1

    async with httpx.AsyncClient() as client:
        for fender in fleet:  # open the connections before the window starts
            assert (await client.get(fender.admin_url + "/healthz")).status_code == 200
        started = redis_time(redis_server)
        tasks = [asyncio.ensure_future(hammer(f, client)) for f in fleet]
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*tasks)), timeout=3.0)
        except TimeoutError:
            pass
        stop.set()
        await asyncio.gather(*tasks)
        window = redis_time(redis_server) - started
    expected = burst + window * rate
    print(
        f"global rate: {admitted} admitted of {admitted + refused} in {window:.3f} s (expected {expected:.1f})"
    )
    assert refused > 2 * admitted  # the fleet was really saturated
    # GCRA's bound plus what the sidecars' leases may hold (docs/fleet.md: burst + rate x T + N x L,
    # L = max(1, floor(burst x lease_share)), lease_share 10% by default).
    lease = max(1, int(burst * 0.10))
    assert admitted <= burst + int(window * rate) + len(fleet) * lease
    assert abs(admitted - expected) <= 0.05 * expected


async def test_on_failure_modes_when_redis_is_unreachable(echo_upstream, start_fender):
    from tests.support.redis_server import _free_port

    dead = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    fenders = {}
    for mode in ("local", "open", "closed"):
        text = limit_policy(
            echo_upstream.port,
            dead,
            "{rate: 1/m, burst: 2, scope: global}",
            state_extra=f"    on_failure: {mode}\n    failure_threshold: 2\n    open_for: 60s\n",
            cache=True,
        )
        fenders[mode] = await start_fender(text)
    async with httpx.AsyncClient(headers=HOST) as client:
        results = {
            mode: [(await client.get(f.url + f"/{mode}")) for _ in range(4)] for mode, f in fenders.items()
        }
    # local: the same limit in this sidecar's memory (burst 2), and the cache works from L1.
    local = results["local"]
    assert [r.status_code for r in local] == [200, 200, 429, 429]
    assert local[1].headers["cache-status"].startswith("fender; hit")
    # open: admitted; closed: refused with 503, not 429 (the client exceeded nothing).
    assert [r.status_code for r in results["open"]] == [200] * 4
    closed = results["closed"]
    assert [r.status_code for r in closed] == [503] * 4
    assert (
        closed[0].headers["x-fender-error"] == "rate_limit_unavailable"
        and closed[0].headers["retry-after"] == "1"
    )
    for mode, fender in fenders.items():
        text = await get_metrics(fender)
        assert metric_value(text, "fender_redis_fallback") == 1, mode
        assert metric_value(text, "fender_redis_calls_total", op="ratelimit", outcome="rejected") >= 2, mode
    assert (
        metric_value(
            await get_metrics(fenders["open"]), "fender_ratelimit_requests_total", decision="failure_allowed"
        )
        == 4
    )
    assert (
        metric_value(
            await get_metrics(fenders["closed"]),
            "fender_ratelimit_requests_total",
            decision="failure_refused",
        )
        == 4
    )


async def test_killing_redis_mid_traffic_loses_no_request_and_sharing_resumes(
    redis_server, echo_upstream, start_fender
):
    text = limit_policy(
        echo_upstream.port,
        redis_server.url,
        "{rate: 10000/s, scope: global}",
        state_extra="    failure_threshold: 2\n    open_for: 200ms\n",
        cache=True,
    )
    fleet = await start_fleet(start_fender, text)
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(headers=HOST, timeout=5) as client:
            for i in range(150):  # bounded client loop
                if i == 50:
                    redis_server.stop()  # SIGKILL: a crash mid-traffic
                if i == 100:
                    redis_server.start()
                fender = fleet[i % 3]
                path = f"/k/{i % 7}" if i % 2 else f"/u/{i}"
                statuses.append((await client.get(fender.url + path)).status_code)
    finally:
        if redis_server.proc is None:
            redis_server.start()
    assert statuses == [200] * 150  # zero client errors
    outage = [metric_value(await get_metrics(f), "fender_redis_calls_total", outcome="error") for f in fleet]
    assert all(n >= 1 for n in outage)
    # Recovery: each sidecar subscribes again (clearing its L1: it may have missed invalidations).
    for fender in fleet:
        state = fender.runtime.exposed["state"]["redis"]
        async with asyncio.timeout(10):
            await state.wait_subscriptions(2)
        assert state.l1_clears >= 1 and not state.breaker.is_open
        assert metric_value(await get_metrics(fender), "fender_redis_fallback") == 0
    a, b = fleet[0], fleet[1]
    async with httpx.AsyncClient(headers=HOST) as client:
        stored = await client.get(a.url + "/after")
        await drain_writes(a)
        shared = await client.get(b.url + "/after")
    assert "stored" in stored.headers["cache-status"] and shared.headers["cache-status"].startswith(
        "fender; hit"
    )
    assert upstream_hits(echo_upstream, "/after") == 1


async def test_a_redis_that_never_answers_costs_timeouts_then_the_breaker_opens(echo_upstream, start_fender):
    # A TCP server that accepts and reads but never replies: every call hits state.redis.timeout.
    async def silent(reader, writer):
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        text = limit_policy(
            echo_upstream.port,
            f"redis://127.0.0.1:{port}/0",
            "{rate: 1000/s, scope: global}",
            state_extra="    failure_threshold: 2\n    open_for: 60s\n",
            cache=True,
        ).replace("timeout: 200ms", "timeout: 50ms")
        fender = await start_fender(text)
        async with httpx.AsyncClient(headers=HOST) as client:
            replies = [await client.get(fender.url + "/slow-redis") for _ in range(5)]
        assert [r.status_code for r in replies] == [200] * 5
        assert replies[-1].headers["cache-status"].startswith("fender; hit")  # L1 keeps working
        text = await get_metrics(fender)
        assert (
            metric_value(text, "fender_redis_calls_total", outcome="timeout") == 2
        )  # then the breaker opened
        assert metric_value(text, "fender_redis_calls_total", outcome="rejected") >= 3
        assert metric_value(text, "fender_redis_fallback") == 1
        assert fender.runtime.exposed["state"]["redis"].breaker.is_open
    finally:
        server.close()
        await server.wait_closed()


async def test_admin_purge_reaches_every_sidecar_and_redis(redis_server, echo_upstream, start_fender):
    a, b = await start_fleet(start_fender, fleet_policy(echo_upstream.port, redis_server.url, prefix()), n=2)
    async with httpx.AsyncClient(headers=HOST) as client:
        await client.get(a.url + "/p/1")
        await drain_writes(a)
        assert (await client.get(b.url + "/p/1")).headers["cache-status"].startswith("fender; hit")
        state = a.runtime.exposed["state"]["redis"]
        assert redis_server.command("EXISTS", state.cache_key(b"catalog.svc/p/1")) == b":1\r\n"
        purged = await client.post(a.admin_url + "/admin/cache/purge", json={"url": "http://catalog.svc/p/1"})
        assert purged.json() == {"purged": 1, "fleet": True}
        async with asyncio.timeout(5):
            await b.runtime.exposed["state"]["redis"].wait_received(1)
        assert not any(k.endswith(b"/p/1") for k in b.runtime.exposed["cache"]["store"].keys())
        assert redis_server.command("EXISTS", state.cache_key(b"catalog.svc/p/1")) == b":0\r\n"
        assert "fwd=miss" in (await client.get(b.url + "/p/1")).headers["cache-status"]


async def test_reload_keeps_the_redis_client_when_its_options_are_unchanged(
    redis_server, echo_upstream, tmp_path
):
    text = fleet_policy(echo_upstream.port, redis_server.url, prefix()) + "reload: {watch: false}\n"
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    fender = Fender(load_policy(path), str(path))
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    try:
        await wait_subscribed(fender)
        state = fender.runtime.exposed["state"]["redis"]
        path.write_text(text.replace("default_ttl: 60s", "default_ttl: 30s"))
        assert (await fender.reloader.reload("api")).result == "applied"
        # Same client, connections and subscription: nothing was reconnected.
        assert fender.runtime.exposed["state"]["redis"] is state and state.subscriptions == 1
        path.write_text(text.replace("timeout: 200ms", "timeout: 300ms"))
        assert (await fender.reloader.reload("api")).result == "applied"
        fresh = fender.runtime.exposed["state"]["redis"]
        assert fresh is not state and fresh.timeout == 0.3
        async with asyncio.timeout(5):
            await fresh.subscribed.wait()
            await state.closed.wait()  # the old client is closed once the old runtime retires
        # The cache's L1 store (kept across reloads) now gets the new client's invalidations.
        assert fender.runtime.exposed["cache"]["store"] in set(fresh._stores)
    finally:
        await fender.stop()


async def test_waiting_sidecars_stop_waiting_when_the_lock_holder_stores_nothing(redis_server, start_fender):
    """A slow 500 (never stored, never fanned out): the others go upstream themselves once the
    holder releases the fleet lock, not after lock_ttl (30 s here)."""
    async with RawUpstream(delayed(0.3, status(500, b"down"))) as up:
        text = fleet_policy(up.port, redis_server.url, prefix(), state_extra="    lock_ttl: 30s\n")
        text = text.replace("cache: {default_ttl: 60s}", "cache: {default_ttl: 60s, coalesce_timeout: 30s}")
        fleet = await start_fleet(start_fender, text)
        async with httpx.AsyncClient(timeout=20, headers=HOST) as client:
            async with asyncio.timeout(10):  # far below the 30 s lock
                replies = await asyncio.gather(*[client.get(f.url + "/down") for f in fleet])
        assert [r.status_code for r in replies] == [500] * 3
        assert len(up.requests) == 3
        metrics = [await get_metrics(f) for f in fleet]
    # Two sidecars found the lock taken and waited, then went upstream when it was released.
    assert sum(metric_value(m, "fender_cache_coalesced_total") for m in metrics) == 2
    assert sum(metric_value(m, "fender_redis_calls_total", op="lock", outcome="ok") for m in metrics) >= 4


async def test_local_and_global_limits_on_one_route(redis_server, echo_upstream, start_fender):
    """Local limits decide first in memory; the global one is shared by the fleet."""
    limits = """
          - {rate: 1/m, burst: 2, key: "header:X-Key", name: per-key}
          - {rate: 1/m, burst: 3, key: route, scope: global, name: fleet}"""
    text = limit_policy(echo_upstream.port, redis_server.url, limits)
    a, b = await start_fleet(start_fender, text, n=2)
    async with httpx.AsyncClient() as client:
        sent = [
            (a, "k1"),  # fleet 1
            (a, "k1"),  # fleet 2
            (a, "k1"),  # per-key refuses in A's memory: no Redis call, fleet untouched
            (b, "k1"),  # B has its own per-key bucket: fleet 3
            (b, "k2"),  # the fleet's burst of 3 is used up
        ]
        replies = [await client.get(f.url + "/m", headers={"X-Key": key}) for f, key in sent]
        admin = (await client.get(a.admin_url + "/admin/ratelimits")).json()["routes"]["all"]
    assert [r.status_code for r in replies] == [200, 200, 429, 200, 429]
    assert replies[2].headers["ratelimit-policy"] == '"per-key";q=1;w=60'
    # A 429 from the global limit describes both limits: the local one admitted, and kept its token
    # (issue 24: a request the fleet refuses spends nothing locally; k2's bucket is still full, r=2).
    assert replies[4].headers["ratelimit-policy"] == '"fleet";q=1;w=60, "per-key";q=1;w=60'
    assert replies[4].headers["ratelimit"].startswith('"fleet";r=0;t=')
    assert '"per-key";r=2;t=' in replies[4].headers["ratelimit"]
    ok = [
        metric_value(await get_metrics(f), "fender_redis_calls_total", op="ratelimit", outcome="ok")
        for f in (a, b)
    ]
    assert ok == [2, 2]
    assert [(limit["name"], limit.get("scope", "local")) for limit in admin["limits"]] == [
        ("per-key", "local"),
        ("fleet", "global"),
    ]
    assert admin["redis_breaker"] == "closed"


async def test_background_writes_are_bounded_in_bytes_and_count(redis_server):
    from proxy.clock import SYSTEM_CLOCK
    from proxy.metrics import Metrics
    from proxy.state import redis as fleet
    from proxy.state.options import RedisOptions

    metrics = Metrics()
    state = fleet.RedisState(RedisOptions(url=redis_server.url, key_prefix=prefix()), metrics, SYSTEM_CLOCK)
    try:
        release = asyncio.Event()

        async def slow_write() -> None:
            await release.wait()

        state.timeout = 30  # the writes below wait for the test, not for Redis
        state.background("set", slow_write, size=fleet.MAX_PENDING_BYTES - 10)
        state.background("set", slow_write, size=11)  # would pass the byte bound: skipped
        for _ in range(fleet.MAX_PENDING_WRITES - 1):
            state.background("set", slow_write)
        state.background("set", slow_write)  # would pass the count bound: skipped
        assert len(state._writes) == fleet.MAX_PENDING_WRITES
        dropped = metrics.registry.get_sample_value(
            "fender_redis_calls_total", {"op": "set", "outcome": "dropped"}
        )
        assert dropped == 2
        release.set()
        async with asyncio.timeout(5):
            await state.flush()
        assert not state._writes and state._pending_bytes == 0
    finally:
        await state.close()
