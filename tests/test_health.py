"""Active health checks against real replicas: thresholds, failover and failback, black holes, shutdown.

The ManualClock tests step the probe tasks through time (one probe per replica
per step) while the probes themselves are real HTTP requests to RawUpstreams.
"""

from __future__ import annotations

import asyncio
import random

import httpx

from proxy.cluster.options import parse_status_ranges
from proxy.dataplane.runtime import Runtime
from proxy.metrics import Metrics
from proxy.upstream import ConnectFailure
from tests.support.health import SteppingClock, settle, step
from tests.support.picker import build, picks, policy_for, sample
from tests.support.raw_upstream import RawUpstream, hang, ok, status

CHECKS = "health_check: {{path: /healthz, interval: 1s, timeout: 300ms, jitter: 0%, healthy_threshold: {rise}, unhealthy_threshold: {fall}}}\n"


async def wait_for(predicate, within: float = 5.0) -> None:
    """Bounded wait for a condition that real I/O (probes over sockets in real time) makes true."""
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_thresholds_drive_priority_failover_and_failback():
    metrics = Metrics()
    async with RawUpstream(ok(b"up")) as primary, RawUpstream(ok(b"up")) as standby:
        up, clock = build(
            f"""
            replicas:
              - {{url: http://127.0.0.1:{primary.port}}}
              - {{url: http://127.0.0.1:{standby.port}, priority: 1}}
            """
            + CHECKS.format(rise=2, fall=3),
            SteppingClock(),
            metrics=metrics,
        )
        await up.start()
        try:
            await settle(up, clock)
            await step(up, clock)
            p = up.picker.state_of(f"127.0.0.1:{primary.port}")
            assert p.passes == 1 and p.last_result == "pass"
            assert picks(up, 3) == {primary.port: 3}

            primary.handler = status(503)
            await step(up, clock)
            await step(up, clock)
            assert p.fails == 2 and p.active_healthy  # two fails: below unhealthy_threshold
            assert picks(up, 3) == {primary.port: 3}
            await step(up, clock)
            assert not p.active_healthy  # third fail in a row: out, the standby takes over
            assert picks(up, 3) == {standby.port: 3}
            assert sample(metrics, "fender_upstream_active_priority", upstream="svc") == 1
            assert sample(metrics, "fender_replica_healthy", upstream="svc", replica=p.name) == 0

            primary.handler = ok(b"back")
            await step(up, clock)
            assert picks(up, 3) == {standby.port: 3}  # one pass is not enough
            await step(up, clock)
            assert picks(up, 3) == {primary.port: 3}  # healthy_threshold passes: failback
            assert up.picker.failovers_seen == [("0", "1"), ("1", "0")]
            checks = "fender_health_checks_total"
            assert sample(metrics, checks, upstream="svc", replica=p.name, result="fail") == 3
            assert sample(metrics, checks, upstream="svc", replica=p.name, result="pass") == 3
            s = f"127.0.0.1:{standby.port}"
            assert sample(metrics, checks, upstream="svc", replica=s, result="pass") == 6
            assert sample(metrics, "fender_health_check_duration_seconds_count", upstream="svc") == 12
            # Every probe was a real GET /healthz.
            assert {r.target for r in primary.requests} == {b"/healthz"}
            assert len(primary.requests) == 6
        finally:
            await up.close()


async def test_active_checks_return_an_ejected_replica_before_its_ejection_ends():
    async with RawUpstream(ok()) as a, RawUpstream(ok()) as b:
        up, clock = build(
            f"""
            replicas:
              - {{url: http://127.0.0.1:{a.port}}}
              - {{url: http://127.0.0.1:{b.port}}}
            outlier_detection: {{consecutive_failures: 1, ejection_time: 30s}}
            """
            + CHECKS.format(rise=2, fall=3),
            SteppingClock(),
        )
        await up.start()
        try:
            await settle(up, clock)
            up.observe(up.replicas[0], 0, ConnectFailure(), 0.0)
            assert picks(up, 4) == {b.port: 4}
            await step(up, clock)
            assert picks(up, 4) == {b.port: 4}  # one pass after the ejection: still out
            await step(up, clock)
            # Two passes in a row (healthy_threshold): back after ~2s instead of 30s.
            assert picks(up, 4) == {a.port: 2, b.port: 2}
            assert up.picker.state_of(f"127.0.0.1:{a.port}").ejections == 1
        finally:
            await up.close()


async def test_black_hole_is_found_by_the_health_check_and_taken_out(start_fender):
    async with RawUpstream(hang) as hole, RawUpstream(ok(b"fine")) as good:
        fender = await start_fender(
            policy_for(
                f"""
                replicas:
                  - {{url: http://127.0.0.1:{hole.port}}}
                  - {{url: http://127.0.0.1:{good.port}}}
                health_check: {{interval: 200ms, timeout: 100ms, unhealthy_threshold: 2}}
                """
            ).replace("{name: all, upstream: svc}", "{name: all, upstream: svc, timeout: 300ms}")
        )
        picker = fender.runtime.upstreams["svc"].picker
        hole_state = picker.state_of(f"127.0.0.1:{hole.port}")
        # Two probes time out (about 2 intervals): the black hole leaves rotation.
        await wait_for(lambda: not hole_state.active_healthy)
        assert hole_state.last_result == "timeout"
        served = len(hole.requests)
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(10):
                response = await client.get(fender.url + "/")
                assert response.status_code == 200 and response.text == "fine"
            view = (await client.get(fender.admin_url + "/admin/upstreams")).json()
        # Only probes reached the black hole, no client request.
        assert all(r.target == b"/healthz" for r in hole.requests[served:])
        replica = next(r for r in view["upstreams"]["svc"]["replicas"] if r["name"] == hole_state.name)
        assert replica["state"] == "unhealthy"
        assert replica["consecutive_fails"] >= 2
        assert replica["last_check"]["result"] == "timeout"


async def test_black_hole_is_ejected_by_per_try_timeouts_without_health_checks(start_fender):
    async with RawUpstream(hang) as hole, RawUpstream(ok(b"fine")) as good:
        fender = await start_fender(
            policy_for(
                f"""
                replicas:
                  - {{url: http://127.0.0.1:{hole.port}}}
                  - {{url: http://127.0.0.1:{good.port}}}
                outlier_detection: {{consecutive_failures: 1}}
                """
            ).replace("{name: all, upstream: svc}", "{name: all, upstream: svc, timeout: 200ms}")
        )
        async with httpx.AsyncClient(timeout=5) as client:
            statuses = [(await client.get(fender.url + "/")).status_code for _ in range(10)]
        assert statuses == [504] + [200] * 9
        assert len(hole.requests) == 1


async def test_jitter_spreads_probes_and_checks_stop_on_close():
    async with RawUpstream(ok()) as a, RawUpstream(ok()) as b:
        up, clock = build(
            f"""
            replicas:
              - {{url: http://127.0.0.1:{a.port}}}
              - {{url: http://127.0.0.1:{b.port}}}
            health_check: {{interval: 10s, timeout: 1s, jitter: 20%}}
            """,
            SteppingClock(),
        )
        checker = up.health
        checker._rng = random.Random(7)
        waits = [checker._wait() for _ in range(200)]
        assert all(8.0 <= w <= 12.0 for w in waits)
        assert len({round(w, 6) for w in waits}) > 150  # not a fixed beat
        await up.start()
        await settle(up, clock)
        # First probes land at different points of the first interval.
        wakeups = sorted(when for when, _, _ in clock._sleepers)
        assert wakeups[0] != wakeups[1] and all(clock.now() < w <= clock.now() + 2.0 for w in wakeups)
        tasks = list(checker._tasks)
        await up.close()
        assert all(t.done() for t in tasks) and clock.sleepers == 0
        clock.advance(60)
        await asyncio.sleep(0)
        assert a.requests == [] and b.requests == []


async def test_runtime_start_and_close_run_the_health_tasks():
    async with RawUpstream(ok()) as a:
        from proxy.config import parse_policy

        policy = parse_policy(
            policy_for(f"replicas: [{{url: http://127.0.0.1:{a.port}}}]\n" + CHECKS.format(rise=1, fall=1)),
            "t.yaml",
        )
        clock = SteppingClock()
        runtime = Runtime(policy, Metrics(), "t.yaml", clock)
        up = runtime.upstreams["svc"]
        assert up.clock is clock
        await runtime.start()
        await settle(up, clock)
        await step(up, clock)
        assert len(a.requests) == 1
        tasks = list(up.health._tasks)
        assert len(tasks) == 1
        await runtime.close()
        assert all(t.cancelled() for t in tasks) and clock.sleepers == 0


def test_status_ranges():
    assert parse_status_ranges((200, "204", "300-399")) == ((200, 200), (204, 204), (300, 399))
