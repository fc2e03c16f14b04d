"""Fleet mode on a Redis Cluster and behind Sentinel (issue 22); in both, the master killed mid-traffic.

Every server is a private redis-server on 127.0.0.1 (tests/support/redis_server.py): a cluster of
three masters with a replica each (joined with redis-cli --cluster create, cluster-node-timeout
1 s, every replica synced before the test starts: one that never synced refuses to fail over), and
one master, one replica and three sentinels. Marked ``redis_cluster``: ``make test`` runs them;
``pytest -m redis_cluster`` runs only them.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from proxy.config.loader import PolicyError, parse_policy
from tests.conftest import policy_text
from tests.support.fleet import HOST, drain_writes, prefix, start_fleet
from tests.support.metrics import get_metrics, metric_value
from tests.support.redis_server import redis_cluster_fixture, redis_sentinel_fixture  # noqa: F401

HOST_KEY = HOST["Host"].encode()  # cache keys start with the host
ROUTES = """
  - name: cached
    match: {path_prefix: /c}
    upstream: echo
    cache: {default_ttl: 60s}
  - name: limited
    match: {path_prefix: /l}
    upstream: echo
    rate_limit: [{rate: 1/h, burst: 20, key: route, scope: global}, {rate: 1000/s, name: fast, key: route, scope: global}]
  - name: per-user
    match: {path_prefix: /u}
    upstream: echo
    rate_limit: [{rate: 1/h, burst: 20, key: "header:x-user", scope: global}]
  - name: busy
    match: {path_prefix: /g}
    upstream: echo
    rate_limit: [{rate: 10000/s, burst: 1000, name: busy, key: "header:x-k", scope: global, exact: true}]
"""


def mode_policy(upstream_port: int, redis: str) -> str:
    # A generous timeout: a dead node refuses connections and a down cluster answers CLUSTERDOWN at
    # once, so the failovers here never wait for it; a tight one only makes the exact counts and hits
    # flaky on a loaded machine (a stalled event loop times the calls out: a miss, a local decision).
    return policy_text(upstream_port, routes=ROUTES) + (
        f"state:\n  backend: redis\n  redis:\n    key_prefix: '{prefix()}'\n    timeout: 2s\n"
        f"    open_for: 200ms\n{redis}"
    )


def cluster_yaml(cluster, extra: str = "") -> str:
    return f"    mode: cluster\n    nodes: [{', '.join(cluster.seeds[:2])}]\n{extra}"


def sentinel_yaml(setup) -> str:
    return (
        f"    mode: sentinel\n    sentinel: {{sentinels: [{', '.join(setup.addresses)}], "
        f"service_name: {setup.service}}}\n"
    )


def test_modes_are_validated_with_their_settings():
    base = policy_text(9) + "state:\n  backend: redis\n  redis:\n"
    for bad, says in (
        ("    mode: cluster\n", "needs nodes"),
        ("    mode: sentinel\n", "needs sentinel"),
        ("    nodes: ['10.0.0.1:6379']\n", "nodes is for mode: cluster"),
        ("    mode: cluster\n    nodes: ['10.0.0.1']\n", "is not host:port"),
        ("    mode: sentinel\n    sentinel: {sentinels: [], service_name: x}\n", "sentinels"),
        ("    pubsub: sharded\n", "pubsub is for mode: cluster"),
        ("    mode: cluster\n    nodes: ['10.0.0.1:6379']\n    pubsub: shard\n", "pubsub"),
    ):
        with pytest.raises(PolicyError) as err:
            parse_policy(base + bad, "p.yaml")
        assert "p.yaml:" in str(err.value) and says in str(err.value), str(err.value)
    policy = parse_policy(base + "    mode: cluster\n    nodes: ['10.0.0.1:6379', '[::1]:7000']\n", "p.yaml")
    assert policy.state.redis.nodes == ("10.0.0.1:6379", "[::1]:7000")


async def _traffic(fleet, client, stop: asyncio.Event, statuses: list[int]) -> None:
    """Cache misses and hits over the fleet until ``stop`` (bounded in count)."""
    for i in range(2000):
        if stop.is_set():
            return
        fender = fleet[i % len(fleet)]
        statuses.append((await client.get(fender.url + f"/c/{i % 40}")).status_code)
        await asyncio.sleep(0.005)


async def _shares_and_survives(fleet, client, kill, wait_recovered) -> None:
    a, b = fleet[0], fleet[1]
    # Sharing: stored via A, a hit via B; a global limit holds for the fleet (burst 20, two limits
    # of one route in one slot).
    assert "stored" in (await client.get(a.url + "/c/shared")).headers["cache-status"]
    await drain_writes(a)
    assert (await client.get(b.url + "/c/shared")).headers["cache-status"].startswith("fender; hit")
    statuses = [(await client.get(fleet[i % 2].url + "/l")).status_code for i in range(30)]
    assert statuses.count(200) == 20 and statuses.count(429) == 10
    # A master killed mid-traffic: no client request fails.
    stop = asyncio.Event()
    seen: list[int] = []
    task = asyncio.ensure_future(_traffic(fleet, client, stop, seen))
    try:
        async with asyncio.timeout(10):
            while len(seen) < 40:  # noqa: ASYNC110 - traffic before the kill
                await asyncio.sleep(0.01)
        before = len(seen)
        kill()
        await asyncio.to_thread(wait_recovered)
        async with asyncio.timeout(30):
            while len(seen) < before + 100:  # noqa: ASYNC110 - traffic through and after the failover
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task
    assert seen and set(seen) == {200}, sorted(set(seen))
    # Sharing resumes after the failover: stored via B, a hit via A (bounded retries while the
    # Redis breaker closes again).
    async with asyncio.timeout(15):
        for attempt in range(300):
            path = f"/c/after/{attempt}"
            await client.get(b.url + path)
            await drain_writes(b)
            a.runtime.exposed["cache"]["store"].delete(b"catalog.svc" + path.encode())
            if (await client.get(a.url + path)).headers["cache-status"].startswith("fender; hit"):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("sharing did not resume after the failover")


@pytest.mark.slow
@pytest.mark.redis_cluster
async def test_a_fleet_on_redis_cluster_shares_cache_limits_invalidations_and_purges(
    redis_cluster, echo_upstream, start_fender
):
    fleet = await start_fleet(start_fender, mode_policy(echo_upstream.port, cluster_yaml(redis_cluster)), n=2)
    state = fleet[0].runtime.exposed["state"]["redis"]
    # The cache keys spread over the slots (and masters) of the cluster.
    async with httpx.AsyncClient(headers=HOST) as client:
        for i in range(12):
            await client.get(fleet[0].url + f"/c/spread/{i}")
        await drain_writes(fleet[0])
        masters = {
            redis_cluster.master_of(state.cache_key(b"catalog.svc/c/spread/%d" % i)).port for i in range(12)
        }
        assert len(masters) >= 2
        # Invalidations reach the other sidecar through the cluster (sharded pub/sub: Redis 7).
        assert state.sharded
        await client.get(fleet[1].url + "/c/spread/0")
        deleted = await client.delete(fleet[0].url + "/c/spread/0")
        assert deleted.status_code == 200
        async with asyncio.timeout(5):
            await fleet[1].runtime.exposed["state"]["redis"].wait_received(1)
        # pubsub: plain, on the same cluster: PUBLISH, which the cluster bus copies to every node.
        plain = await start_fleet(
            start_fender,
            mode_policy(echo_upstream.port, cluster_yaml(redis_cluster, "    pubsub: plain\n")),
            n=2,
        )
        plain_state = plain[0].runtime.exposed["state"]["redis"]
        assert not plain_state.sharded
        assert (
            sum(
                shard_subscribers(n, plain_state.shard_channels[plain_state.channel])
                for n in redis_cluster.nodes
            )
            == 0
        )
        await client.get(plain[1].url + "/c/plain")
        assert (await client.delete(plain[0].url + "/c/plain")).status_code == 200
        async with asyncio.timeout(5):
            await plain[1].runtime.exposed["state"]["redis"].wait_received(1)
        assert metric_value(await get_metrics(plain[0]), "fender_redis_pubsub", mode="plain") == 1
        # Sharing and a global limit whose two buckets sit in one slot (hash-tagged by route).
        assert "stored" in (await client.get(fleet[0].url + "/c/shared")).headers["cache-status"]
        await drain_writes(fleet[0])
        assert (
            (await client.get(fleet[1].url + "/c/shared")).headers["cache-status"].startswith("fender; hit")
        )
        statuses = [(await client.get(fleet[i % 2].url + "/l")).status_code for i in range(30)]
        assert statuses.count(200) == 20 and statuses.count(429) == 10
        # Purge by tag and by prefix reach the other sidecar and the cluster's L2.
        answer = await client.post(fleet[0].admin_url + "/admin/cache/purge", json={"prefix": "/c/spread/"})
        assert answer.json()["fleet"] is True and answer.json()["fleet_purged"] == 11
        async with asyncio.timeout(5):  # the purge reached the other sidecar (its sharded channel)
            await fleet[1].runtime.exposed["state"]["redis"].wait_purges(1)
        # A manual failover of the channels' slot (CLUSTER FAILOVER on its replica; no node dies): Redis
        # ends the shard subscriptions with SUNSUBSCRIBE, and both sidecars subscribe on the new master.
        states = [f.runtime.exposed["state"]["redis"] for f in fleet]
        channel = state.shard_channels[state.channel]
        owner = redis_cluster.master_of(channel)
        ranges = redis_cluster.ranges_of(owner)
        counts = [s.subscriptions for s in states]
        assert redis_cluster.replica_of(owner).command("CLUSTER", "FAILOVER") == b"+OK\r\n"
        promoted = await asyncio.to_thread(redis_cluster.wait_promoted, owner, ranges, 15)
        async with asyncio.timeout(10):
            for s, count in zip(states, counts, strict=True):
                await s.wait_subscriptions(count + 1)
        await _until(
            lambda: asyncio.to_thread(lambda: shard_subscribers(promoted, channel) == 2),
            10,
            "both sidecars subscribed on the new master",
        )
        assert shard_subscribers(owner, channel) == 0
        received = states[1].received
        await client.get(fleet[1].url + "/c/moved")

        async def invalidated():
            await client.delete(fleet[0].url + "/c/moved")
            return states[1].received > received

        await _until(invalidated, 10, "an invalidation after the manual failover")
        for i in range(1, 12):
            assert (
                redis_cluster.master_of(state.cache_key(b"catalog.svc/c/spread/%d" % i)).command(
                    "EXISTS", state.cache_key(b"catalog.svc/c/spread/%d" % i)
                )
                == b":0\r\n"
            )


@pytest.mark.slow
@pytest.mark.redis_cluster
async def test_a_fleet_behind_sentinel_follows_a_master_failover(redis_sentinel, echo_upstream, start_fender):
    fleet = await start_fleet(
        start_fender, mode_policy(echo_upstream.port, sentinel_yaml(redis_sentinel)), n=2
    )
    old = redis_sentinel.master_port()
    assert old == redis_sentinel.master.port

    def promoted() -> None:
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis_sentinel.master_port() != old:
                    return
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the sentinels did not promote the replica")

    async with httpx.AsyncClient(headers=HOST) as client:
        await _shares_and_survives(fleet, client, redis_sentinel.master.stop, promoted)
    assert redis_sentinel.master_port() == redis_sentinel.replica.port


# --------------------------------------------------------------------------- a Cluster master killed


def shard_subscribers(node, channel: bytes) -> int:
    """PUBSUB SHARDNUMSUB on one node: its sharded subscribers of ``channel``."""
    reply = node.command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply.rsplit(b":", 1)[1].split(b"\r\n")[0])


async def _busy_traffic(
    fleet, client, stop: asyncio.Event, seen: list[tuple[str, int, str]], k: str, new: list[str]
) -> None:
    """Cache misses (L2 read, fleet lock, L2 write), L1 hits and a global limit decided in Redis per
    request, over the fleet until ``stop`` (bounded in count); every answer's path is kept to check
    against the request's (a corrupted or mixed-up value would show there)."""
    for i in range(5000):
        if stop.is_set():
            return
        fender = fleet[i % len(fleet)]
        path = (new[i // 3 % len(new)], f"/c/busy/{i % 20}", "/g")[i % 3]
        answer = await client.get(fender.url + path, headers={"x-k": k})
        body = answer.json().get("path", "") if answer.status_code == 200 else ""
        seen.append((path, answer.status_code, body))
        await asyncio.sleep(0.004)


async def _until(check, timeout: float, what: str):
    """Bounded retries of ``check()`` (an async function returning a true value when done): its value."""
    async with asyncio.timeout(timeout):
        for _ in range(1000):
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout} s")


@pytest.mark.slow
@pytest.mark.redis_cluster
async def test_a_cluster_master_killed_mid_traffic_fails_no_request_and_sharing_resumes(
    redis_cluster, echo_upstream, start_fender
):
    fleet = await start_fleet(start_fender, mode_policy(echo_upstream.port, cluster_yaml(redis_cluster)), n=2)
    a, b = fleet
    states = [f.runtime.exposed["state"]["redis"] for f in fleet]
    channel = states[0].shard_channels[states[0].channel]
    # Sharded pub/sub: both sidecars subscribe on the one master serving the channels' slot, none on
    # the other masters, and nobody on the plain channel.
    assert all(s.sharded for s in states)
    victim = redis_cluster.master_of(channel)
    masters = [n for n in redis_cluster.nodes if redis_cluster.ranges_of(n)]
    assert {m.port: shard_subscribers(m, channel) for m in masters} == {
        m.port: 2 if m is victim else 0 for m in masters
    }
    assert all(m.command("PUBSUB", "NUMSUB", states[0].channel).endswith(b":0\r\n") for m in masters)
    assert metric_value(await get_metrics(a), "fender_redis_pubsub", mode="sharded") == 1
    # The limit's bucket (one script a request: exact) in one of the victim's slots, so that every
    # decision between the kill and the promotion meets a dead master (the metrics below check it).
    victim_ranges = redis_cluster.ranges_of(victim)

    from redis.crc import key_slot  # the client's own slot function (the redis extra)

    def on_victim(key: bytes) -> bool:
        return any(low <= key_slot(key) <= high for low, high in victim_ranges)

    k = next(f"k{i}" for i in range(300) if on_victim(states[0].prefix + b"rl:busy:busy:k%d" % i))
    # And the cache misses of the traffic (each an L2 read, a fleet lock and an L2 write) there too.
    new = [
        p
        for p in (f"/c/new/{i}" for i in range(3000))
        if on_victim(states[0].cache_key(HOST_KEY + p.encode()))
    ]

    async with httpx.AsyncClient(headers=HOST, timeout=10) as client:
        assert (await client.get(a.url + "/g", headers={"x-k": k})).status_code == 200
        # The master of the channels' slot killed mid-traffic; no client request fails meanwhile.
        stop = asyncio.Event()
        seen: list[tuple[str, int, str]] = []
        task = asyncio.ensure_future(_busy_traffic(fleet, client, stop, seen, k, new))
        try:
            async with asyncio.timeout(10):
                while len(seen) < 60:  # noqa: ASYNC110 - traffic before the kill
                    await asyncio.sleep(0.01)
            victim.stop()
            killed = time.monotonic()
            promoted = await asyncio.to_thread(redis_cluster.wait_promoted, victim, victim_ranges, 30)
            promoted_at = time.monotonic()
            failover = promoted_at - killed
            at_promotion = len(seen)
            async with asyncio.timeout(30):
                while len(seen) < at_promotion + 100:  # noqa: ASYNC110 - traffic after the failover
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task
        failed = [x for x in seen if x[1] != 200]
        assert not failed, failed[:5]
        assert all(body == path for path, _, body in seen), [x for x in seen if x[0] != x[2]][:5]
        # The outage was real: Redis calls of the cache and of the limit failed or were not attempted
        # (Fender's Redis breaker open): the cache was L1 only, the limit followed on_failure (local).
        for fender in fleet:
            text = await get_metrics(fender)
            for op in ("get", "ratelimit"):
                assert sum(
                    metric_value(text, "fender_redis_calls_total", op=op, outcome=outcome)
                    for outcome in ("error", "timeout", "rejected")
                ), (op, [line for line in text.splitlines() if line.startswith("fender_redis_calls_total")])

        # Sharing resumes after the failover (each check bounded; all within 20 s of the promotion,
        # the 100 requests of traffic after it included).
        # The subscription follows the slot to the promoted replica.
        async with asyncio.timeout(10):
            for state in states:
                await state.wait_subscriptions(2)
        await _until(
            lambda: asyncio.to_thread(lambda: shard_subscribers(promoted, channel) == 2),
            10,
            "both sidecars subscribed on the promoted master",
        )
        # An invalidation via A reaches B.
        await client.get(b.url + "/c/inv")
        received = states[1].received

        async def invalidated():
            await client.delete(a.url + "/c/inv")
            return states[1].received > received

        await _until(invalidated, 10, "an invalidation via A reached B")

        # An L2 hit via the other sidecar.
        attempt = iter(range(1000))

        async def shared():
            path = f"/c/after/{next(attempt)}"
            await client.get(b.url + path)
            await drain_writes(b)
            return (await client.get(a.url + path)).headers["cache-status"].startswith("fender; hit")

        await _until(shared, 10, "a response stored via B is a hit via A")

        # A global limit counted across the sidecars again: 20 of 30 admitted for a fresh key (with
        # each sidecar on its own, as while Redis was away, it would be 30).
        user = iter(range(1000))

        async def counted():
            headers = {"x-user": f"after-{next(user)}"}
            statuses = [
                (await client.get(fleet[i % 2].url + "/u", headers=headers)).status_code for i in range(30)
            ]
            assert set(statuses) <= {200, 429}, statuses
            return statuses.count(200) == 20

        await _until(counted, 10, "a global limit counted across the sidecars")
        print(
            f"cluster failover: promoted {failover:.2f} s after the kill; sharing resumed "
            f"{time.monotonic() - promoted_at:.2f} s after the promotion was seen; {len(seen)} requests, 0 failed"
        )
        assert time.monotonic() - promoted_at < 20
