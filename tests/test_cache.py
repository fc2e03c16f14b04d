"""The response cache end to end: a real Fender with a ManualClock in front of a scripted raw upstream."""

# ruff: noqa: F811  (the origin and clock fixtures come from tests/support/cache.py)

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx
import pytest

from tests.support.cache import CACHE_ROUTE, Origin, cached_fender, clock, metric, origin  # noqa: F401  (fixtures)


def http_date(offset: float = 0.0) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


class CountTo:
    """Wraps a metric child: counts inc() calls and sets ``reached`` at ``n`` (an event to wait on)."""

    def __init__(self, inner, n: int) -> None:
        self.inner = inner
        self.n = n
        self.count = 0
        self.reached = asyncio.Event()

    def inc(self, amount: float = 1) -> None:
        self.inner.inc(amount)
        self.count += 1
        if self.count >= self.n:
            self.reached.set()


def cache_layer(fender):
    layer = fender.runtime.routes[0].pipeline.__self__  # the layer's bound __call__ (see pipeline.py)
    assert type(layer).__name__ == "CacheLayer"
    return layer


def waiters(fender, n: int) -> asyncio.Event:
    """An event set once ``n`` requests are waiting for another's upstream response."""
    layer = cache_layer(fender)
    layer.m_coalesced = CountTo(layer.m_coalesced, n)
    return layer.m_coalesced.reached


# --------------------------------------------------------------------------- freshness and Age


async def test_max_age_hit_then_stale_after_clock_moves(start_fender, origin, clock):
    origin.script["/a"] = (200, [("cache-control", "max-age=60")], b"first")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r1 = await client.get("/a")
        assert r1.status_code == 200 and r1.text == "first"
        assert r1.headers["cache-status"] == "fender; fwd=miss; fwd-status=200; stored"
        clock.advance(30)
        r2 = await client.get("/a")
        assert r2.text == "first"
        assert r2.headers["cache-status"] == "fender; hit; ttl=30"
        assert r2.headers["age"] == "30"
        assert len(origin.calls("/a")) == 1
        origin.script["/a"] = (200, [("cache-control", "max-age=60")], b"second")
        clock.advance(31)  # age 61 > max-age 60: stale, no validators, so a plain request upstream
        r3 = await client.get("/a")
        assert r3.text == "second"
        assert r3.headers["cache-status"].startswith("fender; fwd=stale; fwd-status=200")
        assert len(origin.calls("/a")) == 2
    assert metric(fender, "fender_cache_requests_total", route="cached", result="hit") == 1


async def test_age_header_from_upstream_counts_toward_freshness(start_fender, origin, clock):
    origin.script["/aged"] = (200, [("cache-control", "max-age=60"), ("age", "50")], b"x")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/aged")
        clock.advance(5)
        r = await client.get("/aged")
        assert r.headers["age"] == "55" and r.headers["cache-status"] == "fender; hit; ttl=5"
        clock.advance(6)  # 61 > 60
        await client.get("/aged")
    assert len(origin.calls("/aged")) == 2


async def test_s_maxage_wins_over_max_age_for_a_shared_cache(start_fender, origin, clock):
    origin.script["/s"] = (200, [("cache-control", "max-age=10, s-maxage=100")], b"s")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/s")
        clock.advance(50)
        r = await client.get("/s")
    assert r.headers["cache-status"].startswith("fender; hit")
    assert len(origin.calls("/s")) == 1


async def test_expires_minus_date_gives_the_lifetime(start_fender, origin, clock):
    # Dates have one-second resolution: Date is "now" rounded down, so allow a second either side.
    origin.script["/e"] = lambda req: (200, [("date", http_date()), ("expires", http_date(100))], b"e")
    origin.script["/bad"] = (200, [("expires", "0")], b"bad")  # invalid Expires = already expired
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/e")
        clock.advance(97)
        assert (await client.get("/e")).headers["cache-status"].startswith("fender; hit")
        clock.advance(5)  # 102 > 100
        assert (await client.get("/e")).headers["cache-status"].startswith("fender; fwd=")
        await client.get("/bad")
        assert (await client.get("/bad")).headers["cache-status"].startswith("fender; fwd=miss")
    assert len(origin.calls("/e")) == 2
    assert len(origin.calls("/bad")) == 2


async def test_heuristic_freshness_from_last_modified_then_revalidation(start_fender, origin, clock):
    last_modified = http_date(-1000)

    def respond(req):
        if req.header("if-modified-since") == last_modified.encode():
            return (304, [], b"")
        return (200, [("date", http_date()), ("last-modified", last_modified)], b"heuristic")

    origin.script["/h"] = respond
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/h")
        clock.advance(50)  # 10% of 1000s = 100s heuristic lifetime
        assert (await client.get("/h")).headers["cache-status"].startswith("fender; hit")
        clock.advance(60)
        r = await client.get("/h")
        assert r.text == "heuristic"
        assert r.headers["cache-status"] == "fender; fwd=stale; fwd-status=304"
    assert [c.header("if-modified-since") for c in origin.calls("/h")] == [None, last_modified.encode()]
    assert metric(fender, "fender_cache_revalidations_total", result="not_modified") == 1


async def test_no_freshness_and_no_validators_is_not_stored_unless_default_ttl(start_fender, origin, clock):
    origin.script["/plain"] = (200, [], b"plain")
    fender = await cached_fender(start_fender, origin, clock, "default_ttl: 30s")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/plain")
        r = await client.get("/plain")
    assert r.headers["cache-status"] == "fender; hit; ttl=30"
    assert len(origin.calls("/plain")) == 1


# --------------------------------------------------------------------------- what is never stored


@pytest.mark.parametrize(
    ("cache_control", "request_headers"),
    [
        ("no-store", {}),
        ("private", {}),
        ("max-age=60", {"authorization": "Bearer x"}),
        ("max-age=60", {"cache-control": "no-store"}),
    ],
)
async def test_not_stored(start_fender, origin, clock, cache_control, request_headers):
    origin.script["/n"] = (200, [("cache-control", cache_control)], b"n")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        for _ in range(2):
            r = await client.get("/n", headers=request_headers)
            assert r.headers["cache-status"].startswith("fender; fwd=miss")
    assert len(origin.calls("/n")) == 2


@pytest.mark.parametrize("allow", ["public, max-age=60", "s-maxage=60", "must-revalidate, max-age=60"])
async def test_authorization_stored_when_the_response_allows(start_fender, origin, clock, allow):
    origin.script["/auth"] = (200, [("cache-control", allow)], b"shared")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/auth", headers={"authorization": "Bearer a"})
        r = await client.get("/auth", headers={"authorization": "Bearer a"})
    assert r.headers["cache-status"].startswith("fender; hit")
    assert len(origin.calls("/auth")) == 1


async def test_no_cache_is_stored_but_validated_every_time(start_fender, origin, clock):
    def respond(req):
        if req.header("if-none-match") == b'"v1"':
            return (304, [("etag", '"v1"')], b"")
        return (200, [("cache-control", "no-cache"), ("etag", '"v1"')], b"body-v1")

    origin.script["/nc"] = respond
    fender = await cached_fender(start_fender, origin, clock, "stale_if_error: 5m")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/nc")
        r = await client.get("/nc")
    assert r.text == "body-v1" and r.headers["cache-status"] == "fender; fwd=stale; fwd-status=304"
    assert [c.header("if-none-match") for c in origin.calls("/nc")] == [None, b'"v1"']


async def test_private_set_cookie_and_hop_by_hop_fields_are_not_served_from_cache(
    start_fender, origin, clock
):
    # (A Set-Cookie the upstream does not name in private="..." keeps its response out of the cache:
    # tests/test_cache_rfc_round2.py.)
    headers = [
        ("cache-control", 'max-age=60, private="Set-Cookie"'),
        ("set-cookie", "session=alice"),
        ("connection", "x-private"),
        ("x-private", "hop"),
        ("x-kept", "yes"),
    ]
    origin.script["/c"] = (200, headers, b"c")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        first = await client.get("/c")
        second = await client.get("/c")
    assert first.headers["set-cookie"] == "session=alice"  # the response it was meant for
    assert second.headers["cache-status"].startswith("fender; hit")
    assert "set-cookie" not in second.headers and "x-private" not in second.headers
    assert second.headers["x-kept"] == "yes"


# --------------------------------------------------------------------------- Vary and keys


async def test_vary_stores_one_variant_per_selecting_value(start_fender, origin, clock):
    origin.script["/v"] = lambda req: (
        200,
        [("cache-control", "max-age=60"), ("vary", "Accept-Language")],
        b"lang=" + (req.header("accept-language") or b"none"),
    )
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        en = await client.get("/v", headers={"accept-language": "en"})
        de = await client.get("/v", headers={"accept-language": "de"})
        assert de.headers["cache-status"].startswith("fender; fwd=vary-miss")
        en2 = await client.get("/v", headers={"accept-language": "en"})
        de2 = await client.get("/v", headers={"accept-language": "de"})
    assert (en.text, de.text, en2.text, de2.text) == ("lang=en", "lang=de", "lang=en", "lang=de")
    assert en2.headers["cache-status"].startswith("fender; hit")
    assert de2.headers["cache-status"].startswith("fender; hit")
    assert len(origin.calls("/v")) == 2


async def test_vary_star_is_never_served_from_cache(start_fender, origin, clock):
    origin.script["/star"] = (200, [("cache-control", "max-age=60"), ("vary", "*")], b"*")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/star")
        await client.get("/star")
    assert len(origin.calls("/star")) == 2


async def test_sorted_query_and_key_headers(start_fender, origin, clock):
    origin.script["/q"] = (200, [("cache-control", "max-age=60")], b"q")
    fender = await cached_fender(start_fender, origin, clock, "key: {query: sorted, headers: [X-Tenant]}")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/q?a=1&b=2", headers={"x-tenant": "t1"})
        same = await client.get("/q?b=2&a=1", headers={"x-tenant": "t1"})
        other = await client.get("/q?b=2&a=1", headers={"x-tenant": "t2"})
    assert same.headers["cache-status"].startswith("fender; hit")
    assert other.headers["cache-status"].startswith("fender; fwd=vary-miss")
    assert len(origin.calls("/q")) == 2


# --------------------------------------------------------------------------- validation


async def test_304_is_merged_into_the_stored_response(start_fender, origin, clock):
    def respond(req):
        if req.header("if-none-match") == b'"v1"':
            headers = [
                ("etag", '"v1"'),
                ("cache-control", "max-age=100"),
                ("x-version", "2"),
                ("set-cookie", "a=c"),
            ]
            return (304, headers, b"")
        return (200, [("etag", '"v1"'), ("cache-control", "max-age=1"), ("x-version", "1")], b"payload")

    origin.script["/m"] = respond
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/m")
        clock.advance(2)
        merged = await client.get("/m")
        assert merged.text == "payload" and merged.headers["x-version"] == "2"
        assert merged.headers["set-cookie"] == "a=c"  # the 304 answered this client: its cookie goes to it
        assert merged.headers["cache-status"] == "fender; fwd=stale; fwd-status=304"
        clock.advance(50)  # the 304's max-age=100 now applies
        later = await client.get("/m")
    assert later.headers["cache-status"].startswith("fender; hit") and later.headers["x-version"] == "2"
    assert "set-cookie" not in later.headers
    assert len(origin.calls("/m")) == 2


async def test_clients_conditional_request_answered_from_cache(start_fender, origin, clock):
    lm = http_date(-3600)
    origin.script["/cond"] = (
        200,
        [("cache-control", "max-age=60"), ("etag", 'W/"e1"'), ("last-modified", lm)],
        b"b",
    )
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        # A conditional miss is sent upstream unconditionally, stored, and answered 304.
        first = await client.get("/cond", headers={"if-none-match": '"e1"'})
        assert first.status_code == 304 and first.headers["etag"] == 'W/"e1"'
        hit = await client.get("/cond", headers={"if-none-match": '"other", W/"e1"'})
        assert hit.status_code == 304 and hit.headers["cache-status"].startswith("fender; hit")
        ims = await client.get("/cond", headers={"if-modified-since": http_date()})
        assert ims.status_code == 304
        full = await client.get("/cond", headers={"if-none-match": '"nope"'})
        assert full.status_code == 200 and full.text == "b"
    assert len(origin.calls("/cond")) == 1
    assert origin.calls("/cond")[0].header("if-none-match") is None


async def test_request_directives(start_fender, origin, clock):
    origin.script["/r"] = (200, [("cache-control", "max-age=60")], b"r")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        only = await client.get("/r", headers={"cache-control": "only-if-cached"})
        assert only.status_code == 504
        await client.get("/r")
        clock.advance(20)
        assert (
            (await client.get("/r", headers={"cache-control": "max-age=10"}))
            .headers["cache-status"]
            .startswith("fender; fwd=request")
        )
        assert (
            (await client.get("/r", headers={"cache-control": "no-cache"}))
            .headers["cache-status"]
            .startswith("fender; fwd=request")
        )
        clock.advance(70)
        stale_ok = await client.get("/r", headers={"cache-control": "max-stale=100"})
        assert stale_ok.headers["cache-status"] == "fender; hit; ttl=-10"
    assert len(origin.calls("/r")) == 3


async def test_head_is_served_from_a_stored_get(start_fender, origin, clock):
    origin.script["/hd"] = (200, [("cache-control", "max-age=60")], b"0123456789")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/hd")
        head = await client.head("/hd")
    assert head.status_code == 200 and head.headers["content-length"] == "10" and head.content == b""
    assert len(origin.calls("/hd")) == 1


# --------------------------------------------------------------------------- invalidation


async def test_unsafe_methods_invalidate_target_and_location(start_fender, origin, clock):
    origin.script["/items/1"] = lambda req: (
        (200, [("cache-control", "max-age=60")], b"item") if req.method == b"GET" else (200, [], b"updated")
    )
    origin.script["/items"] = (201, [("location", "/items/1")], b"created")
    origin.script["/fail"] = (500, [("location", "/items/1")], b"no")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/items/1")
        post = await client.post("/fail", content=b"x")
        assert post.headers["cache-status"] == "fender; fwd=bypass"
        assert (await client.get("/items/1")).headers["cache-status"].startswith("fender; hit")  # 500: kept
        await client.put("/items/1", content=b"x")
        assert (await client.get("/items/1")).headers["cache-status"].startswith("fender; fwd=miss")
        await client.post("/items", content=b"x")  # Location: /items/1
        assert (await client.get("/items/1")).headers["cache-status"].startswith("fender; fwd=miss")
    assert len([c for c in origin.calls("/items/1") if c.method == b"GET"]) == 3


# --------------------------------------------------------------------------- coalescing


async def test_100_concurrent_misses_make_one_upstream_request(start_fender, origin, clock):
    origin.script["/hot"] = (200, [("cache-control", "max-age=60")], b"hot" * 1000)
    origin.gate = asyncio.Event()
    fender = await cached_fender(start_fender, origin, clock)
    waiting = waiters(fender, 99)
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=fender.url, limits=limits, timeout=20) as client:
        tasks = [asyncio.ensure_future(client.get("/hot")) for _ in range(100)]
        await origin.up.wait_until(lambda: len(origin.up.requests) >= 1)
        await asyncio.wait_for(waiting.wait(), 10)
        origin.gate.set()
        responses = await asyncio.gather(*tasks)
    assert all(r.status_code == 200 and r.content == b"hot" * 1000 for r in responses)
    assert len(origin.calls("/hot")) == 1
    assert metric(fender, "fender_cache_requests_total", result="coalesced") == 99


async def test_a_failed_leader_is_not_fanned_out_as_a_cached_error(start_fender, origin, clock):
    answers = iter([(503, [("cache-control", "max-age=60")], b"down")])
    origin.script["/flaky"] = lambda req: next(answers, (200, [("cache-control", "max-age=60")], b"up"))
    origin.gate = asyncio.Event()
    fender = await cached_fender(start_fender, origin, clock)
    waiting = waiters(fender, 4)
    async with httpx.AsyncClient(base_url=fender.url, timeout=20) as client:
        tasks = [asyncio.ensure_future(client.get("/flaky")) for _ in range(5)]
        await origin.up.wait_until(lambda: len(origin.up.requests) >= 1)
        await asyncio.wait_for(waiting.wait(), 10)
        origin.gate.set()
        responses = await asyncio.gather(*tasks)
    # The first gets its 503; the waiters each asked the upstream themselves (the 503 was not stored).
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 503]
    assert len(origin.calls("/flaky")) == 5


# --------------------------------------------------------------------------- stale serving


async def test_stale_if_error_when_the_upstream_dies(start_fender, origin, clock):
    origin.script["/d"] = (200, [("cache-control", "max-age=10")], b"last good")
    fender = await cached_fender(start_fender, origin, clock, "stale_if_error: 5m")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/d")
        await origin.up.close()  # the upstream is gone: connections are refused
        clock.advance(20)
        r = await client.get("/d")
        assert r.status_code == 200 and r.text == "last good"
        assert r.headers["cache-status"] == "fender; fwd=stale; fwd-status=502; detail=stale-if-error"
        assert r.headers["age"] == "20"
        clock.advance(300)  # past max-age + 5m
        gone = await client.get("/d")
        assert gone.status_code == 502
    assert metric(fender, "fender_cache_stale_served_total", reason="stale_if_error") == 1


async def test_stale_if_error_on_5xx_from_the_response_directive(start_fender, origin, clock):
    origin.script["/x"] = (200, [("cache-control", "max-age=10, stale-if-error=60")], b"good")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/x")
        origin.script["/x"] = (503, [], b"overloaded")
        clock.advance(30)
        r = await client.get("/x")
        assert r.text == "good" and "fwd-status=503" in r.headers["cache-status"]
        clock.advance(60)
        assert (await client.get("/x")).status_code == 503


async def test_must_revalidate_forbids_stale_even_when_the_route_grants_it(start_fender, origin, clock):
    origin.script["/mr"] = (200, [("cache-control", "max-age=10, must-revalidate")], b"strict")
    fender = await cached_fender(
        start_fender, origin, clock, "stale_if_error: 5m, stale_while_revalidate: 1m"
    )
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/mr")
        origin.script["/mr"] = (503, [], b"down")
        clock.advance(20)
        assert (await client.get("/mr")).status_code == 503


async def test_stale_while_revalidate_refreshes_once_in_the_background(start_fender, origin, clock):
    origin.script["/swr"] = (200, [("cache-control", "max-age=10, stale-while-revalidate=60")], b"old")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/swr")
        origin.script["/swr"] = (200, [("cache-control", "max-age=10, stale-while-revalidate=60")], b"new")
        origin.gate = asyncio.Event()  # hold the refresh until every stale request was answered
        clock.advance(15)
        stale = [await client.get("/swr") for _ in range(5)]
        assert all(r.text == "old" and r.headers["cache-status"] == "fender; hit; ttl=-5" for r in stale)
        refreshes = list(cache_layer(fender)._tasks)
        assert len(refreshes) == 1  # one background refresh for five stale answers
        origin.gate.set()
        await asyncio.wait_for(asyncio.gather(*refreshes), 5)
        r = await client.get("/swr")
        assert r.text == "new" and r.headers["cache-status"].startswith("fender; hit")
    assert len(origin.calls("/swr")) == 2
    assert metric(fender, "fender_cache_stale_served_total", reason="stale_while_revalidate") >= 5


# --------------------------------------------------------------------------- memory bounds


async def test_eviction_at_the_byte_bound(start_fender, origin, clock):
    origin.script["/big"] = lambda req: (200, [("cache-control", "max-age=60")], b"z" * 10_000)
    fender = await cached_fender(start_fender, origin, clock, store="max_size: 64KiB, max_object_size: 16KiB")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        for i in range(10):
            await client.get(f"/big?i={i}")
        store = fender.runtime.exposed["cache"]["store"]
        assert store.bytes <= 64 * 1024 and len(store) == 6
        assert metric(fender, "fender_cache_evictions_total") == 4
        assert metric(fender, "fender_cache_bytes") == store.bytes
        assert (await client.get("/big?i=9")).headers["cache-status"].startswith("fender; hit")
        assert (await client.get("/big?i=0")).headers["cache-status"].startswith("fender; fwd=miss")


async def test_big_objects_stream_through_uncached(start_fender, origin, clock):
    size = 1024 * 1024
    release = asyncio.Event()

    async def streaming(req, conn):
        await conn.send_head(200, [("cache-control", "max-age=60"), ("transfer-encoding", "chunked")])
        # The rest only once the client has the response head: the body cannot have been
        # buffered whole before the client got its answer.
        await conn.send_chunk(b"a" * 65536)
        await release.wait()
        for _ in range(size // 65536 - 1):
            await conn.send_chunk(b"a" * 65536)
        await conn.end_chunks()

    origin.up.handler = streaming
    fender = await cached_fender(start_fender, origin, clock, store="max_size: 1MiB, max_object_size: 128KiB")
    async with httpx.AsyncClient(base_url=fender.url, timeout=10) as client:
        for _ in range(2):
            received = 0
            async with client.stream("GET", "/large") as response:
                release.set()
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
            assert received == size
            release.clear()
    assert len(origin.up.requests) == 2
    assert fender.runtime.exposed["cache"]["store"].bytes == 0


async def test_content_length_above_max_object_size_is_not_stored(start_fender, origin, clock):
    origin.script["/cl"] = (200, [("cache-control", "max-age=60")], b"y" * 20_000)
    fender = await cached_fender(start_fender, origin, clock, store="max_size: 64KiB, max_object_size: 16KiB")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r = await client.get("/cl")
        assert len(r.content) == 20_000 and "detail=too-big" in r.headers["cache-status"]
        await client.get("/cl")
    assert len(origin.calls("/cl")) == 2


# --------------------------------------------------------------------------- admin


async def test_admin_state_and_purge(start_fender, origin, clock):
    origin.script["/p/1"] = (200, [("cache-control", "max-age=60")], b"1")
    origin.script["/p/2"] = (200, [("cache-control", "max-age=60")], b"2")
    origin.script["/other"] = (200, [("cache-control", "max-age=60")], b"o")
    fender = await cached_fender(start_fender, origin, clock)
    async with (
        httpx.AsyncClient(base_url=fender.url) as client,
        httpx.AsyncClient(base_url=fender.admin_url) as admin,
    ):
        for path in ("/p/1", "/p/2", "/other", "/p/1"):
            await client.get(path)
        state = (await admin.get("/admin/cache")).json()
        assert state["entries"] == 3 and state["bytes"] > 0
        assert state["routes"]["cached"]["hit_ratio"] == 0.25
        url = f"http://127.0.0.1:{fender.data_port}/other"
        assert (await admin.post("/admin/cache/purge", json={"url": url})).json() == {"purged": 1}
        assert (await admin.post("/admin/cache/purge", json={"prefix": "/p/"})).json() == {"purged": 2}
        assert (await admin.post("/admin/cache/purge", json={})).status_code == 400
        assert (await admin.get("/admin/cache")).json()["entries"] == 0
        assert (await client.get("/p/1")).headers["cache-status"].startswith("fender; fwd=miss")


async def test_origin_only_preconditions_and_ranges_go_to_the_upstream(start_fender, origin, clock):
    origin.script["/pre"] = (200, [("cache-control", "max-age=60"), ("etag", '"1"')], b"pre")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/pre")
        for headers in ({"if-match": '"2"'}, {"if-unmodified-since": http_date(-10)}, {"range": "bytes=0-0"}):
            r = await client.get("/pre", headers=headers)
            assert r.headers["cache-status"] == "fender; fwd=bypass"
    sent = origin.calls("/pre")
    assert len(sent) == 4 and sent[1].header("if-match") == b'"2"' and sent[3].header("range") == b"bytes=0-0"


async def test_conditionals_apply_only_to_stored_2xx(start_fender, origin, clock):
    origin.script["/gone"] = (404, [("cache-control", "max-age=60"), ("etag", '"g"')], b"not here")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/gone")
        r = await client.get("/gone", headers={"if-none-match": '"g"'})
    assert r.status_code == 404 and r.text == "not here"
    assert r.headers["cache-status"].startswith("fender; hit")


async def test_an_upstream_caches_cache_status_is_not_replayed(start_fender, origin, clock):
    origin.script["/cs"] = (200, [("cache-control", "max-age=60"), ("cache-status", "edge; fwd=miss")], b"cs")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        first = await client.get("/cs")
        second = await client.get("/cs")
    # RFC 9211: each cache appends its entry; the first response lists both hops.
    assert first.headers.get_list("cache-status") == [
        "edge; fwd=miss",
        "fender; fwd=miss; fwd-status=200; stored",
    ]
    assert second.headers.get_list("cache-status") == ["fender; hit; ttl=60"]


async def test_5xx_stored_only_with_explicit_freshness(start_fender, origin, clock):
    origin.script["/maint"] = (503, [("cache-control", "max-age=30")], b"maintenance")
    origin.script["/err"] = (500, [("last-modified", http_date(-3600))], b"boom")  # heuristics never apply
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/maint")
        again = await client.get("/maint")
        assert again.status_code == 503 and again.headers["cache-status"].startswith("fender; hit")
        await client.get("/err")
        assert (await client.get("/err")).headers["cache-status"].startswith("fender; fwd=miss")
    assert len(origin.calls("/maint")) == 1 and len(origin.calls("/err")) == 2


async def test_a_client_cannot_purge_an_entry_with_request_directives(start_fender, origin, clock):
    origin.script["/keep"] = (200, [("cache-control", "max-age=10"), ("etag", '"k"')], b"keep")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/keep")
        clock.advance(20)
        await client.get("/keep", headers={"cache-control": "no-store"})
        await client.get("/keep", headers={"authorization": "Bearer x"})
        assert fender.runtime.exposed["cache"]["store"].entries == 1
        origin.script["/keep"] = (200, [("cache-control", "no-store")], b"now private")
        await client.get("/keep")
        assert fender.runtime.exposed["cache"]["store"].entries == 0  # the upstream itself said no-store


async def test_uncacheable_url_is_not_serialised_behind_one_request(start_fender, origin, clock):
    """Hit-for-miss: once a URL answered with something not storable, concurrent misses go upstream together."""
    origin.script["/live"] = (200, [], b"not cacheable")  # no freshness information: not stored
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url, timeout=20) as client:
        assert (await client.get("/live")).status_code == 200  # learns that /live is not storable
        origin.gate = asyncio.Event()
        tasks = [asyncio.ensure_future(client.get("/live")) for _ in range(5)]
        # All five reach the upstream while it holds every answer: nobody waits for anybody.
        await origin.up.wait_until(lambda: len(origin.calls("/live")) >= 6)
        origin.gate.set()
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 5
    assert metric(fender, "fender_cache_coalesced_total") == 0
    assert metric(fender, "fender_cache_uncacheable_keys") == 1


# --------------------------------------------------------------------------- rules no other test holds


async def test_a_5xx_with_max_age_never_replaces_a_stored_good_response(start_fender, origin, clock):
    origin.script["/m"] = (200, [("cache-control", "max-age=10")], b"good")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        assert (await client.get("/m")).text == "good"
        clock.advance(20)  # stale: the next request revalidates upstream
        origin.script["/m"] = (503, [("cache-control", "max-age=60")], b"maintenance")
        down = await client.get("/m")
        assert (down.status_code, down.text) == (503, "maintenance")
        assert "stored" not in down.headers["cache-status"]
        origin.script["/m"] = (200, [("cache-control", "max-age=60")], b"back")
        back = await client.get("/m")  # the 503 (max-age=60) was not stored: this one asks upstream
    assert (back.status_code, back.text) == (200, "back")
    assert len(origin.calls("/m")) == 3


async def test_every_field_of_a_two_field_vary_selects_the_variant(start_fender, origin, clock):
    origin.script["/v2"] = lambda req: (
        200,
        [("cache-control", "max-age=60"), ("vary", "Accept-Language, Accept-Encoding")],
        b"%s/%s" % (req.header("accept-language"), req.header("accept-encoding")),
    )
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        gzip = await client.get("/v2", headers={"accept-language": "en", "accept-encoding": "gzip"})
        # Same first field, different second one: another variant, not a hit on the first.
        br = await client.get("/v2", headers={"accept-language": "en", "accept-encoding": "br"})
        gzip2 = await client.get("/v2", headers={"accept-language": "en", "accept-encoding": "gzip"})
        br2 = await client.get("/v2", headers={"accept-language": "en", "accept-encoding": "br"})
    assert (gzip.text, br.text, gzip2.text, br2.text) == ("en/gzip", "en/br", "en/gzip", "en/br")
    assert br.headers["cache-status"].startswith("fender; fwd=vary-miss")
    assert gzip2.headers["cache-status"].startswith("fender; hit")
    assert br2.headers["cache-status"].startswith("fender; hit")
    assert len(origin.calls("/v2")) == 2


async def test_every_one_of_two_key_headers_selects_the_stored_response(start_fender, origin, clock):
    origin.script["/k2"] = lambda req: (
        200,
        [("cache-control", "max-age=60")],
        b"%s/%s" % (req.header("x-tenant"), req.header("x-region")),
    )
    fender = await cached_fender(start_fender, origin, clock, "key: {headers: [X-Tenant, X-Region]}")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        eu = await client.get("/k2", headers={"x-tenant": "t1", "x-region": "eu"})
        us = await client.get("/k2", headers={"x-tenant": "t1", "x-region": "us"})
        eu2 = await client.get("/k2", headers={"x-tenant": "t1", "x-region": "eu"})
    assert (eu.text, us.text, eu2.text) == ("t1/eu", "t1/us", "t1/eu")
    assert us.headers["cache-status"].startswith("fender; fwd=vary-miss")
    assert eu2.headers["cache-status"].startswith("fender; hit")
    assert len(origin.calls("/k2")) == 2
