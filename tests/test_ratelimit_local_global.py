"""A route with local and global rate limits (issue 24): a request the global limit refuses spends
no local token. With the manual clock and no Redis answering (nothing listens on the port, so
``on_failure: local`` decides the global limits in this process's memory), and against a real
Redis in tests/test_fleet.py (test_local_and_global_limits_on_one_route)."""

from __future__ import annotations

import socket
import textwrap

from proxy.clock import ManualClock
from proxy.cluster.upstream import UpstreamRuntime
from proxy.config import parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.context import LayerContext
from proxy.policies.ratelimit.gcra import NS
from proxy.policies.ratelimit.layer import build_layer

POLICY = textwrap.dedent(
    """\
    listen: 127.0.0.1:0
    admin: 127.0.0.1:0
    upstreams:
      up: {replicas: [{url: "http://127.0.0.1:9"}]}
    routes:
      - name: r
        upstream: up
        rate_limit:
          - {rate: 1/m, burst: 3, key: "header:X-Key", name: per-key}
          - {rate: 1/m, burst: 1, key: route, scope: global, name: fleet}
    state:
      backend: redis
      redis: {url: "redis://127.0.0.1:PORT/0", on_failure: local, timeout: 200ms}
    """
)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(text: str, clock: ManualClock):
    policy = parse_policy(text.replace("PORT", str(closed_port())))
    metrics = Metrics()
    ctx = LayerContext(metrics, UpstreamRuntime("up", policy.upstreams["up"], metrics, clock), policy, clock)
    upstream = Upstream()
    return build_layer(policy.routes[0], upstream, ctx), ctx, upstream


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ex):
        self.calls += 1
        return LocalReply("no_route", status=200)


def request(clock: ManualClock, key: bytes) -> Exchange:
    headers = [(b"x-key", key)]
    return Exchange(
        "GET", b"/", headers, b"h", b"", None, 0, b"id", "r", clock.now(),
        request_headers=headers,
    )  # fmt: skip


async def test_a_globally_refused_request_spends_no_local_token():
    clock = ManualClock()
    layer, ctx, upstream = build(POLICY, clock)
    state = ctx.exposed["ratelimit"]["r"]
    local = state.local.limits[0].limiter

    def left() -> int:
        return local.remaining(b"k1", round(clock.now() * NS))

    assert left() == 3
    assert (await layer(request(clock, b"k1"))).status == 200
    assert left() == 2
    refused = [await layer(request(clock, b"k1")) for _ in range(5)]
    assert [r.status for r in refused] == [429] * 5 and upstream.calls == 1
    assert all('"fleet"' in r.headers[-1][1].decode() for r in refused)  # the global limit refused
    assert left() == 2  # before issue 24 the local bucket ran dry and refused k1 by itself
    clock.advance(60)  # one global token again; the local bucket refills one too (back to its burst)
    assert (await layer(request(clock, b"k1"))).status == 200
    assert left() == 2 and upstream.calls == 2


async def test_a_locally_refused_request_never_asks_the_global_limit():
    clock = ManualClock()
    text = POLICY.replace("burst: 3, key", "burst: 1, key").replace(
        "burst: 1, key: route", "burst: 5, key: route"
    )
    layer, ctx, _ = build(text, clock)
    fleet = ctx.exposed["ratelimit"]["r"].fallback.limits[0].limiter
    statuses = [(await layer(request(clock, b"k1"))).status for _ in range(3)]
    assert statuses == [200, 429, 429]
    assert fleet.remaining("", round(clock.now() * NS)) == 4  # one global token spent, by the admitted one
