"""Slow start: a replica back in rotation ramps from 10% of its share to all of it (injected clock)."""

from __future__ import annotations

import math
import random

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.cluster.options import SLOW_START_FLOOR
from proxy.config import PolicyError, parse_policy
from proxy.metrics import Metrics
from proxy.upstream import ConnectFailure
from tests.conftest import policy_text
from tests.support.picker import build, picks, policy_for, sample
from tests.support.raw_upstream import RawUpstream

TWO = """
replicas:
  - {url: http://127.0.0.1:9001}
  - {url: http://127.0.0.1:9002}
slow_start: 30s
outlier_detection: {consecutive_failures: 1, ejection_time: 10s}
"""


def eject_first(up) -> None:
    up.observe(up.replicas[0], 0, ConnectFailure(), 0.0)


async def test_a_returning_replica_ramps_its_share_over_the_window():
    metrics = Metrics()
    up, clock = build(TWO, metrics=metrics)
    up.picker._rng = random.Random(30)
    eject_first(up)
    assert picks(up, 100) == {9002: 100}
    clock.advance(10)  # the ejection runs out: 9001 is back, at the start of its slow start
    per_slice = 2000
    shares = []
    for second in range(0, 30, 3):
        clock.advance(3 if second else 0)
        counts = picks(up, per_slice)
        share = counts[9001] / per_slice
        # Round robin gives it half the picks; it keeps max(10%, elapsed / 30s) of them.
        expected = 0.5 * max(SLOW_START_FLOOR, second / 30)
        spread = 4 * math.sqrt(expected * (1 - expected) / per_slice)  # four standard deviations
        assert abs(share - expected) <= spread, (second, share, expected)
        shares.append(share)
    assert shares[1:] == sorted(shares[1:])  # it grows (the first two slices are both at the floor)
    clock.advance(3)  # the window is over: plain round robin again, exactly
    assert picks(up, 1000) == {9001: 500, 9002: 500}
    assert sample(metrics, "fender_replica_slow_starts_total", upstream="svc", replica="127.0.0.1:9001") == 1
    assert sample(metrics, "fender_replica_slow_start_share", upstream="svc", replica="127.0.0.1:9001") == 1.0


async def test_without_slow_start_a_returning_replica_gets_its_full_share_at_once():
    up, clock = build(TWO.replace("slow_start: 30s\n", ""))
    eject_first(up)
    clock.advance(10)
    assert picks(up, 100) == {9001: 50, 9002: 50}


async def test_undrain_and_passing_health_checks_start_a_slow_start_too():
    up, clock = build(
        TWO + "health_check: {path: /h, interval: 1s, healthy_threshold: 2, unhealthy_threshold: 1}\n"
    )
    picker = up.picker
    picker.set_drained("127.0.0.1:9001", True)
    picker.set_drained("127.0.0.1:9001", False)
    state = picker.state_of("127.0.0.1:9001")
    assert picker.share_of(state) == SLOW_START_FLOOR
    clock.advance(15)
    assert picker.share_of(state) == 0.5
    clock.advance(15)
    assert picker.share_of(state) == 1.0
    b = picker.state_of("127.0.0.1:9002")
    picker.record_check(b.index, "fail", 0.001, clock.now())
    assert picker.share_of(b) == 1.0  # failing does not start anything
    picker.record_check(b.index, "pass", 0.001, clock.now())
    assert picker.share_of(b) == 1.0  # one pass of two: still unhealthy
    picker.record_check(b.index, "pass", 0.001, clock.now())
    assert picker.share_of(b) == SLOW_START_FLOOR
    snapshot = {r["name"]: r for r in picker.snapshot()["replicas"]}
    assert snapshot["127.0.0.1:9002"]["slow_start_share"] == SLOW_START_FLOOR
    assert snapshot["127.0.0.1:9001"]["slow_start_share"] is None
    assert picker.snapshot()["slow_start_seconds"] == 30


async def test_a_replica_new_in_a_reload_starts_slowly_and_the_others_keep_their_share():
    clock = ManualClock()
    old, _ = build(TWO, clock=clock)
    new, _ = build(
        TWO.replace(
            "  - {url: http://127.0.0.1:9002}\n",
            "  - {url: http://127.0.0.1:9002}\n  - {url: http://127.0.0.1:9003}\n",
        ),
        clock=clock,
    )
    new.carry_over(old)
    shares = {s.name: new.picker.share_of(s) for s in new.picker.states}
    assert shares == {"127.0.0.1:9001": 1.0, "127.0.0.1:9002": 1.0, "127.0.0.1:9003": SLOW_START_FLOOR}


@pytest.mark.parametrize("bad", ["0s", "2h", "soon", "30"])
def test_bad_slow_start_is_refused_with_file_and_line(bad):
    text = policy_for(TWO.replace("slow_start: 30s", f"slow_start: {bad}"))
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert "p.yaml:" in str(caught.value) and "slow_start" in str(caught.value)


async def test_real_sockets_an_undrained_replica_ramps_up(start_fender):
    seen = {"a": 0, "b": 0}

    def answer(name):
        async def handler(req, conn):
            seen[name] += 1
            await conn.send(200, [], name.encode())

        return handler

    async with RawUpstream(answer("a")) as a, RawUpstream(answer("b")) as b:
        upstreams = f"""
        pair:
          replicas: [{{url: "http://127.0.0.1:{a.port}"}}, {{url: "http://127.0.0.1:{b.port}"}}]
          slow_start: 30s
        """
        routes = "- name: r\n  upstream: pair\n  explain: true\n"
        clock = ManualClock()
        fender = await start_fender(policy_text(a.port, routes=routes, upstreams=upstreams), clock=clock)
        name = f"127.0.0.1:{a.port}"
        drain = f"{fender.admin_url}/admin/upstreams/pair/replicas/{name}/"
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.post(drain + "drain")).status_code == 200
            assert (await client.post(drain + "undrain")).status_code == 200
            traces = []
            for i in range(200):
                response = await client.get(fender.url + f"/{i}")
                traces.append(response.headers.get("fender-trace", ""))
            ramping = dict(seen)
            clock.advance(30)
            seen.update(a=0, b=0)
            for i in range(200):
                await client.get(fender.url + f"/{i}")
            metrics = (await client.get(fender.admin_url + "/metrics")).text
            status = (await client.get(fender.admin_url + "/admin/status")).json()
    # At 10% of its half, a gets about 10 of 200 (far from 100); after the window, exactly half.
    assert 0 < ramping["a"] < 40 and ramping["a"] + ramping["b"] == 200
    assert seen == {"a": 100, "b": 100}
    assert sum(f"slow start: {name} 10%" in t for t in traces) == 200
    assert f'fender_replica_slow_starts_total{{replica="{name}",upstream="pair"}} 1.0' in metrics
    (upstream,) = [u for u in status["upstreams"] if u["name"] == "pair"]
    assert upstream["slow_start_seconds"] == 30
