"""Cache, second round (issue 23): strict Age, 304 updates by validator, Set-Cookie, targeted cache
control (RFC 9213 / Surrogate-Control), HEAD freshening, request stale-if-error, Vary normalisation,
qualified no-cache / private, and that invalidation and the fleet tier keep these decisions.

Each unit test names the RFC section it checks; the socket tests run a real Fender (ManualClock) in
front of a scripted RawUpstream.
"""

# ruff: noqa: F811  (the origin and clock fixtures come from tests/support/cache.py)

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.config.loader import PolicyError, parse_policy
from proxy.policies.cache import codec
from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.store import Entry, Variants
from tests.conftest import policy_text
from tests.support.cache import NOW, Origin, analyse, cached_fender, clock, metric, origin  # noqa: F401  (fixtures)
from tests.support.raw_upstream import RawUpstream
from tests.support.redis_server import redis_server_fixture  # noqa: F401  (the redis_server fixture)


class HeadOrigin(Origin):
    """An Origin whose HEAD answers carry the Content-Length the script gives (a GET's length)."""

    async def handle(self, req, conn) -> None:
        if req.method != b"HEAD":
            return await super().handle(req, conn)
        status, headers, _ = self.script[req.target.decode()](req)
        await conn.send(status, headers, b"", content_length=False)


@pytest.fixture
async def head_origin():
    o = HeadOrigin()
    async with RawUpstream(o.handle) as up:
        o.up = up
        yield o


def b(pairs):
    return [(n.encode(), v.encode()) for n, v in pairs]


# =========================================================================== unit tests against the RFC text

# --------------------------------------------------------------------------- Age (RFC 9111 5.1, 4.2.3)


@pytest.mark.parametrize(
    "ages",
    [["-5"], ["1.5"], ["abc"], ["5s"], ["5;x=1"], ["0, 0"], ["5", "5"], [""], ["0x10"]],
)
def test_rfc9111_5_1_an_age_that_is_not_one_non_negative_integer_is_stale_on_arrival(ages):
    # 5.1: Age = delta-seconds (1*DIGIT). Anything else: the age is unknown, so no freshness is granted.
    a = analyse(
        [("cache-control", "max-age=60, stale-while-revalidate=30"), ("etag", '"e"')]
        + [("age", v) for v in ages]
    )
    assert a.bad_age and a.lifetime == 0.0
    assert a.storable  # still stored: it can be revalidated with its ETag
    assert a.swr == 0.0  # never served unvalidated


@pytest.mark.parametrize(("value", "age"), [("0", 0), ("30", 30), (" 7 ", 7), ("99999999999", 2**31)])
def test_rfc9111_5_1_a_valid_age_keeps_todays_handling(value, age):
    a = analyse([("cache-control", "max-age=60"), ("age", value)])
    assert not a.bad_age and a.lifetime == 60.0 and a.initial_age == age
    assert rfc.strict_age([]) == 0


# --------------------------------------------------------------------------- 304 selection (RFC 9111 4.3.4)


def test_rfc9111_4_3_4_a_strong_etag_selects_every_stored_response_with_it_and_only_those():
    stored = [(b'"a"', None), (b'"b"', None), (b'W/"a"', None), (b'"a"', b"Mon, 01 Jan 2024 00:00:00 GMT")]
    assert rfc.select_for_update(stored, b'"a"', None) == [0, 3]
    # "If none of the stored responses contain at least one of the same strong validators, then the
    # cache MUST NOT use the new response to update any stored responses."
    assert rfc.select_for_update(stored, b'"z"', None) == []


def test_rfc9111_4_3_4_weak_validators_select_the_most_recent_match():
    lm = b"Mon, 01 Jan 2024 00:00:00 GMT"
    stored = [(b'"x"', None), (b'W/"a"', None), (b'"a"', None), (None, lm), (None, lm)]
    assert rfc.select_for_update(stored, b'W/"a"', None) == [1]  # weak comparison, newest first
    assert rfc.select_for_update(stored, None, lm) == [3]  # Last-Modified alone: the newest with it
    assert rfc.select_for_update(stored, None, b"Tue, 02 Jan 2024 00:00:00 GMT") == []
    # No validator: only the one stored response that also lacks one.
    assert rfc.select_for_update([(None, None)], None, None) == [0]
    assert rfc.select_for_update([(None, None), (None, None)], None, None) == []


def test_rfc9111_3_2_every_field_of_the_304_replaces_the_stored_one_except_framing_and_hop_by_hop():
    stored = b(
        [
            ("etag", '"1"'),
            ("content-md5", "old"),
            ("cache-control", "max-age=1"),
            ("content-type", "a/b"),
            ("x", "k"),
        ]
    )
    fresh = b(
        [
            ("etag", '"1"'),
            ("content-md5", "new"),
            ("cache-control", "max-age=99"),
            ("expires", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("content-type", "c/d"),
            ("content-length", "0"),
            ("transfer-encoding", "chunked"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=1"),
        ]
    )
    merged = dict(rfc.merge_304(stored, fresh))
    assert merged == {
        b"etag": b'"1"',
        b"content-md5": b"new",
        b"cache-control": b"max-age=99",
        b"expires": b"Mon, 01 Jan 2024 00:00:00 GMT",
        b"content-type": b"c/d",
        b"x": b"k",
    }


def test_rfc9111_4_3_5_head_updates_only_with_matching_validators_and_length():
    etag, lm = b'"v1"', b"Mon, 01 Jan 2024 00:00:00 GMT"
    assert rfc.head_matches(etag, lm, 10, b([("etag", '"v1"'), ("content-length", "10")]))
    assert rfc.head_matches(etag, lm, 10, b([("last-modified", lm.decode())]))
    assert not rfc.head_matches(etag, lm, 10, b([("etag", '"v2"')]))  # another representation
    assert not rfc.head_matches(etag, lm, 10, b([("etag", '"v1"'), ("content-length", "11")]))
    assert not rfc.head_matches(etag, None, 10, b([("content-length", "10")]))  # no validator to match


# --------------------------------------------------------------------------- Set-Cookie (RFC 9111 3.1, 5.2.2.7)


def test_rfc9111_3_1_a_response_with_set_cookie_is_not_stored_by_default_and_stored_whole_when_asked():
    headers = [("cache-control", "max-age=60"), ("set-cookie", "s=1")]
    assert analyse(headers).why_not == "set-cookie"
    stored = rfc.analyse(
        200,
        b(headers),
        request_authorized=False,
        request_no_store=False,
        request_time=NOW,
        response_time=NOW,
        store_set_cookie=True,
    )
    # 3.1: "the cache MUST store ... all header fields": the stored copy keeps its Set-Cookie.
    assert stored.storable and (b"set-cookie", b"s=1") in stored.headers


def test_rfc9111_5_2_2_7_private_naming_set_cookie_stores_the_rest_without_it():
    a = analyse([("cache-control", 'max-age=60, private="set-cookie"'), ("set-cookie", "s=1"), ("x", "y")])
    assert a.storable and [n for n, _ in a.headers] == [b"cache-control", b"x"]


# --------------------------------------------------------------------------- targeted fields (RFC 9213 2.2)


def test_rfc9213_2_2_the_first_targeted_field_present_wins_and_cache_control_is_ignored():
    both = [
        ("cache-control", "no-store"),
        ("expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ("surrogate-control", "max-age=30"),
        ("cdn-cache-control", "max-age=90"),
    ]
    a = analyse(both)
    assert a.storable and a.lifetime == 30.0 and a.targeted == b"surrogate-control"
    # Expires is ignored too once a targeted field applies; the stored copy keeps Cache-Control for
    # clients but never the field meant for Fender alone.
    assert dict(a.headers)[b"cache-control"] == b"no-store" and b"surrogate-control" not in dict(a.headers)
    assert analyse(both + [("fender-cache-control", "no-store")]).why_not == "no-store"
    # An empty targeted field is as if absent (a valid, non-empty value is needed).
    a = analyse([("cache-control", "max-age=5"), ("fender-cache-control", " ")])
    assert a.targeted is None and a.lifetime == 5.0


def test_rfc9213_2_2_the_target_list_order_is_configurable():
    headers = b(
        [
            ("cache-control", "max-age=5"),
            ("surrogate-control", "no-store"),
            ("cdn-cache-control", "max-age=60"),
        ]
    )
    a = rfc.analyse(
        200,
        headers,
        request_authorized=False,
        request_no_store=False,
        request_time=NOW,
        response_time=NOW,
        targets=(b"cdn-cache-control",),
    )
    assert a.storable and a.lifetime == 60.0
    assert (b"surrogate-control", b"no-store") in a.headers  # not a target here: not consumed either


def test_cache_targeted_fields_are_validated():
    route = "routes:\n  - name: r\n    upstream: u\n    cache: {targeted_fields: [%s]}\n"
    base = "listen: 127.0.0.1:0\nupstreams:\n  u: {replicas: [{url: 'http://127.0.0.1:9'}]}\n"
    policy = parse_policy(base + route % "Surrogate-Control, CDN-Cache-Control", "p.yaml")
    assert policy.routes[0].cache.targeted_fields == ("surrogate-control", "cdn-cache-control")
    with pytest.raises(PolicyError) as err:
        parse_policy(base + route % "cache-control", "p.yaml")
    assert "p.yaml:7:" in str(err.value) and "cache-control cannot be one" in str(err.value)
    with pytest.raises(PolicyError) as err:
        parse_policy(
            base + "routes:\n  - name: r\n    upstream: u\n    cache: {set_cookie: keep}\n", "p.yaml"
        )
    assert "p.yaml:7:" in str(err.value) and "set_cookie" in str(err.value)


# --------------------------------------------------------------------------- request stale-if-error (RFC 5861 4)


def test_rfc5861_4_stale_if_error_in_a_request_is_parsed():
    d = rfc.RequestDirectives(rfc.parse_cache_control([b"stale-if-error=120"]))
    assert d.stale_if_error == 120.0
    assert rfc.RequestDirectives(rfc.parse_cache_control([b"max-age=1"])).stale_if_error == 0.0


# --------------------------------------------------------------------------- Vary (RFC 9111 4.1)


def test_rfc9111_4_1_selecting_values_are_normalised():
    one = rfc.selecting_value(b([("accept-encoding", "gzip, br")]), b"accept-encoding")
    # combining field lines, whitespace around commas, empty elements, case of case-insensitive tokens
    assert (
        rfc.selecting_value(b([("accept-encoding", "GZIP"), ("accept-encoding", " BR ")]), b"accept-encoding")
        == one
    )
    assert rfc.selecting_value(b([("accept-encoding", "gzip,,br")]), b"accept-encoding") == one
    assert rfc.selecting_value(b([("accept-encoding", "gzip ; q=1")]), b"accept-encoding") == b"gzip;q=1"
    # A field whose values may be case-sensitive is not folded; absent is not the same as empty.
    assert rfc.selecting_value(b([("x-team", "Red")]), b"x-team") != rfc.selecting_value(
        b([("x-team", "red")]), b"x-team"
    )
    assert rfc.selecting_value([], b"accept-encoding") is None
    assert rfc.selecting_value(b([("accept-encoding", "")]), b"accept-encoding") == b""


# --------------------------------------------------------------------------- qualified no-cache / private


def test_rfc9111_5_2_2_4_no_cache_with_field_names_holds_those_fields_back():
    a = analyse([("cache-control", 'max-age=60, no-cache="X-Token, x-other"'), ("x-token", "t"), ("x", "y")])
    # "MUST NOT send the specified field(s) in the response to a subsequent request without successful
    # revalidation"; the rest of the response may be reused; it is not the bare directive.
    assert a.storable and not a.must_validate and a.lifetime == 60.0
    assert a.held == [(b"x-token", b"t")] and (b"x", b"y") in a.headers
    entry = Entry(
        200, a.headers, b"body", etag=None, last_modified=None, date=NOW, vary=(), selection=(),
        response_time=0.0, initial_age=0.0, lifetime=60.0, swr=0.0, sie=0.0, must_validate=False, held=a.held,
    )  # fmt: skip
    assert (b"x-token", b"t") not in entry.served_headers
    assert (b"x-token", b"t") in entry.validated_headers()


def test_rfc9111_5_2_2_7_private_with_field_names_stores_the_rest():
    a = analyse([("cache-control", 'max-age=60, private="x-user"'), ("x-user", "alice"), ("x", "y")])
    assert a.storable and b"x-user" not in dict(a.headers) and a.held == []


# --------------------------------------------------------------------------- the fleet codec keeps the new fields


def test_codec_keeps_held_fields_and_stored_set_cookie():
    entry = Entry(
        200, [(b"set-cookie", b"s=1"), (b"x", b"y")], b"b", etag=b'"e"', last_modified=None, date=NOW,
        vary=(b"accept-encoding",), selection=(b"gzip",), response_time=10.0, initial_age=0.0,
        lifetime=60.0, swr=0.0, sie=0.0, must_validate=False, held=[(b"x-token", b"t")],
    )  # fmt: skip
    back = codec.decode(codec.encode(Variants([entry]), 5.0), 5.0)
    assert back is not None
    (got,) = back.entries
    assert got.held == [(b"x-token", b"t")] and got.headers == entry.headers and got.size == entry.size
    assert got.served_headers == entry.served_headers


# =========================================================================== through a real Fender


async def test_the_login_that_sets_a_cookie_still_sets_it(start_fender, origin, clock):
    users = iter(["alice", "bob"])
    origin.script["/login"] = lambda req: (
        200,
        [("cache-control", "max-age=60"), ("set-cookie", f"session={next(users)}")],
        b"welcome",
    )
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        first = await client.get("/login")
        second = await client.get("/login")
    # Neither is stored: each login reaches the upstream and gets its own cookie, whole.
    assert first.headers["set-cookie"] == "session=alice" and second.headers["set-cookie"] == "session=bob"
    assert second.headers["cache-status"] == "fender; fwd=miss; fwd-status=200"
    assert len(origin.calls("/login")) == 2


async def test_set_cookie_store_serves_the_stored_cookie(start_fender, origin, clock):
    origin.script["/consent"] = (200, [("cache-control", "max-age=60"), ("set-cookie", "banner=v2")], b"ok")
    fender = await cached_fender(start_fender, origin, clock, "set_cookie: store")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/consent")
        hit = await client.get("/consent")
    assert hit.headers["cache-status"].startswith("fender; hit") and hit.headers["set-cookie"] == "banner=v2"
    assert len(origin.calls("/consent")) == 1


async def test_a_304_that_changes_the_etag_updates_nothing_and_is_fetched_again(start_fender, origin, clock):
    def respond(req):
        if req.header("if-none-match") is not None:
            return (304, [("etag", '"v2"'), ("cache-control", "max-age=100")], b"")
        if len(origin.calls("/e")) == 1:
            return (200, [("etag", '"v1"'), ("cache-control", "max-age=1")], b"v1")
        return (200, [("etag", '"v2"'), ("cache-control", "max-age=100")], b"v2")

    origin.script["/e"] = respond
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        assert (await client.get("/e")).text == "v1"
        clock.advance(2)
        again = await client.get("/e")
        clock.advance(50)
        later = await client.get("/e")
    # The 304 names "v2", the stored response is "v1": not merged (that would serve v1's body under
    # v2's ETag); asked again without If-None-Match, and the full v2 is served and stored.
    assert again.text == "v2" and again.headers["etag"] == '"v2"'
    calls = origin.calls("/e")
    assert [c.header("if-none-match") for c in calls] == [None, b'"v1"', None]
    assert later.text == "v2" and later.headers["cache-status"].startswith("fender; hit")
    assert metric(fender, "fender_cache_revalidations_total", route="cached", result="unselected") == 1
    assert metric(fender, "fender_cache_revalidations_total", route="cached", result="not_modified") == 0


async def test_a_304_with_the_same_etag_replaces_every_field(start_fender, origin, clock):
    def respond(req):
        if req.header("if-none-match") is not None:
            return (304, [("etag", '"v1"'), ("cache-control", "max-age=100"), ("content-md5", "new")], b"")
        return (200, [("etag", '"v1"'), ("cache-control", "max-age=1"), ("content-md5", "old")], b"body")

    origin.script["/m5"] = respond
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/m5")
        clock.advance(2)
        merged = await client.get("/m5")
        clock.advance(50)
        hit = await client.get("/m5")
    assert merged.headers["cache-status"] == "fender; fwd=stale; fwd-status=304"
    assert merged.headers["content-md5"] == "new" and hit.headers["content-md5"] == "new"
    assert hit.headers["cache-status"].startswith("fender; hit") and hit.text == "body"


@pytest.mark.parametrize(
    ("headers", "stored"),
    [
        # clients: no-store; Fender: keep 60 s
        ([("cache-control", "no-store"), ("fender-cache-control", "max-age=60")], True),
        ([("cache-control", "private"), ("surrogate-control", "max-age=60")], True),
        # clients: keep 10 min; Fender: do not store
        ([("cache-control", "max-age=600"), ("surrogate-control", "no-store")], False),
        ([("cache-control", "max-age=600"), ("cdn-cache-control", "no-store")], False),
    ],
)
async def test_the_surrogate_split_both_ways(start_fender, origin, clock, headers, stored):
    origin.script["/s"] = (200, headers, b"s")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        first = await client.get("/s")
        second = await client.get("/s")
    cache_control = dict(headers)["cache-control"]
    for response in (first, second):
        assert response.headers["cache-control"] == cache_control  # the client's directives, unchanged
        assert "surrogate-control" not in response.headers and "fender-cache-control" not in response.headers
    if dict(headers).get("cdn-cache-control"):
        assert first.headers["cdn-cache-control"] == "no-store"  # for CDNs downstream: passed on
    assert second.headers["cache-status"].startswith("fender; hit") is stored
    assert len(origin.calls("/s")) == (1 if stored else 2)


async def test_surrogate_control_not_in_the_target_list_is_neither_obeyed_nor_removed(
    start_fender, origin, clock
):
    origin.script["/t"] = (200, [("cache-control", "no-store"), ("surrogate-control", "max-age=60")], b"t")
    fender = await cached_fender(start_fender, origin, clock, "targeted_fields: [fender-cache-control]")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/t")
        second = await client.get("/t")
    assert second.headers["surrogate-control"] == "max-age=60" and "hit" not in second.headers["cache-status"]


async def test_head_freshens_a_stored_get(start_fender, head_origin, clock):
    def respond(req):
        if req.method == b"HEAD":
            headers = [("etag", '"v1"'), ("cache-control", "max-age=100"), ("x-version", "2")]
            return (200, headers + [("content-length", "10")], b"")
        return (200, [("etag", '"v1"'), ("cache-control", "max-age=10"), ("x-version", "1")], b"0123456789")

    head_origin.script["/h"] = respond
    fender = await cached_fender(start_fender, head_origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/h")
        clock.advance(20)  # stale: the HEAD goes to the upstream
        head = await client.head("/h")
        clock.advance(50)  # the HEAD's max-age=100 now applies to the stored GET
        get = await client.get("/h")
    assert head.status_code == 200 and head.headers["x-version"] == "2"
    assert get.headers["cache-status"].startswith("fender; hit") and get.headers["x-version"] == "2"
    assert get.content == b"0123456789"
    assert [c.method for c in head_origin.calls("/h")] == [b"GET", b"HEAD"]
    assert metric(fender, "fender_cache_revalidations_total", route="cached", result="head_updated") == 1


async def test_a_head_with_another_etag_makes_the_stored_get_stale(start_fender, head_origin, clock):
    def respond(req):
        if req.method == b"HEAD":
            return (200, [("etag", '"v2"'), ("cache-control", "max-age=100")], b"")
        tag = "v1" if not req.header("if-none-match") and len(head_origin.calls("/h2")) == 1 else "v2"
        return (200, [("etag", f'"{tag}"'), ("cache-control", "max-age=100")], tag.encode())

    head_origin.script["/h2"] = respond
    fender = await cached_fender(start_fender, head_origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/h2")
        await client.head("/h2", headers={"cache-control": "no-cache"})  # fresh, but the client asks upstream
        get = await client.get("/h2")
    # "otherwise, the cache SHOULD consider the stored response to be stale" (4.3.5)
    assert get.text == "v2" and get.headers["cache-status"].startswith("fender; fwd=stale")
    assert [c.method for c in head_origin.calls("/h2")] == [b"GET", b"HEAD", b"GET"]
    assert metric(fender, "fender_cache_revalidations_total", route="cached", result="head_stale") == 1


@pytest.mark.parametrize("ages", [["0, 0"], ["-1"], ["3", "3"], ["10s"]])
async def test_a_bad_age_is_stale_on_arrival_and_revalidated(start_fender, origin, clock, ages):
    def respond(req):
        if req.header("if-none-match") is not None:
            return (304, [("etag", '"a"'), ("cache-control", "max-age=60")], b"")
        return (200, [("etag", '"a"'), ("cache-control", "max-age=60")] + [("age", a) for a in ages], b"x")

    origin.script["/age"] = respond
    fender = await cached_fender(start_fender, origin, clock, "stale_while_revalidate: 30s")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        first = await client.get("/age")
        second = await client.get("/age")  # no time has passed, yet the stored copy is stale
        third = await client.get("/age")  # the 304 gave it a valid freshness: now a hit
    assert "stored" in first.headers["cache-status"]
    assert second.headers["cache-status"] == "fender; fwd=stale; fwd-status=304" and second.text == "x"
    assert third.headers["cache-status"].startswith("fender; hit")
    assert [c.header("if-none-match") for c in origin.calls("/age")] == [None, b'"a"']


async def test_a_requests_own_stale_if_error_within_the_routes_limit(start_fender, origin, clock):
    origin.script["/sie"] = (200, [("cache-control", "max-age=1")], b"old")
    fender = await cached_fender(start_fender, origin, clock, "max_request_stale_if_error: 60s")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/sie")
        origin.script["/sie"] = (503, [], b"down")
        clock.advance(31)  # 30 s past freshness
        plain = await client.get("/sie")
        asked = await client.get("/sie", headers={"cache-control": "stale-if-error=40"})
        short = await client.get("/sie", headers={"cache-control": "stale-if-error=20"})
        clock.advance(40)  # 70 s past: beyond the route's 60 s even though the client asks 100
        capped = await client.get("/sie", headers={"cache-control": "stale-if-error=100"})
    assert plain.status_code == 503 and short.status_code == 503 and capped.status_code == 503
    assert asked.status_code == 200 and asked.text == "old"
    assert asked.headers["cache-status"].endswith("detail=stale-if-error")


async def test_equivalent_accept_encodings_share_a_variant(start_fender, origin, clock):
    origin.script["/v"] = (200, [("cache-control", "max-age=60"), ("vary", "Accept-Encoding")], b"v")
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        await client.get("/v", headers={"accept-encoding": "gzip, br"})
        same = await client.get("/v", headers=[("accept-encoding", "GZIP"), ("accept-encoding", "br")])
        other = await client.get("/v", headers={"accept-encoding": "br, gzip"})  # order matters: another
    assert same.headers["cache-status"].startswith("fender; hit")
    assert other.headers["cache-status"].startswith("fender; fwd=vary-miss")


async def test_no_cache_fields_are_sent_only_after_revalidation(start_fender, origin, clock):
    def respond(req):
        headers = [("etag", '"n"'), ("cache-control", 'max-age=5, no-cache="x-token"'), ("x-token", "t1")]
        if req.header("if-none-match") is not None:
            return (304, headers[:2], b"")
        return (200, headers, b"n")

    origin.script["/nc"] = respond
    fender = await cached_fender(start_fender, origin, clock)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        first = await client.get("/nc")
        hit = await client.get("/nc")
        clock.advance(10)
        revalidated = await client.get("/nc")
    assert first.headers["x-token"] == "t1"
    assert hit.headers["cache-status"].startswith("fender; hit") and "x-token" not in hit.headers
    assert revalidated.headers["cache-status"] == "fender; fwd=stale; fwd-status=304"
    assert revalidated.headers["x-token"] == "t1"


async def test_unsafe_methods_invalidate_entries_stored_by_the_new_rules(start_fender, origin, clock):
    origin.script["/inv"] = (
        200,
        [("cache-control", "no-store"), ("fender-cache-control", "max-age=60")],
        b"i",
    )
    origin.script["/ck"] = (200, [("cache-control", "max-age=60"), ("set-cookie", "c=1")], b"c")
    origin.script["/post"] = (201, [("location", "/ck"), ("surrogate-control", "no-store")], b"")
    fender = await cached_fender(start_fender, origin, clock, "set_cookie: store")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        for path in ("/inv", "/ck"):
            await client.get(path)
            assert (await client.get(path)).headers["cache-status"].startswith("fender; hit")
        put = await client.put("/inv")
        post = await client.post("/post")
        after = [await client.get(p) for p in ("/inv", "/ck")]
    assert "surrogate-control" not in post.headers  # removed on the bypass path too
    assert put.status_code == 200
    assert all(r.headers["cache-status"].startswith("fender; fwd=miss") for r in after)


async def test_the_fleet_tier_keeps_the_new_decisions(redis_server, origin, start_fender):
    origin.script["/f"] = (
        200,
        [
            ("cache-control", 'no-store, no-cache="x-token"'),
            ("fender-cache-control", 'max-age=60, no-cache="x-token"'),
            ("set-cookie", "shared=1"),
            ("x-token", "t"),
        ],
        b"fleet",
    )
    routes = "      - name: cached\n        upstream: echo\n        cache: {set_cookie: store}\n"
    text = policy_text(origin.up.port, routes=routes) + (
        f"state:\n  backend: redis\n  redis:\n    url: {redis_server.url}\n    key_prefix: 't23{id(origin)}:'\n"
    )
    a = await start_fender(text)
    b_ = await start_fender(text)
    async with httpx.AsyncClient(headers={"Host": "catalog.svc"}) as client:
        first = await client.get(a.url + "/f")
        async with asyncio.timeout(5):
            await a.runtime.exposed["state"]["redis"].flush()
        via_b = await client.get(b_.url + "/f")
    assert "stored" in first.headers["cache-status"]
    assert via_b.headers["cache-status"].startswith("fender; hit") and via_b.text == "fleet"
    assert via_b.headers["set-cookie"] == "shared=1" and via_b.headers["cache-control"].startswith("no-store")
    assert "x-token" not in via_b.headers and "fender-cache-control" not in via_b.headers
    assert len(origin.calls("/f")) == 1
    # B's copy came from Redis and still holds the no-cache="x-token" field for after a revalidation.
    (entry,) = b_.runtime.exposed["cache"]["store"].get(b"catalog.svc/f").entries
    assert entry.held == [(b"x-token", b"t")]
