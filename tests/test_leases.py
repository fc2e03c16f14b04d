"""Global rate limits by leasing (issue 22): lease sizing, fleet accuracy, a sidecar killed holding a lease.

Sizing is tested on :class:`proxy.policies.ratelimit.lease.LeaseTable` with a ManualClock. The fleet tests use a
private redis-server (tests/support/redis_server.py) and Fenders sharing it.
"""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.policies.ratelimit.lease import LeaseTable
from tests.conftest import free_port, wait_port
from tests.support.fleet import limit_policy, redis_time, start_fleet
from tests.support.metrics import get_metrics, metric_value
from tests.support.redis_server import redis_server_fixture  # noqa: F401  (the redis_server fixture)

# --------------------------------------------------------------------------- sizing (no Redis)


def test_a_first_lease_is_one_token_and_demand_sizes_the_next():
    clock = ManualClock()
    table = LeaseTable(clock, lease_time=0.5, max_batch=30, max_keys=10)
    lease = table.get("k")
    lease.demand = 1
    assert table.want(lease, clock.now()) == 30  # one request in no time: as large as allowed
    table.granted(lease, 1, 1, 0.0, 0, clock.now())
    assert lease.tokens == 1 and lease.demand == 0 and lease.expires == clock.now() + 0.5
    clock.advance(1.0)
    lease.demand = 40  # 40/s over the last second: 20 tokens cover the next lease time
    assert table.want(lease, clock.now()) == 20 - 1  # one token is still held
    lease.demand = 1000  # 1000/s: capped at max_batch
    assert table.want(lease, clock.now()) == 30 - 1


def test_a_quiet_key_leases_one_token_at_a_time():
    clock = ManualClock()
    table = LeaseTable(clock, lease_time=0.5, max_batch=30, max_keys=10)
    lease = table.get("quiet")
    table.granted(lease, 1, 1, 0.0, 0, clock.now())
    clock.advance(3.0)
    lease.demand = 1  # one request in 3 s
    assert table.available(lease, clock.now()) == 0  # its token expired after 0.5 s
    assert table.want(lease, clock.now()) == 1
    assert not table.low(lease)  # batches of one are renewed on demand, not ahead


def test_unspent_tokens_expire_and_a_short_grant_blocks_until_the_next_token():
    clock = ManualClock()
    table = LeaseTable(clock, lease_time=0.25, max_batch=10, max_keys=10)
    lease = table.get("k")
    table.granted(lease, 10, 10, 0.1, 0, clock.now())
    assert table.available(lease, clock.now()) == 10 and lease.next_at == 0.0  # got all it asked for
    assert table.held() == 10
    lease.tokens = 2
    assert table.low(lease)  # 2 of 10 left: renew ahead
    clock.advance(0.25)
    assert table.available(lease, clock.now()) == 0 and table.held() == 0
    table.granted(lease, 10, 3, 0.1, 0, clock.now())  # the fleet bucket had 3
    assert lease.tokens == 3 and lease.next_at == pytest.approx(clock.now() + 0.1)


def test_the_lease_table_is_bounded_least_recently_used_first():
    clock = ManualClock()
    table = LeaseTable(clock, lease_time=0.5, max_batch=10, max_keys=2)
    a = table.get("a")
    table.get("b")
    assert table.get("a") is a  # a is now the most recent
    table.get("c")
    assert len(table) == 2 and table.get("a") is a
    assert table.get("b") is not None and len(table) == 2


def test_lease_share_and_time_are_validated():
    from proxy.config.loader import PolicyError, parse_policy

    base = limit_policy(9, "redis://127.0.0.1:1/0", "{rate: 300/s, scope: global}")
    assert parse_policy(base + "    lease_share: 25%\n", "p.yaml").state.redis.lease_share == 0.25
    for bad in ("    lease_share: 0%\n", "    lease_share: 150%\n", "    lease_time: 0s\n"):
        with pytest.raises(PolicyError) as err:
            parse_policy(base + bad, "p.yaml")
        assert "p.yaml:" in str(err.value) and "lease_" in str(err.value)


# --------------------------------------------------------------------------- a fleet sharing a Redis


class Ask:
    """The little of an Exchange the rate-limit layer reads: the tenant header, headers out, notes."""

    __slots__ = ("client", "request_headers", "response_headers")

    def __init__(self, tenant: bytes) -> None:
        self.client = "127.0.0.1"
        self.request_headers = [(b"x-tenant", tenant)]
        self.response_headers = []

    def note(self, text: str) -> None:
        pass


async def test_three_sidecars_sharing_300_per_second_even_and_skewed(
    redis_server, echo_upstream, start_fender
):
    """300/s (burst 300) per tenant for 10 s of Redis time over three sidecars, two tenants at once.

    Tenant "even" is offered ~2000 requests/s spread 1/3 each; tenant "skew" the same, 80/10/10.
    The decisions are the route's rate-limit layer itself, called directly so the offered load is
    exact and cheap; its Redis is real. Expected: 300 x T + burst, within 5 %.
    """
    rate, burst, seconds = 300, 300, 10.0
    text = limit_policy(
        echo_upstream.port, redis_server.url, f"{{rate: {rate}/s, key: header:X-Tenant, scope: global}}"
    )
    fleet = await start_fleet(start_fender, text)
    limits = [f.runtime.exposed["ratelimit"]["all"] for f in fleet]
    assert all(limit.leasing for limit in limits)
    shares = {b"even": (7, 7, 7), b"skew": (16, 2, 2)}  # requests per 10 ms tick, by sidecar
    admitted = {tenant: 0 for tenant in shares}
    offered = {tenant: 0 for tenant in shares}
    started = redis_time(redis_server)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def offer(tenant: bytes) -> None:
        weights = shares[tenant]
        pattern = [i for i, w in enumerate(weights) for _ in range(w)]
        for _ in range(2_000):  # ~20 per 10 ms tick: 2000/s; bounded in count and time
            if loop.time() >= deadline:
                return
            for i in pattern:
                offered[tenant] += 1
                if await limits[i].decide(Ask(tenant)) is None:
                    admitted[tenant] += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(offer(b"even"), offer(b"skew"))
    window = redis_time(redis_server) - started
    expected = rate * window + burst
    texts = [await get_metrics(f) for f in fleet]
    calls = sum(metric_value(t, "fender_redis_calls_total", op="ratelimit") for t in texts)
    print(
        f"leases, 300/s over {window:.2f} s (expected {expected:.0f}): even {admitted[b'even']} of "
        f"{offered[b'even']}, skewed {admitted[b'skew']} of {offered[b'skew']}; {calls:.0f} Redis calls"
    )
    for tenant in shares:
        assert offered[tenant] > 2 * expected  # really saturated
        assert abs(admitted[tenant] - expected) <= 0.05 * expected, tenant
    # Leasing is the point: far fewer Redis calls than decisions.
    assert calls < 0.25 * sum(offered.values())


async def test_a_sidecar_killed_holding_a_lease_costs_at_most_one_lease(
    redis_server, echo_upstream, start_fender, fender_process
):
    """A burst of 100 and no refill in the test's time; leases of at most 10 (10 % of the burst).

    Sidecar P (a real process) spends part of the burst, leasing ever larger batches, and is
    SIGKILLed; sidecar Q then takes what is left. What P took and never spent is at most one lease.
    """
    burst, max_lease = 100, 10
    port, admin = free_port(), free_port()
    text = limit_policy(
        echo_upstream.port,
        redis_server.url,
        f"{{rate: 1/h, burst: {burst}, key: route, scope: global}}",
        state_extra="    lease_time: 60s\n",
    )
    proc = fender_process(
        text.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}").replace(
            "admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}"
        )
    )
    proc.start(port)
    wait_port(admin)
    (q,) = await start_fleet(start_fender, text, n=1)
    by_p = by_q = 0
    async with httpx.AsyncClient() as client:
        for _ in range(37):  # P's leases grow to 10 tokens; 37 leaves part of one unspent
            assert (await client.get(f"http://127.0.0.1:{port}/p")).status_code == 200
            by_p += 1
        metrics = (await client.get(f"http://127.0.0.1:{admin}/metrics")).text
        granted = metric_value(metrics, "fender_ratelimit_lease_tokens_total", outcome="granted")
        assert granted > by_p  # P holds leased tokens it has not spent
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(timeout=10)
        for _ in range(2 * burst):  # bounded: the rest of the burst, then refusals
            status = (await client.get(q.url + "/q")).status_code
            if status != 200:
                assert status == 429
                break
            by_q += 1
    lost = burst - by_p - by_q
    print(f"killed sidecar: P admitted {by_p}, leased {granted:.0f}; Q admitted {by_q}; lost {lost}")
    assert 0 < lost <= max_lease  # what P held unspent: at most one lease
