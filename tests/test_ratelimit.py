"""Rate limits: the GCRA arithmetic with a manual clock, and the 429 path over real sockets."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from fractions import Fraction

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.config import PolicyError, parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.ratelimit.gcra import NS, Limiter
from proxy.policies.ratelimit.limits import RouteRateLimit
from tests.conftest import policy_text

# Requests are sent at multiples of 1/256 s: exact in binary floats and in nanoseconds,
# so the expected counts below can be computed with exact fractions.
TICK = Fraction(1, 256)


def make_exchange(client: str = "10.0.0.1", headers: list[tuple[bytes, bytes]] | None = None) -> Exchange:
    return Exchange(
        "GET", b"/", [], b"svc", b"", None, None, b"rid", "r", 0.0, client, headers or [], float("inf")
    )


def route_limits(text: str):
    policy = parse_policy(policy_text(1, routes=text), "t.yaml")
    return policy.routes[0].rate_limit


def limiter_for(rate: str, burst: int, max_keys: int = 100_000) -> Limiter:
    (options,) = route_limits(
        f"- {{name: r, upstream: echo, rate_limit: {{rate: '{rate}', burst: {burst}, max_keys: {max_keys}}}}}"
    )
    return Limiter.from_options(options)


def ns(seconds: Fraction) -> int:
    value = seconds * NS
    assert value.denominator == 1
    return int(value)


class ReferenceBucket:
    """The textbook token bucket in exact fractions: an independent model to compare with."""

    def __init__(self, count: int, period: Fraction, burst: int, start: Fraction) -> None:
        self.rate = Fraction(count) / period
        self.burst = burst
        self.tokens = Fraction(burst)
        self.last = start

    def take(self, t: Fraction) -> bool:
        self.tokens = min(Fraction(self.burst), self.tokens + (t - self.last) * self.rate)
        self.last = t
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@pytest.mark.parametrize(
    ("rate", "count", "period", "burst"),
    [
        ("100/s", 100, Fraction(1), 20),
        ("7/s", 7, Fraction(1), 1),
        ("3/s", 3, Fraction(1), 5),
        ("6000/m", 6000, Fraction(60), 100),
        ("5/10s", 5, Fraction(10), 2),
        ("1/1.5s", 1, Fraction(3, 2), 4),
        ("250/s", 250, Fraction(1), 2),
    ],
)
def test_greedy_client_gets_exactly_burst_plus_rate_times_t(rate, count, period, burst):
    """A client sending as much as it can for a simulated minute: admitted counts match the exact model.

    With a burst of 2 or more the bucket never fills up between two ticks, so the
    count by time t is exactly B + floor(t * C / P); with a burst of 1 the bucket
    is full between token times and the reference model gives the (lower) count.
    """
    limiter = limiter_for(rate, burst)
    start = Fraction(1000)
    reference = ReferenceBucket(count, period, burst, start)
    admitted = 0
    expected = 0
    for step in range(0, 60 * 256 + 1):
        t = step * TICK
        now = ns(start + t)
        for _ in range(burst + 300):  # bounded: at most burst + one tick's worth can pass
            if limiter.check("k", now):
                break
            limiter.commit("k", now)
            admitted += 1
        for _ in range(burst + 300):
            if not reference.take(start + t):
                break
            expected += 1
        assert admitted == expected, (rate, burst, float(t))
        ceiling = burst + (t * count / period).__floor__()
        assert admitted <= ceiling
        if burst >= 2:
            assert admitted == ceiling, (rate, burst, float(t))


def test_an_hour_of_traffic_does_not_drift():
    """A simulated hour at 3/s (a period of 1/3 s, not exact in binary): still exactly B + floor(3t)."""
    limiter = limiter_for("3/s", 2)
    start = Fraction(7 * 86400)  # a week of uptime on the monotonic clock
    admitted = 0
    for step in range(0, 3600 * 4 + 1):
        t = step * Fraction(1, 4)
        now = ns(start + t)
        for _ in range(4):
            if limiter.check("k", now):
                break
            limiter.commit("k", now)
            admitted += 1
        assert admitted == 2 + (3 * t).__floor__()
    assert admitted == 2 + 3 * 3600


def test_any_window_admits_at_most_burst_plus_rate_times_window():
    """Random arrivals: for every pair of admitted requests, the ones between them fit B + rate*T."""
    rng = random.Random(4)
    count, period, burst = 10, Fraction(1), 4
    limiter = limiter_for("10/s", burst)
    times: list[Fraction] = []
    t = Fraction(2000)
    for _ in range(3000):
        t += rng.choice((0, 0, 1, 2, 3, 40)) * TICK
        if not limiter.check("k", ns(t)):
            limiter.commit("k", ns(t))
            times.append(t)
    assert 300 < len(times) < 3000  # the limit was active and did admit
    for i in range(len(times)):
        for j in range(i, min(len(times), i + 80)):
            window = times[j] - times[i]
            assert j - i + 1 <= burst + window * count / period


def test_idle_key_refills_to_burst_only():
    limiter = limiter_for("2/s", 3)
    now = ns(Fraction(500))
    for _ in range(3):
        assert limiter.check("k", now) == 0
        limiter.commit("k", now)
    assert limiter.check("k", now) > 0
    later = now + 3600 * NS  # an hour idle
    passed = 0
    while limiter.check("k", later) == 0 and passed < 10:
        limiter.commit("k", later)
        passed += 1
    assert passed == 3


def test_remaining_reset_and_wait():
    limiter = limiter_for("1/s", 3)
    now = ns(Fraction(10))
    assert limiter.remaining("k", now) == 3
    limiter.commit("k", now)
    assert limiter.remaining("k", now) == 2
    assert limiter.reset_seconds("k", now) == 1
    limiter.commit("k", now)
    limiter.commit("k", now)
    assert limiter.remaining("k", now) == 0
    assert limiter.reset_seconds("k", now) == 3
    wait = limiter.check("k", now)
    assert limiter.wait_seconds(wait) == 1
    # half a second later the next token is still half a second away
    assert limiter.check("k", now + NS // 2) > 0
    assert limiter.check("k", now + NS) == 0


def test_ten_times_max_keys_distinct_keys_stay_within_max_keys_and_bounded_memory():
    """10x max_keys distinct keys (in nine further rounds of max_keys each) through a table of
    max_keys: the table never grows past it and its memory stays where the full table put it.
    (The bound is the same at any size; a million keys through 100,000 took 13 s and showed no more.)"""
    max_keys = 5_000
    limiter = limiter_for("1/m", 5, max_keys=max_keys)
    now = ns(Fraction(100))
    commit = limiter.commit
    sizes = []
    tracemalloc.start()
    try:
        for i in range(max_keys):
            commit(f"c{i:07d}", now)
        full, _ = tracemalloc.get_traced_memory()
        for block in range(1, 10):
            for i in range(block * max_keys, (block + 1) * max_keys):
                commit(f"c{i:07d}", now)
            sizes.append(len(limiter))
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [max_keys] * 9
    # Measured on CPython 3.11/3.12: about 200 bytes a key for the full table, and the same order
    # after ten times as many keys (the dict's slot array breathes with the churn).
    print(
        f"table of {max_keys} keys: {full / 1e3:.0f} kB; after 10x: {after / 1e3:.0f} kB, peak {peak / 1e3:.0f} kB"
    )
    assert full < max_keys * 400
    assert peak < full * 2  # a dict resize briefly holds old and new slot arrays
    assert after < full * 1.6


def test_idle_keys_expire_without_reaching_max_keys():
    limiter = limiter_for("10/s", 1, max_keys=1000)
    base = ns(Fraction(50))
    for i in range(10_000):
        # each key is seen once; 1 s later its bucket is full again and it carries no information
        limiter.commit(f"k{i}", base + i * NS // 100)
    assert len(limiter) <= 200  # only keys seen within the last second or so remain


def test_several_limits_check_all_before_consuming():
    clock = ManualClock(100.0)
    limits = route_limits(
        """
        - name: r
          upstream: echo
          rate_limit:
            - {rate: 10/s, burst: 10, key: client_ip}
            - {rate: 1/m, burst: 2, key: route}
        """
    )
    state = RouteRateLimit("r", limits, clock, Metrics())
    now = round(clock.now() * NS)
    assert state.decide(make_exchange("1.1.1.1"), now) is None
    assert state.decide(make_exchange("1.1.1.1"), now) is None
    reply = state.decide(make_exchange("1.1.1.1"), now)
    assert isinstance(reply, LocalReply) and reply.status == 429
    # the per-client bucket gave only the two admitted requests: 8 of 10 left
    client = state.limits[0].limiter
    assert client.remaining("1.1.1.1", now) == 8
    headers = dict(reply.headers)
    assert headers[b"ratelimit-policy"] == b'"client_ip";q=10;w=1, "route";q=1;w=60'
    assert headers[b"ratelimit"] == b'"client_ip";r=8;t=1, "route";r=0;t=120'
    assert headers[b"retry-after"] == b"60"  # the route limit's next token: one per 60 s


@pytest.mark.parametrize("key", ["client_ip", "header:X-Api-Key"])
def test_one_limit_layer_answers_as_decide_does(key):
    # The one-limit layer (a closure with its constants bound) and decide's general path, side by
    # side on the same traffic: same admissions, same RateLimit headers, same 429s.
    from types import SimpleNamespace

    from proxy.policies.context import LayerContext
    from proxy.policies.ratelimit.layer import build_layer

    limits = route_limits(f"- {{name: r, upstream: echo, rate_limit: {{rate: 5/s, burst: 3, key: '{key}'}}}}")
    clock = ManualClock(100.0)
    route = SimpleNamespace(name="r", rate_limit=limits)
    ctx = LayerContext(metrics=Metrics(), upstream=None, policy=None, clock=clock)

    async def upstream(ex):
        return "passed"

    layer = build_layer(route, upstream, ctx)
    assert layer.__name__ == "single_limit_layer"
    reference = RouteRateLimit("r", limits, clock, Metrics())
    rng = random.Random(7)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(200):
            client = rng.choice(["1.1.1.1", "2.2.2.2"])
            headers = [(b"x-api-key", client.encode())]
            ex, ref_ex = make_exchange(client, headers), make_exchange(client, headers)
            got = loop.run_until_complete(layer(ex))
            expected = reference.decide(ref_ex, round(clock.now() * NS))
            if expected is None:
                assert got == "passed"
                assert ex.response_headers == ref_ex.response_headers
            else:
                assert got.status == expected.status == 429
                assert got.headers == expected.headers
            clock.advance(rng.choice([0.0, 0.01, 0.1, 0.3]))
    finally:
        loop.close()


def test_shadow_limit_limits_nothing_and_counts():
    clock = ManualClock(100.0)
    metrics = Metrics()
    limits = route_limits("- {name: r, upstream: echo, rate_limit: {rate: 2/s, burst: 2, shadow: true}}")
    state = RouteRateLimit("r", limits, clock, metrics)
    results = []
    for _ in range(5):
        ex = make_exchange("2.2.2.2")
        ex.trace = []
        results.append(state.decide(ex, round(clock.now() * NS)))
    assert results == [None] * 5
    assert ex.trace == ["ratelimit shadow_limited client_ip"]
    assert ex.response_headers == []  # shadow limits are invisible to clients
    sample = metrics.registry.get_sample_value
    assert sample("fender_ratelimit_requests_total", {"route": "r", "decision": "allowed"}) == 2
    assert sample("fender_ratelimit_requests_total", {"route": "r", "decision": "shadow_limited"}) == 3
    assert sample("fender_ratelimit_requests_total", {"route": "r", "decision": "limited"}) == 0
    clock.advance(0.5)
    assert state.decide(make_exchange("2.2.2.2"), round(clock.now() * NS)) is None
    assert sample("fender_ratelimit_requests_total", {"route": "r", "decision": "allowed"}) == 3


def test_header_key_and_missing_header_share_one_bucket():
    clock = ManualClock(100.0)
    limits = route_limits(
        "- {name: r, upstream: echo, rate_limit: {rate: 1/m, burst: 1, key: 'header:X-Api-Key'}}"
    )
    state = RouteRateLimit("r", limits, clock, Metrics())
    now = round(clock.now() * NS)
    assert state.decide(make_exchange(headers=[(b"x-api-key", b"a")]), now) is None
    assert state.decide(make_exchange(headers=[(b"x-api-key", b"b")]), now) is None
    assert state.decide(make_exchange(headers=[(b"x-api-key", b"a")]), now) is not None
    assert state.decide(make_exchange(), now) is None
    assert state.decide(make_exchange(headers=[(b"other", b"x")]), now) is not None  # same "missing" bucket
    long_value = b"v" * 10_000  # long values are keyed by a digest, not stored
    assert state.decide(make_exchange(headers=[(b"x-api-key", long_value)]), now) is None
    assert all(len(key) <= 64 for key, _ in state.limits[0].limiter.items())


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{rate: 10/s, key: 'cookie:x'}", "is not a rate-limit key"),
        ("{rate: 10/s, key: 'header:bad name'}", "not a valid header name"),
        ("{rate: 10/s, burst: 0}", "must be at least 1"),
        ("[{rate: 10/s}, {rate: 1/s}]", 'two limits are named "client_ip"'),
        ("[]", "at least one limit"),
        ("{rate: 10}", "bare number"),
    ],
)
def test_invalid_rate_limit_sections_are_refused(section, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(policy_text(1, routes=f"- {{name: r, upstream: echo, rate_limit: {section}}}"), "t.yaml")
    assert message in str(info.value)


# --------------------------------------------------------------------------- real sockets


async def test_429_carries_headers_and_never_reaches_upstream(echo_upstream, start_fender):
    fender = await start_fender(
        policy_text(
            echo_upstream.port,
            routes="""
            - name: limited
              upstream: echo
              rate_limit: {rate: 1/m, burst: 3, key: client_ip}
            """,
        )
    )
    async with httpx.AsyncClient() as client:
        responses = [await client.get(fender.url + f"/r/{i}") for i in range(5)]
        metrics = (await client.get(fender.admin_url + "/metrics")).text
        admin = (await client.get(fender.admin_url + "/admin/ratelimits")).json()
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert [r["path"] for r in echo_upstream.requests] == ["/r/0", "/r/1", "/r/2"]
    ok = responses[2]
    assert ok.headers["ratelimit-policy"] == '"client_ip";q=1;w=60'
    assert ok.headers["ratelimit"] == '"client_ip";r=0;t=180'  # three requests of 1/m: full again in 180 s
    limited = responses[3]
    assert limited.headers["x-fender-error"] == "rate_limited"
    assert limited.headers["ratelimit-policy"] == '"client_ip";q=1;w=60'
    assert limited.headers["ratelimit"].startswith('"client_ip";r=0;t=')
    assert 55 <= int(limited.headers["retry-after"]) <= 60  # the next token comes 60 s after the burst
    assert 'fender_ratelimit_requests_total{decision="limited",route="limited"} 2.0' in metrics
    assert 'fender_ratelimit_requests_total{decision="allowed",route="limited"} 3.0' in metrics
    assert 'fender_ratelimit_keys{route="limited"} 1.0' in metrics
    assert admin["routes"]["limited"]["limits"][0]["keys"] == 1


async def test_spoofed_forwarded_for_does_not_change_the_key(echo_upstream, start_fender):
    routes = """
    - name: limited
      upstream: echo
      rate_limit: {rate: 1/m, burst: 1}
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes=routes))
    async with httpx.AsyncClient() as client:
        statuses = [
            (await client.get(fender.url + "/", headers={"X-Forwarded-For": f"203.0.113.{i}"})).status_code
            for i in range(4)
        ]
    assert statuses == [200, 429, 429, 429]
    assert len(echo_upstream.requests) == 1


async def test_trusted_proxy_forwarded_for_keys_per_client(echo_upstream, start_fender):
    routes = """
    - name: limited
      upstream: echo
      rate_limit: {rate: 1/m, burst: 1}
    """
    fender = await start_fender(
        policy_text(echo_upstream.port, routes=routes, server="trusted_proxies: [127.0.0.1]\n")
    )
    async with httpx.AsyncClient() as client:
        statuses = [
            (
                await client.get(fender.url + "/", headers={"X-Forwarded-For": f"203.0.113.{i % 2}"})
            ).status_code
            for i in range(4)
        ]
    assert statuses == [200, 200, 429, 429]
    assert len(echo_upstream.requests) == 2


async def test_headers_false_leaves_allowed_responses_alone(echo_upstream, start_fender):
    routes = """
    - name: quiet
      upstream: echo
      rate_limit: {rate: 100/s, headers: false}
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes=routes))
    async with httpx.AsyncClient() as client:
        response = await client.get(fender.url + "/")
    assert response.status_code == 200
    assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers


async def test_concurrent_requests_admit_exactly_the_burst(echo_upstream, start_fender):
    routes = """
    - name: burst
      upstream: echo
      rate_limit: {rate: 1/h, burst: 7, key: route}
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes=routes))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client:
        responses = await asyncio.gather(*(client.get(fender.url + "/") for _ in range(20)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [429] * 13
    assert len(echo_upstream.requests) == 7


async def test_trusted_hops_take_the_client_from_the_right_of_the_chain(echo_upstream, start_fender):
    """server.trusted_hops: 1 — the nearest proxy's entry names the client; what the client wrote is ignored."""
    routes = """
    - name: limited
      upstream: echo
      rate_limit: {rate: 1/m, burst: 1}
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes=routes, server="trusted_hops: 1\n"))
    async with httpx.AsyncClient() as client:

        async def get(xff: str) -> int:
            return (await client.get(fender.url + "/", headers={"X-Forwarded-For": xff})).status_code

        # The client forges the left part; the proxy appended 203.0.113.5 each time: one bucket.
        same_client = [await get(f"10.9.9.{i}, 203.0.113.5") for i in range(3)]
        other_client = await get("203.0.113.6")
    assert same_client == [200, 429, 429]
    assert other_client == 200
    assert len(echo_upstream.requests) == 2


def test_trusted_hops_and_trusted_proxies_are_exclusive():
    with pytest.raises(PolicyError) as info:
        parse_policy(policy_text(1, server="trusted_hops: 1\ntrusted_proxies: [10.0.0.0/8]\n"), "t.yaml")
    assert "either trusted_proxies or trusted_hops" in str(info.value)


def test_headers_false_hides_only_that_limit_on_allowed_responses():
    clock = ManualClock(100.0)
    limits = route_limits(
        """
        - name: r
          upstream: echo
          rate_limit:
            - {rate: 5/s, burst: 1, key: client_ip, headers: false}
            - {rate: 50/s, key: route, name: total}
        """
    )
    state = RouteRateLimit("r", limits, clock, Metrics())
    now = round(clock.now() * NS)
    allowed = make_exchange("3.3.3.3")
    assert state.decide(allowed, now) is None
    assert dict(allowed.response_headers) == {
        b"ratelimit-policy": b'"total";q=50;w=1',
        b"ratelimit": b'"total";r=49;t=1',
    }
    refused = state.decide(make_exchange("3.3.3.3"), now)
    assert dict(refused.headers)[b"ratelimit-policy"] == b'"client_ip";q=5;w=1, "total";q=50;w=1'
    assert dict(refused.headers)[b"ratelimit"] == b'"client_ip";r=0;t=1, "total";r=49;t=1'
