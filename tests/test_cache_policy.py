"""RFC 9111 rules of the cache as pure functions, the LRU store, and the layer with an injected clock."""

from __future__ import annotations

import asyncio
import email.utils

import pytest

from proxy.clock import ManualClock
from proxy.config import parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.layer import CacheLayer, shared_store
from proxy.policies.cache.store import ENTRY_OVERHEAD, HEADER_OVERHEAD, Entry, MemoryStore, Variants
from proxy.policies.context import LayerContext
from tests.support.cache import NOW, analyse


def date(wall: float) -> bytes:
    return email.utils.formatdate(wall, usegmt=True).encode()


# --------------------------------------------------------------------------- parsing


def test_cache_control_parsing():
    cc = rfc.parse_cache_control([b'Max-Age=60, private="set-cookie, x-user", no-cache', b" s-maxage=5"])
    assert cc == {"max-age": "60", "private": "set-cookie, x-user", "no-cache": None, "s-maxage": "5"}
    assert rfc.parse_cache_control([b'max-age="30"'])["max-age"] == "30"  # quoted form accepted
    assert rfc.parse_cache_control([b"max-age=1, max-age=2"])["max-age"] == "1"  # first wins
    assert rfc.parse_cache_control([b", ,"]) == {}


@pytest.mark.parametrize(
    ("arg", "expected"),
    [("60", 60), ("0", 0), ("-1", None), ("1.5", None), ("", None), ("99999999999", 2**31)],
)
def test_delta_seconds(arg, expected):
    assert rfc.delta_seconds(arg) == expected


def test_http_dates_in_all_three_formats():
    assert rfc.parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0
    assert rfc.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == 784111777.0
    assert rfc.parse_http_date(b"Sun Nov  6 08:49:37 1994") == 784111777.0
    assert rfc.parse_http_date(b"0") is None
    assert rfc.parse_http_date(b"") is None


# --------------------------------------------------------------------------- freshness lifetime (4.2.1)


def test_lifetime_precedence_s_maxage_max_age_expires():
    assert analyse([("cache-control", "max-age=10, s-maxage=100")]).lifetime == 100
    assert analyse([("cache-control", "max-age=10"), ("expires", date(NOW + 500))]).lifetime == 10
    assert analyse([("date", date(NOW)), ("expires", date(NOW + 500))]).lifetime == 500
    # Expires is relative to the Date header, not to our clock.
    assert analyse([("date", date(NOW - 100)), ("expires", date(NOW + 500))]).lifetime == 600
    assert analyse([("expires", "0")]).lifetime == 0  # invalid Expires: already expired
    assert analyse([("cache-control", "max-age=abc"), ("expires", date(NOW + 500))]).lifetime == 0


def test_heuristic_freshness_only_where_permitted():
    lm = [("date", date(NOW)), ("last-modified", date(NOW - 1000))]
    assert analyse(lm).lifetime == 100  # 10% of the time since modification
    assert analyse(lm, status=404).lifetime == 100  # cacheable by default
    assert analyse(lm, status=201).lifetime == 0  # not cacheable by default
    assert analyse(lm, status=201).storable is False
    assert analyse([*lm, ("cache-control", "public")], status=201).lifetime == 100
    year = [("date", date(NOW)), ("last-modified", date(NOW - 400 * 86400))]
    assert analyse(year).lifetime == rfc.HEURISTIC_MAX
    assert analyse([], default_ttl=30).lifetime == 30
    assert analyse(lm, default_ttl=30).lifetime == 100  # Last-Modified wins over the route default


# --------------------------------------------------------------------------- age (4.2.3)


def test_initial_age_takes_the_larger_of_apparent_and_corrected_age():
    # Date 5 s before the response arrived; no Age header: apparent age 5.
    assert analyse([("date", date(NOW - 5))]).initial_age == 5
    # Age header 30 plus a 2 s response delay beats the apparent age.
    a = analyse([("date", date(NOW)), ("age", "30")], request_time=NOW - 2)
    assert a.initial_age == 32
    # A Date in the future does not make the age negative.
    assert analyse([("date", date(NOW + 60))]).initial_age == 0


def test_entry_age_and_freshness_on_the_injected_clock():
    clock = ManualClock(start=500.0)
    a = analyse([("cache-control", "max-age=60"), ("age", "20")])
    entry = Entry(
        200,
        a.headers,
        b"x",
        etag=None,
        last_modified=None,
        date=a.date,
        vary=(),
        selection=(),
        response_time=clock.now(),
        initial_age=a.initial_age,
        lifetime=a.lifetime,
        swr=10,
        sie=100,
        must_validate=False,
    )
    assert entry.age(clock.now()) == 20
    clock.advance(39.5)
    assert entry.age(clock.now()) == 59 and clock.now() < entry.fresh_until
    clock.advance(1)
    assert clock.now() >= entry.fresh_until  # current_age 60.5 > 60
    assert clock.now() < entry.stale_while_revalidate_until
    clock.advance(10)
    assert clock.now() >= entry.stale_while_revalidate_until
    assert clock.now() < entry.stale_if_error_until


# --------------------------------------------------------------------------- storing (3, 3.5)


@pytest.mark.parametrize(
    ("headers", "status", "authorized", "why"),
    [
        ([("cache-control", "no-store, max-age=60")], 200, False, "no-store"),
        ([("cache-control", "private, max-age=60")], 200, False, "private"),
        ([("cache-control", "max-age=60")], 200, True, "authorization"),
        ([("cache-control", "max-age=60"), ("vary", "Accept, *")], 200, False, "vary"),
        ([("cache-control", "max-age=60")], 206, False, "status"),
        ([("cache-control", "max-age=60")], 304, False, "status"),
        ([("cache-control", "must-understand, no-store, max-age=60")], 299, False, "must-understand"),
        ([], 201, False, "no freshness"),
    ],
)
def test_not_storable(headers, status, authorized, why):
    a = analyse(headers, status, authorized=authorized)
    assert a.storable is False and a.why_not == why


def test_storable_cases():
    assert analyse([("cache-control", "max-age=60")], 500).storable  # explicit freshness: any final status
    assert analyse([("cache-control", "must-understand, no-store, max-age=60")]).storable
    for allow in ("public", "s-maxage=60", "must-revalidate, max-age=60"):
        assert analyse([("cache-control", allow)], authorized=True).storable


def test_stored_headers_drop_hop_by_hop_set_cookie_and_qualified_fields():
    a = analyse(
        [
            ("cache-control", 'max-age=60, private="x-user, Set-Cookie", no-cache="x-token"'),
            ("connection", "x-conn"),
            ("x-conn", "1"),
            ("keep-alive", "timeout=5"),
            ("set-cookie", "a=b"),
            ("x-user", "alice"),
            ("x-token", "t"),
            ("content-length", "3"),
            ("x-kept", "yes"),
        ]
    )
    names = {n for n, _ in a.headers}
    assert names == {b"cache-control", b"x-kept"}
    assert a.held == [(b"x-token", b"t")]  # stored, sent only after revalidation (5.2.2.4)
    assert a.storable and not a.must_validate  # qualified no-cache is not "validate every time"


def test_stale_rules():
    assert analyse([("cache-control", "max-age=1, stale-while-revalidate=30, stale-if-error=60")]).swr == 30
    for directive in ("must-revalidate", "proxy-revalidate", "s-maxage=5", "no-cache"):
        assert analyse([("cache-control", f"max-age=1, {directive}")]).no_stale
    assert analyse([("cache-control", "no-cache")]).must_validate


def test_merge_304_replaces_fields_but_not_framing():
    stored = [(b"etag", b'"1"'), (b"x-a", b"old"), (b"content-encoding", b"gzip"), (b"x-b", b"kept")]
    fresh = [(b"etag", b'"1"'), (b"x-a", b"new"), (b"content-encoding", b"br"), (b"content-length", b"0")]
    merged = rfc.merge_304(stored, fresh)
    assert (b"x-a", b"new") in merged and (b"x-a", b"old") not in merged
    # RFC 9111 3.2: only a cache that decoded the content may keep its Content-Encoding; Fender stores
    # the bytes as received, so the 304's value applies.
    assert (b"content-encoding", b"br") in merged and (b"x-b", b"kept") in merged
    assert all(n != b"content-length" for n, _ in merged)


def test_conditionals():
    assert rfc.not_modified(b'"a", W/"b"', None, b'"b"', None, NOW)  # weak comparison
    assert rfc.not_modified(b"*", None, b'"x"', None, NOW)
    assert not rfc.not_modified(b'"a"', date(NOW + 10), b'"b"', None, NOW)  # INM wins over IMS
    assert rfc.not_modified(None, date(NOW), None, date(NOW - 10), NOW)
    assert not rfc.not_modified(None, date(NOW - 20), None, date(NOW - 10), NOW)
    assert not rfc.not_modified(None, b"garbage", None, date(NOW - 10), NOW)


def test_request_directives():
    d = rfc.RequestDirectives(rfc.parse_cache_control([b"max-age=5, max-stale, min-fresh=3, only-if-cached"]))
    assert (d.max_age, d.max_stale, d.min_fresh, d.only_if_cached) == (5, float("inf"), 3, True)
    assert rfc.RequestDirectives(None, pragma_no_cache=True).no_cache
    assert not rfc.RequestDirectives({"max-age": "5"}, pragma_no_cache=True).no_cache


def test_query_normalisation_and_same_origin_locations():
    assert rfc.normalise_query(b"/a?b=2&a=1", "sorted") == b"/a?a=1&b=2"
    assert rfc.normalise_query(b"/a?b=2&a=1", "ignore") == b"/a"
    assert rfc.normalise_query(b"/a?b=2&a=1", "as-is") == b"/a?b=2&a=1"
    assert rfc.same_origin_target(b"/x/1", b"svc", b"/x") == b"/x/1"
    assert rfc.same_origin_target(b"http://svc/x/2?q=1", b"svc", b"/x") == b"/x/2?q=1"
    assert rfc.same_origin_target(b"http://evil/x/2", b"svc", b"/x") is None
    assert rfc.same_origin_target(b"3", b"svc", b"/x/1") == b"/x/3"


# --------------------------------------------------------------------------- store


def make_entry(body: bytes, vary=(), selection=()) -> Entry:
    return Entry(
        200,
        [],
        body,
        etag=None,
        last_modified=None,
        date=NOW,
        vary=vary,
        selection=selection,
        response_time=0.0,
        initial_age=0.0,
        lifetime=60,
        swr=0,
        sie=0,
        must_validate=False,
    )


def test_memory_store_is_an_lru_bounded_by_bytes():
    evicted = []
    one = Variants([make_entry(b"a" * 1000)]).size + 2
    store = MemoryStore(3 * one, on_evict=evicted.append)
    for key in (b"k1", b"k2", b"k3"):
        assert store.put(key, Variants([make_entry(b"a" * 1000)]))
    assert store.get(b"k1") is not None  # k1 is now the most recently used
    store.put(b"k4", Variants([make_entry(b"a" * 1000)]))
    assert store.get(b"k2") is None and store.get(b"k1") is not None
    assert evicted == [1] and store.bytes <= store.max_size and len(store) == 3
    assert store.put(b"huge", Variants([make_entry(b"x" * 10 * one)])) is False
    assert store.delete(b"k1") and not store.delete(b"k1")
    assert sorted(store.keys()) == [b"k3", b"k4"]
    assert store.bytes == 2 * one


def test_entry_size_counts_headers_body_and_overhead():
    entry = make_entry(b"abc")
    assert entry.size == 3 + len(b"content-length") + 1 + HEADER_OVERHEAD + ENTRY_OVERHEAD


def test_variants_replace_same_selection_and_are_bounded():
    v = Variants([make_entry(b"en1", (b"accept-language",), (b"en",))])
    v = v.with_entry(make_entry(b"de", (b"accept-language",), (b"de",)))
    v = v.with_entry(make_entry(b"en2", (b"accept-language",), (b"en",)))
    assert [e.body for e in v.entries] == [b"en2", b"de"]
    for i in range(40):
        v = v.with_entry(make_entry(b"x", (b"x-i",), (str(i).encode(),)))
    assert len(v.entries) == 16


# --------------------------------------------------------------------------- layer and local faults


POLICY = """
upstreams: {a: {replicas: [{url: http://127.0.0.1:9}]}}
routes:
  - name: r
    upstream: a
    cache: {stale_if_error: 1m}
"""


class Script:
    """The next layer as a list of replies (the breaker is another issue's module; this stands in for it)."""

    def __init__(self, *replies) -> None:
        self.replies = list(replies)
        self.calls = 0

    async def __call__(self, ex):
        self.calls += 1
        return self.replies.pop(0)


class Stored:
    """An upstream-like reply with a body."""

    def __init__(self, status, headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self._chunks = [body, b""]

    def has_body(self) -> bool:
        return True

    async def read(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""

    def close(self) -> None:
        self._chunks = []


def exchange() -> Exchange:
    return Exchange("GET", b"/p", [], b"svc", b"", None, None, b"rid", "r", 0.0, None, [], 1e12)


async def drain(reply) -> bytes:
    out = b""
    while chunk := await reply.read():
        out += chunk
    reply.close()
    return out


@pytest.mark.parametrize("reason", ["breaker_open", "connect_failure", "timeout", "no_healthy_replica"])
async def test_stale_if_error_on_local_faults_including_an_open_breaker(reason):
    policy = parse_policy(POLICY, "p.yaml")
    clock = ManualClock()
    ctx = LayerContext(Metrics(), None, policy, clock)
    fault = LocalReply(reason, status=503 if reason in ("breaker_open", "no_healthy_replica") else None)
    upstream = Script(Stored(200, [(b"cache-control", b"max-age=10")], b"good"), fault)
    layer = CacheLayer(policy.routes[0], upstream, ctx, shared_store(ctx), policy.cache)
    assert await drain(await layer(exchange())) == b"good"
    clock.advance(30)
    ex = exchange()
    reply = await layer(ex)
    assert reply.status == 200 and await drain(reply) == b"good"
    assert dict(ex.response_headers)[b"age"] == b"30"
    assert b"detail=stale-if-error" in dict(ex.response_headers)[b"cache-status"]
    assert upstream.calls == 2


def test_cache_control_grammar_is_strict_about_spaces_around_equals():
    assert "max-age" not in rfc.parse_cache_control([b"max-age =3600"])
    assert rfc.delta_seconds(rfc.parse_cache_control([b"max-age= 3600"])["max-age"]) is None
    assert analyse([("cache-control", "max-age= 3600")]).lifetime == 0
    assert rfc.parse_cache_control([b'extension="max-age=3600", max-age=1'])["max-age"] == "1"


def layer_with(upstream, clock, cache="{}"):
    policy = parse_policy(POLICY.replace("{stale_if_error: 1m}", cache), "p.yaml")
    ctx = LayerContext(Metrics(), None, policy, clock)
    return CacheLayer(policy.routes[0], upstream, ctx, shared_store(ctx), policy.cache)


async def test_a_waiter_stops_waiting_after_coalesce_timeout_on_the_injected_clock():
    clock = ManualClock()
    upstream = Script(
        Stored(200, [(b"cache-control", b"max-age=60")], b"first"),
        Stored(200, [(b"cache-control", b"max-age=60")], b"second"),
    )
    layer = layer_with(upstream, clock, "{coalesce_timeout: 5s}")
    leader = await layer(exchange())  # its body is not read yet: the flight is open
    waiter = asyncio.ensure_future(layer(exchange()))
    for _ in range(100):  # bounded: let the waiter reach its wait
        if clock.sleepers:
            break
        await asyncio.sleep(0)
    assert clock.sleepers == 1 and not waiter.done()
    clock.advance(5)
    reply = await asyncio.wait_for(waiter, 5)
    assert await drain(reply) == b"second" and upstream.calls == 2
    assert await drain(leader) == b"first"


async def test_a_flight_whose_body_never_ends_expires_for_newcomers():
    clock = ManualClock()
    upstream = Script(
        Stored(200, [(b"cache-control", b"max-age=60")], b"first"),
        Stored(200, [(b"cache-control", b"max-age=60")], b"second"),
    )
    layer = layer_with(upstream, clock, "{coalesce_timeout: 5s}")
    await layer(exchange())  # never read, never closed (a client that vanished without a trace)
    clock.advance(6)
    reply = await asyncio.wait_for(layer(exchange()), 5)  # no wait: the stuck flight is dropped
    assert await drain(reply) == b"second" and upstream.calls == 2
