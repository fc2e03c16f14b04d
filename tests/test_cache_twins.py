"""The cache's fast twin (the inline hit-for-miss path, CacheLayer._hit_for_miss) against the
general path it mirrors (CacheLayer._miss -> fetch -> answer): the same outcomes for the same
requests and upstream answers.

Both paths are driven on one layer each, built alike and primed alike (one no-store answer marks
the URL not storable); the next layer is a script of replies, because the point is to feed both
paths byte-identical upstream answers, including Fender's own fault replies.
"""

from __future__ import annotations

import pytest

from proxy.clock import ManualClock
from proxy.config import parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.cache.layer import CacheLayer, shared_store
from proxy.policies.cache.request import request_of
from proxy.policies.context import LayerContext

pytestmark = pytest.mark.unit

POLICY = """
upstreams: {a: {replicas: [{url: http://127.0.0.1:9}]}}
routes:
  - name: r
    upstream: a
    cache: CACHE
"""
RESULTS = ("hit", "miss", "stale", "revalidated", "bypass", "coalesced", "only_if_cached")


class Upstream:
    """An upstream reply with a body, read in two chunks."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = list(headers)
        self._chunks = [body[:3], body[3:]] if body else []

    complete = True
    trailers = None

    def has_body(self) -> bool:
        return bool(self._chunks)

    async def read(self) -> bytes:
        while self._chunks:
            chunk = self._chunks.pop(0)
            if chunk:
                return chunk
        return b""

    def close(self) -> None:
        self._chunks = []


class Next:
    """The next layer: answers each request with the next reply made by ``make`` and keeps
    the headers the cache sent upstream."""

    def __init__(self, *makers) -> None:
        self.makers = list(makers)
        self.sent: list[list[tuple[bytes, bytes]]] = []

    async def __call__(self, ex: Exchange):
        self.sent.append(list(ex.headers))
        return self.makers.pop(0)()


def plain() -> Upstream:
    return Upstream(200, [(b"content-type", b"text/plain")], b"not storable")


def no_store() -> Upstream:
    return Upstream(200, [(b"cache-control", b"no-store")], b"never stored")


def exchange(headers: list[tuple[bytes, bytes]]) -> Exchange:
    return Exchange(
        "GET", b"/p?q=1", list(headers), b"svc", b"", None, None, b"rid", "r", 0.0, None, headers, 1e12
    )


async def drain(reply) -> bytes:
    out = b""
    for _ in range(100):  # bounded: a reply here has at most a few chunks
        chunk = await reply.read()
        if not chunk:
            break
        out += chunk
    reply.close()
    return out


async def outcome(cache: str, request: list[tuple[bytes, bytes]], make, general: bool) -> dict:
    """What one request gets from a layer whose URL is marked not storable: through the fast
    twin (``general`` False, the layer's own dispatch) or through the general path."""
    policy = parse_policy(POLICY.replace("CACHE", cache), "p.yaml")
    clock = ManualClock()
    metrics = Metrics()
    ctx = LayerContext(metrics, None, policy, clock)
    upstream = Next(no_store, make)
    layer = CacheLayer(policy.routes[0], upstream, ctx, shared_store(ctx), policy.cache)
    await drain(await layer(exchange([])))  # marks the URL not storable (hit-for-miss)
    key = layer.key(b"svc", b"/p?q=1")
    assert key in layer.hit_for_miss.table
    clock.advance(1)
    ex = exchange(request)
    if general:
        reply = await layer._miss(ex, key, request_of(ex.request_headers), None, b"miss")
    else:
        until = layer.hit_for_miss.table[key]
        assert until > clock.now() and not request_of(request).directives  # the twin's own conditions
        reply = await layer(ex)
    body = await drain(reply)
    variants = layer.store.get(key)
    return {
        "status": reply.status,
        "headers": list(reply.headers),
        "body": body,
        "response_headers": list(ex.response_headers),
        "sent_upstream": upstream.sent[1],
        "stored": None
        if variants is None
        else [(e.status, e.headers, e.body, e.tags) for e in variants.entries],
        "still_marked": key in layer.hit_for_miss.table,
        "results": {
            r: metrics.registry.get_sample_value("fender_cache_requests_total", {"route": "r", "result": r})
            for r in RESULTS
        },
    }


ANSWERS = {
    "plain": plain,
    "tagged": lambda: Upstream(200, [(b"cache-tag", b"a b, c"), (b"content-type", b"text/plain")], b"x"),
    "storable-now": lambda: Upstream(
        200, [(b"cache-control", b"max-age=60"), (b"cache-tag", b"t")], b"fresh"
    ),
    "not-storable-cc": lambda: Upstream(200, [(b"cache-control", b"no-store")], b"private"),
    "surrogate": lambda: Upstream(200, [(b"surrogate-control", b"max-age=60")], b"edge"),
    "cdn-targeted": lambda: Upstream(200, [(b"cdn-cache-control", b"no-store")], b"cdn"),
    "validators": lambda: Upstream(
        200, [(b"etag", b'"v1"'), (b"last-modified", b"Mon, 01 Jan 2024 00:00:00 GMT")], b"v"
    ),
    "server-error": lambda: Upstream(503, [(b"cache-tag", b"t")], b"down"),
    "explicit-error": lambda: Upstream(500, [(b"cache-control", b"max-age=30")], b"down"),
    "no-body": lambda: Upstream(204, [], b""),
    "uncommon-status": lambda: Upstream(418, [], b"teapot"),
    "fault": lambda: LocalReply("connect_failure"),
}
CACHES = {
    "defaults": "{}",
    "tags-forwarded": "{forward_tag_header: true}",
    "tags-off": "{tag_header: null}",
    "route-ttl": "{default_ttl: 10s}",
    "no-targets": "{targeted_fields: []}",
}
REQUESTS = {
    "plain": [],
    "conditional": [(b"if-none-match", b'"v1"'), (b"accept", b"*/*")],
    "since": [(b"if-modified-since", b"Mon, 01 Jan 2024 00:00:00 GMT")],
}


@pytest.mark.parametrize("answer", list(ANSWERS))
@pytest.mark.parametrize("cache", list(CACHES))
async def test_hit_for_miss_twin_gives_what_the_general_path_gives(cache, answer):
    fast = await outcome(CACHES[cache], [], ANSWERS[answer], general=False)
    general = await outcome(CACHES[cache], [], ANSWERS[answer], general=True)
    assert fast == general


@pytest.mark.parametrize("answer", ["plain", "tagged", "validators", "storable-now", "fault"])
@pytest.mark.parametrize("request_name", ["conditional", "since"])
async def test_hit_for_miss_twin_treats_a_conditional_request_like_the_general_path(request_name, answer):
    fast = await outcome("{}", REQUESTS[request_name], ANSWERS[answer], general=False)
    general = await outcome("{}", REQUESTS[request_name], ANSWERS[answer], general=True)
    assert fast == general
    # The cache asks for a full response: the client's conditionals never go upstream.
    assert not any(n in (b"if-none-match", b"if-modified-since") for n, _ in fast["sent_upstream"])


async def test_the_twin_is_the_path_taken_and_its_one_difference_is_refreshing_the_mark_less_often():
    # The twin keeps the URL's mark until less than half of uncacheable_ttl is left (fewer writes
    # to the LRU table); the general path marks it again on every answer. Both keep it marked.
    policy = parse_policy(POLICY.replace("CACHE", "{uncacheable_ttl: 60s}"), "p.yaml")
    clock = ManualClock()
    ctx = LayerContext(Metrics(), None, policy, clock)
    layer = CacheLayer(
        policy.routes[0], Next(plain, plain, plain, plain), ctx, shared_store(ctx), policy.cache
    )
    key = layer.key(b"svc", b"/p?q=1")
    await drain(await layer(exchange([])))
    first = layer.hit_for_miss.table[key]
    clock.advance(10)  # 50s of 60s left: more than half
    await drain(await layer(exchange([])))
    assert layer.hit_for_miss.table[key] == first  # the twin answered and left the mark
    clock.advance(25)  # 25s left: less than half
    await drain(await layer(exchange([])))
    assert layer.hit_for_miss.table[key] == clock.now() + 60
    clock.advance(1)
    await drain(await layer._miss(exchange([]), key, request_of([]), None, b"miss"))
    assert layer.hit_for_miss.table[key] == clock.now() + 60  # the general path: every time
