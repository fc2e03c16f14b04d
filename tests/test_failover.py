"""Replica picker: priorities, weights, balancing, outlier ejection, Retry-After pass-over, panic.

Unit tests drive the picker with a ManualClock through the real UpstreamRuntime
(pools are built but only the socket tests send anything); the socket tests run
a real Fender between httpx and RawUpstream replicas.
"""

from __future__ import annotations

import asyncio
import random
from email.utils import formatdate

import httpx
import pytest

from proxy.config import PolicyError, parse_policy
from proxy.kernel.exchange import Exchange
from proxy.kernel.reasons import MAX_RETRY_AFTER, parse_retry_after
from proxy.metrics import Metrics
from proxy.upstream import ConnectFailure, PoolOverflow, UpstreamTimeout
from tests.support.picker import build, picks, policy_for, sample
from tests.support.raw_upstream import RawUpstream, hang, ok, reset, status

# --------------------------------------------------------------------------- spreading


async def test_weighted_round_robin_exact_counts_and_smooth_interleaving():
    up, _ = build(
        """
        replicas:
          - {url: http://127.0.0.1:9001, weight: 3}
          - {url: http://127.0.0.1:9002, weight: 1}
          - {url: http://127.0.0.1:9003, weight: 2}
          - {url: http://127.0.0.1:9009, priority: 1, weight: 5}
        """
    )
    counts = picks(up, 600)
    # 600 picks = 100 periods of 6: exactly proportional; the standby gets nothing.
    assert counts == {9001: 300, 9002: 100, 9003: 200}
    order = [up.choose(None).port for _ in range(6)]
    # Smooth: the heavy replica never takes 3 tries in a row.
    assert all(order[i] != order[i + 1] or order[i] != order[i + 2] for i in range(4))


async def test_weights_are_reduced_by_their_gcd_so_the_period_stays_short():
    up, _ = build(
        """
        replicas:
          - {url: http://127.0.0.1:9001, weight: 1000}
          - {url: http://127.0.0.1:9002, weight: 500}
        """
    )
    assert len(up.picker._plan.order) == 3
    assert picks(up, 300) == {9001: 200, 9002: 100}


@pytest.mark.parametrize("balance", ["random", "least_request"])
async def test_random_draws_follow_weights_chi_square(balance):
    # least_request with no load in flight: the first of the two draws wins, so shares follow weights.
    up, _ = build(
        f"""
        balance: {balance}
        replicas:
          - {{url: http://127.0.0.1:9001, weight: 1}}
          - {{url: http://127.0.0.1:9002, weight: 2}}
          - {{url: http://127.0.0.1:9003, weight: 5}}
        """
    )
    up.picker._rng = random.Random(12345)  # a fixed draw sequence: no flakes
    n = 8000
    counts = picks(up, n)
    expected = {9001: n / 8, 9002: n * 2 / 8, 9003: n * 5 / 8}
    chi2 = sum((counts[p] - e) ** 2 / e for p, e in expected.items())
    # 2 degrees of freedom: P(chi2 > 13.82) = 0.001 for a correct sampler.
    assert chi2 < 13.82, (counts, chi2)


async def test_least_request_picks_the_less_loaded_of_two(start_fender):
    async with RawUpstream(hang) as slow, RawUpstream(ok(b"fast")) as fast:
        fender = await start_fender(
            policy_for(
                f"""
                balance: least_request
                replicas:
                  - {{url: http://127.0.0.1:{slow.port}}}
                  - {{url: http://127.0.0.1:{fast.port}}}
                """
            ).replace("{name: all, upstream: svc}", "{name: all, upstream: svc, timeout: 5s}")
        )
        async with httpx.AsyncClient(timeout=10) as client:
            stuck = []
            # Until one request sits on the black hole (ties go either way), bounded.
            for _ in range(20):
                task = asyncio.create_task(client.get(fender.url + "/"))
                await asyncio.wait([task], timeout=0.3)
                if not task.done():
                    stuck.append(task)
                    break
                assert task.result().status_code == 200
            assert stuck and len(slow.requests) == 1
            before = len(fast.requests)
            for _ in range(30):
                assert (await client.get(fender.url + "/")).status_code == 200
            # Two replicas: both are always the candidates, and the idle one always wins.
            assert len(fast.requests) == before + 30
            assert len(slow.requests) == 1
            stuck[0].cancel()


async def test_retry_avoids_tried_replicas_same_level_then_next_level():
    up, _ = build(
        """
        replicas:
          - {url: http://127.0.0.1:9001}
          - {url: http://127.0.0.1:9002}
          - {url: http://127.0.0.1:9009, priority: 1}
        """
    )
    p = up.picker
    for _ in range(10):
        assert p.choose(["127.0.0.1:9001"]).name == "127.0.0.1:9002"
        assert p.choose(["127.0.0.1:9002"]).name == "127.0.0.1:9001"
    assert p.choose(["127.0.0.1:9001", "127.0.0.1:9002"]).name == "127.0.0.1:9009"
    # Everything tried: a replica is still returned (the retry layer decides whether to go on).
    assert p.choose(["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9009"]) is not None
    # Through UpstreamRuntime.choose with a real exchange.
    ex = Exchange("GET", b"/", [], None, b"", None, None, b"id", "all", 0.0)
    ex.tried.append("127.0.0.1:9001")
    ex.tried.append("127.0.0.1:9002")
    assert up.choose(ex).port == 9009


# --------------------------------------------------------------------------- outlier ejection


OUTLIER = """
replicas:
  - {url: http://127.0.0.1:9001}
  - {url: http://127.0.0.1:9002}
outlier_detection: {consecutive_failures: 3, ejection_time: 10s, max_ejection_time: 25s}
"""


async def test_consecutive_failures_eject_and_success_resets_the_count():
    metrics = Metrics()
    up, clock = build(OUTLIER, metrics=metrics)
    a = up.replicas[0]
    up.observe(a, 0, ConnectFailure(), 0.0)
    up.observe(a, 502, None, 0.0)
    up.observe(a, 200, None, 0.0)  # a success in between: the count starts over
    up.observe(a, 0, UpstreamTimeout(), 0.0)
    up.observe(a, 503, None, 0.0)
    up.observe(a, 0, PoolOverflow(), 0.0)  # Fender's own limit: not the replica's fault
    assert picks(up, 10) == {9001: 5, 9002: 5}
    up.observe(a, 500, None, 0.0)
    assert picks(up, 10) == {9002: 10}
    assert sample(metrics, "fender_replica_ejections_total", upstream="svc", replica="127.0.0.1:9001") == 1
    assert sample(metrics, "fender_replica_healthy", upstream="svc", replica="127.0.0.1:9001") == 0
    clock.advance(9.9)
    assert picks(up, 4) == {9002: 4}
    clock.advance(0.1)
    assert picks(up, 4) == {9001: 2, 9002: 2}
    assert sample(metrics, "fender_replica_healthy", upstream="svc", replica="127.0.0.1:9001") == 1


async def test_ejection_time_grows_with_each_ejection_capped_and_decays():
    up, clock = build(OUTLIER)
    a = up.replicas[0]
    state = up.picker.state_of(a.name)

    def eject() -> float:
        for _ in range(3):
            up.observe(a, 0, ConnectFailure(), 0.0)
        return state.ejected_until - clock.now()

    assert eject() == 10  # 1 x ejection_time
    clock.advance(10)
    up.choose(None)
    assert eject() == 20  # 2 x
    clock.advance(20)
    up.choose(None)
    assert eject() == 25  # 3 x = 30, capped by max_ejection_time
    clock.advance(25)
    up.choose(None)
    # 20s back in rotation = two ejection_times of calm: the multiplier steps down from 3 to 1.
    clock.advance(20)
    assert eject() == 20
    assert state.ejections == 4


async def test_max_ejected_caps_a_level_and_at_least_one_may_go():
    up, _ = build(
        """
        replicas:
          - {url: http://127.0.0.1:9001}
          - {url: http://127.0.0.1:9002}
          - {url: http://127.0.0.1:9003}
          - {url: http://127.0.0.1:9004}
          - {url: http://127.0.0.1:9009, priority: 1}
        outlier_detection: {consecutive_failures: 1, max_ejected: 50%}
        panic_threshold: 0%
        """
    )
    for replica in up.replicas[:4]:
        up.observe(replica, 0, ConnectFailure(), 0.0)
    ejected = [s.name for s in up.picker.states if s.is_ejected()]
    assert ejected == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert set(picks(up, 20)) == {9003, 9004}
    # The one-replica standby level may lose its only replica (at least one).
    up.observe(up.replicas[4], 0, ConnectFailure(), 0.0)
    assert up.picker.state_of("127.0.0.1:9009").is_ejected()


async def test_active_passive_failover_by_ejection_and_failback_after_ejection():
    metrics = Metrics()
    up, clock = build(
        """
        replicas:
          - {url: http://127.0.0.1:9001}
          - {url: http://127.0.0.1:9009, priority: 1}
        outlier_detection: {consecutive_failures: 2, ejection_time: 5s}
        """,
        metrics=metrics,
    )
    assert sample(metrics, "fender_upstream_active_priority", upstream="svc") == 0
    primary = up.replicas[0]
    up.observe(primary, 0, ConnectFailure(), 0.0)
    up.observe(primary, 0, ConnectFailure(), 0.0)
    # The next try goes to the standby at once: no waiting on the dead primary.
    assert picks(up, 5) == {9009: 5}
    assert sample(metrics, "fender_upstream_active_priority", upstream="svc") == 1
    assert sample(metrics, "fender_failovers_total", upstream="svc", from_level="0", to_level="1") == 1
    clock.advance(5)
    assert picks(up, 5) == {9001: 5}
    assert sample(metrics, "fender_failovers_total", upstream="svc", from_level="1", to_level="0") == 1
    assert up.picker.failovers_seen == [("0", "1"), ("1", "0")]


# --------------------------------------------------------------------------- panic


async def test_panic_spreads_over_all_replicas_when_too_few_are_healthy():
    metrics = Metrics()
    up, _ = build(
        """
        replicas:
          - {url: http://127.0.0.1:9001}
          - {url: http://127.0.0.1:9002}
          - {url: http://127.0.0.1:9003}
          - {url: http://127.0.0.1:9004}
        outlier_detection: {consecutive_failures: 1, max_ejected: 100%}
        panic_threshold: 50%
        """,
        metrics=metrics,
    )
    up.observe(up.replicas[0], 0, ConnectFailure(), 0.0)
    up.observe(up.replicas[1], 0, ConnectFailure(), 0.0)
    # 2 of 4 eligible = 50%: not below the threshold, the healthy two serve.
    assert picks(up, 8) == {9003: 4, 9004: 4}
    up.observe(up.replicas[2], 0, ConnectFailure(), 0.0)
    # 1 of 4 = 25% < 50%: panic, all four share the traffic rather than one taking it all.
    assert picks(up, 8) == {9001: 2, 9002: 2, 9003: 2, 9004: 2}
    assert up.picker.active_label == "panic"
    assert sample(metrics, "fender_upstream_panic", upstream="svc") == 1
    assert sample(metrics, "fender_upstream_active_priority", upstream="svc") == -1


async def test_no_panic_means_none_when_no_replica_is_eligible():
    up, _ = build(
        """
        replicas: [{url: http://127.0.0.1:9001}]
        outlier_detection: {consecutive_failures: 1}
        panic_threshold: 0%
        """
    )
    up.observe(up.replicas[0], 0, ConnectFailure(), 0.0)
    assert up.choose(None) is None
    assert up.picker.active_label == "none"


async def test_no_healthy_replica_is_a_503_with_reason_at_once(start_fender):
    async with RawUpstream(reset) as dead:
        fender = await start_fender(
            policy_for(
                f"""
                replicas: [{{url: http://127.0.0.1:{dead.port}}}]
                outlier_detection: {{consecutive_failures: 1, ejection_time: 60s}}
                panic_threshold: 0%
                """
            )
        )
        async with httpx.AsyncClient(timeout=5) as client:
            first = await client.get(fender.url + "/")
            assert first.status_code == 502
            for _ in range(3):
                response = await client.get(fender.url + "/")
                assert response.status_code == 503
                assert response.headers["x-fender-error"] == "no_healthy_replica"
                assert response.headers["retry-after"] == "1"
        assert len(dead.requests) == 1


# --------------------------------------------------------------------------- overload (Retry-After)


def test_parse_retry_after():
    assert parse_retry_after(b"5") == 5.0
    assert parse_retry_after(b" 120 ") == 120.0
    assert parse_retry_after(b"soon") is None
    assert parse_retry_after(b"-3") is None
    date = formatdate(1_000_030, usegmt=True).encode()
    assert parse_retry_after(date, wall_now=1_000_000) == 30.0
    assert parse_retry_after(date, wall_now=1_000_100) == 0.0


async def test_retry_after_passes_a_replica_over_for_that_long_bounded():
    up, clock = build(
        """
        replicas:
          - {url: http://127.0.0.1:9001}
          - {url: http://127.0.0.1:9002}
        """
    )
    a = up.picker.state_of("127.0.0.1:9001")
    up.picker.overloaded(a, b"3")
    assert picks(up, 6) == {9002: 6}
    assert up.picker.snapshot()["replicas"][0]["state"] == "overloaded"
    clock.advance(3)
    assert picks(up, 6) == {9001: 3, 9002: 3}
    # A longer Retry-After while passed over extends the pass-over.
    up.picker.overloaded(a, b"2")
    up.picker.overloaded(a, b"8")
    clock.advance(2)
    assert picks(up, 4) == {9002: 4}
    clock.advance(6)
    assert picks(up, 4) == {9001: 2, 9002: 2}
    up.picker.overloaded(a, b"86400")
    assert a.overloaded_until - clock.now() == MAX_RETRY_AFTER
    clock.advance(MAX_RETRY_AFTER)
    assert picks(up, 2) == {9001: 1, 9002: 1}


async def test_429_with_retry_after_steers_real_traffic_away(start_fender):
    async with (
        RawUpstream(status(429, b"slow down", headers=[(b"retry-after", b"30")])) as busy,
        RawUpstream(ok(b"fine")) as calm,
    ):
        fender = await start_fender(
            policy_for(
                f"""
                replicas:
                  - {{url: http://127.0.0.1:{busy.port}}}
                  - {{url: http://127.0.0.1:{calm.port}}}
                """
            )
        )
        async with httpx.AsyncClient(timeout=5) as client:
            statuses = [(await client.get(fender.url + "/")).status_code for _ in range(12)]
        # Round robin starts at the busy replica: one 429 reaches the client, then it is passed over.
        assert statuses == [429] + [200] * 11
        assert len(busy.requests) == 1 and len(calm.requests) == 11


# --------------------------------------------------------------------------- real traffic, admin


async def test_passive_ejection_on_real_resets(start_fender):
    async with RawUpstream(reset) as bad, RawUpstream(ok(b"fine")) as good:
        fender = await start_fender(
            policy_for(
                f"""
                replicas:
                  - {{url: http://127.0.0.1:{bad.port}}}
                  - {{url: http://127.0.0.1:{good.port}}}
                outlier_detection: {{consecutive_failures: 2}}
                """
            )
        )
        async with httpx.AsyncClient(timeout=5) as client:
            statuses = [(await client.get(fender.url + "/")).status_code for _ in range(20)]
            # bad, good, bad (ejected now), then good only.
            assert statuses == [502, 200, 502] + [200] * 17
            assert len(bad.requests) == 2
            view = (await client.get(fender.admin_url + "/admin/upstreams")).json()
            metrics = (await client.get(fender.admin_url + "/metrics")).text
        replicas = {r["name"]: r for r in view["upstreams"]["svc"]["replicas"]}
        bad_view = replicas[f"127.0.0.1:{bad.port}"]
        assert bad_view["state"] == "ejected" and bad_view["ejections"] == 1
        assert 29 < bad_view["ejected_for_seconds"] <= 30
        assert replicas[f"127.0.0.1:{good.port}"]["state"] == "healthy"
        assert view["upstreams"]["svc"]["active_priority"] == 0
        assert (
            f'fender_replica_ejections_total{{replica="127.0.0.1:{bad.port}",upstream="svc"}} 1.0' in metrics
        )


# --------------------------------------------------------------------------- policy validation


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("balance: fastest", "balance"),
        ("outlier_detection: {ejection_time: 60s, max_ejection_time: 30s}", "max_ejection_time"),
        ("health_check: {interval: 1s, timeout: 2s}", "cannot exceed interval"),
        ('health_check: {expect_status: ["299-200"]}', "backwards"),
        ('health_check: {expect_status: ["2xx"]}', "not a status"),
        ("health_check: {path: healthz}", 'must start with "/"'),
        ("panic_threshold: 150%", "out of range"),
    ],
)
def test_policy_errors(section, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(policy_for("replicas: [{url: http://127.0.0.1:9001}]\n" + section + "\n"), "t.yaml")
    assert message in str(info.value)


async def test_overloaded_replica_is_passed_over_through_the_data_path(start_fender):
    """A replica answering 503 + Retry-After gets no traffic for that long; the other takes it all."""
    from tests.support.raw_upstream import RawUpstream, ok, status

    async with (
        RawUpstream(status(503, b"busy", headers=[("retry-after", "30")])) as busy,
        RawUpstream(ok(b"fine")) as fine,
    ):
        text = f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams:
  svc:
    replicas:
      - {{url: http://127.0.0.1:{busy.port}}}
      - {{url: http://127.0.0.1:{fine.port}}}
routes:
  - {{name: all, upstream: svc}}
"""
        fender = await start_fender(text)
        import httpx

        async with httpx.AsyncClient() as client:
            statuses = [(await client.get(fender.url + f"/{i}")).status_code for i in range(10)]
        # round robin sends at most the first request to the busy replica; after its 503 + Retry-After, none
        assert statuses.count(503) == len(busy.requests) == 1
        assert statuses.count(200) == 9 and len(fine.requests) == 9
