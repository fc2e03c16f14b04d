"""Purge by tag and by prefix (issue 22): on one Fender's cache, and across a fleet sharing a Redis.

The upstream tags responses with Cache-Tag (or the route's cache.tag_header); POST
/admin/cache/purge {"tags": [...]} drops them. In fleet mode the purge reaches Redis (the tag's
set of keys, the key index for prefixes) and every sidecar through the purge channel.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from proxy.config.loader import PolicyError, parse_policy
from proxy.policies.cache import codec
from proxy.policies.cache.purge import MAX_TAGS, tags_of
from proxy.policies.cache.store import Entry, Variants
from tests.conftest import policy_text
from tests.support.fleet import HOST, drain_writes, prefix, start_fleet
from tests.support.metrics import get_metrics, metric_value
from tests.support.raw_upstream import RawUpstream
from tests.support.redis_server import redis_server_fixture  # noqa: F401  (the redis_server fixture)


class TaggingOrigin:
    """Answers every GET with max-age=60 and the tags of ``tags[path]`` (none for other paths)."""

    def __init__(self, header: str = "Cache-Tag") -> None:
        self.header = header
        self.tags: dict[str, str] = {}
        self.calls: list[str] = []

    async def handle(self, req, conn) -> None:
        path = req.target.decode()
        self.calls.append(path)
        headers = [("cache-control", "max-age=60"), ("content-type", "text/plain")]
        if path in self.tags:
            headers.append((self.header, self.tags[path]))
        await conn.send(200, headers, b"body of " + path.encode())


@pytest.fixture
async def tagging():
    origin = TaggingOrigin()
    async with RawUpstream(origin.handle) as up:
        origin.port = up.port
        yield origin


def tag_policy(port: int, cache: str = "default_ttl: 0s") -> str:
    return policy_text(
        port,
        routes=f"""
      - name: all
        upstream: echo
        cache: {{{cache}}}
    """,
    )


async def purge(client: httpx.AsyncClient, fender, body) -> httpx.Response:
    return await client.post(fender.admin_url + "/admin/cache/purge", json=body)


def stored(fender) -> set[bytes]:
    return set(fender.runtime.exposed["cache"]["store"].keys())


# --------------------------------------------------------------------------- one Fender, no Redis


def test_tags_are_split_on_commas_and_spaces_and_bounded():
    assert tags_of([b"product-42, catalog", b"catalog  sale"]) == (b"product-42", b"catalog", b"sale")
    assert tags_of([b" , ,"]) == ()
    many = b" ".join(b"t%d" % i for i in range(MAX_TAGS + 10))
    assert len(tags_of([many])) == MAX_TAGS
    assert tags_of([b"x" * 129 + b" ok"]) == (b"ok",)  # longer than 128 bytes: ignored


def test_tag_header_is_a_header_name_or_null():
    assert parse_policy(tag_policy(9, "tag_header: Surrogate-Key"), "p.yaml").routes[0].cache.tag_header
    assert parse_policy(tag_policy(9, "tag_header: null"), "p.yaml").routes[0].cache.tag_header is None
    with pytest.raises(PolicyError) as err:
        parse_policy(tag_policy(9, "tag_header: 'Cache Tag'"), "p.yaml")
    assert "p.yaml:" in str(err.value) and "tag_header" in str(err.value)


def test_codec_keeps_the_tags():
    entry = Entry(
        200,
        [],
        b"x",
        etag=None,
        last_modified=None,
        date=0.0,
        vary=(),
        selection=(),
        response_time=0.0,
        initial_age=0.0,
        lifetime=60.0,
        swr=0.0,
        sie=0.0,
        must_validate=False,
        tags=(b"product-42", b"caf\xe9"),
    )
    back = codec.decode(codec.encode(Variants([entry]), 0.0), 0.0)
    assert back.entries[0].tags == (b"product-42", b"caf\xe9")


async def test_purge_by_tag_drops_tagged_entries_and_keeps_the_rest(tagging, start_fender):
    tagging.tags = {"/p/42": "product-42, catalog", "/p/43": "product-43 catalog"}
    fender = await start_fender(tag_policy(tagging.port))
    async with httpx.AsyncClient(base_url=fender.url) as client:
        for path in ("/p/42", "/p/43", "/other"):
            first = await client.get(path)
            assert "stored" in first.headers["cache-status"]
            assert "cache-tag" not in first.headers  # stripped before the client
            hit = await client.get(path)
            assert hit.headers["cache-status"].startswith("fender; hit") and "cache-tag" not in hit.headers
        async with httpx.AsyncClient() as admin:
            answer = await purge(admin, fender, {"tags": ["product-42"]})
            assert answer.status_code == 200 and answer.json() == {"purged": 1}
            assert stored(fender) == {
                b"127.0.0.1:%d/p/43" % fender.data_port,
                b"127.0.0.1:%d/other" % fender.data_port,
            }
            assert (await purge(admin, fender, {"tags": ["catalog", "nothing"]})).json() == {"purged": 1}
        assert stored(fender) == {b"127.0.0.1:%d/other" % fender.data_port}
        assert "fwd=miss" in (await client.get("/p/42")).headers["cache-status"]
        assert (await client.get("/other")).headers["cache-status"].startswith("fender; hit")
    text = await get_metrics(fender)
    assert metric_value(text, "fender_cache_purges_total", kind="tag", source="admin") == 2
    assert metric_value(text, "fender_cache_purged_total", kind="tag", tier="l1") == 2


async def test_forwarded_tag_header_reaches_the_client_on_misses_and_hits(tagging, start_fender):
    tagging.tags = {"/t": "a b"}
    fender = await start_fender(tag_policy(tagging.port, "forward_tag_header: true"))
    async with httpx.AsyncClient(base_url=fender.url) as client:
        assert (await client.get("/t")).headers["cache-tag"] == "a b"
        hit = await client.get("/t")
        assert hit.headers["cache-status"].startswith("fender; hit") and hit.headers["cache-tag"] == "a b"
    async with httpx.AsyncClient() as admin:
        assert (await purge(admin, fender, {"tags": ["b"]})).json() == {"purged": 1}


async def test_a_configured_tag_header_and_none(start_fender):
    origin = TaggingOrigin("Surrogate-Key")
    origin.tags = {"/s": "k1"}
    async with RawUpstream(origin.handle) as up:
        custom = await start_fender(tag_policy(up.port, "tag_header: Surrogate-Key"))
        off = await start_fender(tag_policy(up.port, "tag_header: null"))
        async with httpx.AsyncClient() as client:
            assert "surrogate-key" not in (await client.get(custom.url + "/s")).headers
            assert (await client.get(off.url + "/s")).headers["surrogate-key"] == "k1"  # not a tag header
            assert (await purge(client, custom, {"tags": ["k1"]})).json() == {"purged": 1}
            assert (await purge(client, off, {"tags": ["k1"]})).json() == {"purged": 0}


@pytest.mark.parametrize(
    "body",
    [
        {"tags": []},
        {"tags": "product-42"},
        {"tags": [""]},
        {"tags": ["two words"]},
        {"tags": ["a,b"]},
        {"tags": [1]},
        {"tags": ["x" * 129]},
        {"tags": ["t"] * 101},
        {"tags": ["\u20ac"]},
        {"tags": ["a"], "prefix": "/"},
        {"url": "/a", "prefix": "/"},
        [],
    ],
)
async def test_a_bad_purge_request_is_refused_clearly(tagging, start_fender, body):
    fender = await start_fender(tag_policy(tagging.port))
    async with httpx.AsyncClient() as client:
        answer = await purge(client, fender, body)
    assert answer.status_code == 400 and '"tags"' in answer.json()["error"]


# --------------------------------------------------------------------------- a fleet sharing a Redis


def fleet_tag_policy(port: int, redis_url: str, key_prefix: str) -> str:
    # A generous Redis timeout: these tests are about purges, and a call that outlives the timeout
    # is (by design) a miss or a skipped L2 write. With 200ms, a loaded machine stalling the test's
    # one event loop (three sidecars, the client and the origin) for longer made B miss what A stored.
    return tag_policy(port) + (
        f"state:\n  backend: redis\n  redis:\n    url: {redis_url}\n    key_prefix: '{key_prefix}'\n"
        "    timeout: 3s\n"
    )


async def redis_outcomes(fender) -> list[str]:
    """The Redis calls that did not succeed (for a failure's message)."""
    text = await get_metrics(fender)
    return [
        line
        for line in text.splitlines()
        if line.startswith("fender_redis_calls_total")
        and 'outcome="ok"' not in line
        and not line.endswith(" 0.0")
    ]


async def wait_purges(fender, count: int) -> None:
    async with asyncio.timeout(5):
        await fender.runtime.exposed["state"]["redis"].wait_purges(count)


async def test_purge_by_tag_reaches_every_sidecar_and_redis(redis_server, tagging, start_fender):
    tagging.tags = {"/p/42": "product-42", "/p/42/reviews": "product-42, reviews"}
    a, b, c = await start_fleet(start_fender, fleet_tag_policy(tagging.port, redis_server.url, prefix()))
    state = a.runtime.exposed["state"]["redis"]
    paths = ("/p/42", "/p/42/reviews", "/p/43")
    async with httpx.AsyncClient(headers=HOST) as client:
        for path in paths:
            await client.get(a.url + path)
        await drain_writes(a)
        for path in paths:  # B reads them from L2 into its L1
            status = (await client.get(b.url + path)).headers["cache-status"]
            assert status.startswith("fender; hit"), (
                path,
                status,
                await redis_outcomes(a),
                await redis_outcomes(b),
            )
        # The tag's set in Redis lives as long as its longest-lived entry (60s), no longer.
        tag_key = state.tag_key(b"product-42")
        assert redis_server.command("ZCARD", tag_key) == b":2\r\n"
        pttl = int(redis_server.command("PTTL", tag_key)[1:-2])
        assert 55_000 < pttl <= 60_001
        sent = time.perf_counter()
        answer = await purge(client, c, {"tags": ["product-42"]})  # C holds nothing in its L1
        assert answer.json() == {"purged": 0, "fleet": True, "fleet_purged": 2}
        await wait_purges(a, 1)
        await wait_purges(b, 1)
        print(
            f"purge by tag: every sidecar dropped the tag {(time.perf_counter() - sent) * 1000:.2f} ms after"
        )
        for fender in (a, b):
            assert {k.decode().split("/", 1)[1] for k in stored(fender)} == {"p/43"}
        for path in paths[:2]:
            assert (
                redis_server.command("EXISTS", state.cache_key(b"catalog.svc" + path.encode())) == b":0\r\n"
            )
        assert redis_server.command("EXISTS", tag_key) == b":0\r\n"
        assert redis_server.command("EXISTS", state.cache_key(b"catalog.svc/p/43")) == b":1\r\n"
        assert "fwd=miss" in (await client.get(c.url + "/p/42")).headers["cache-status"]
        status = (await client.get(c.url + "/p/43")).headers["cache-status"]
        assert status.startswith("fender; hit"), (status, await redis_outcomes(c))
    text = await get_metrics(a)
    assert metric_value(text, "fender_cache_purges_total", kind="tag", source="fleet") == 1
    assert metric_value(text, "fender_cache_purged_total", kind="tag", tier="l1") == 2
    assert metric_value(await get_metrics(c), "fender_cache_purged_total", kind="tag", tier="l2") == 2


async def test_purge_by_prefix_reaches_redis_values_no_sidecar_holds(redis_server, tagging, start_fender):
    a, b = await start_fleet(start_fender, fleet_tag_policy(tagging.port, redis_server.url, prefix()), n=2)
    state = a.runtime.exposed["state"]["redis"]
    async with httpx.AsyncClient(headers=HOST) as client:
        for path in ("/shop/1", "/shop/2?x=1", "/shopping", "/blog/1"):
            await client.get(a.url + path)
        await drain_writes(a)
        assert (await client.get(b.url + "/shop/1")).headers["cache-status"].startswith("fender; hit")
        a.runtime.exposed["cache"]["store"].delete(b"catalog.svc/shop/2?x=1")  # now only in Redis
        answer = await purge(client, b, {"prefix": "http://catalog.svc/shop/"})
        assert answer.json() == {"purged": 1, "fleet": True, "fleet_purged": 2}
        await wait_purges(a, 1)
        assert {k.decode() for k in stored(a)} == {"catalog.svc/shopping", "catalog.svc/blog/1"}
        for key in (b"catalog.svc/shop/1", b"catalog.svc/shop/2?x=1"):
            assert redis_server.command("EXISTS", state.cache_key(key)) == b":0\r\n"
        for key in (b"catalog.svc/shopping", b"catalog.svc/blog/1"):
            assert redis_server.command("EXISTS", state.cache_key(key)) == b":1\r\n"
        # Another host's keys under the same prefix are left alone; {"prefix": "/shop"} takes every host.
        answer = await purge(client, a, {"prefix": "http://other.svc/"})
        assert answer.json() == {"purged": 0, "fleet": True, "fleet_purged": 0}
        answer = await purge(client, a, {"prefix": "/shop"})
        assert answer.json() == {"purged": 1, "fleet": True, "fleet_purged": 1}
        assert {k.decode() for k in stored(a)} == {"catalog.svc/blog/1"}
