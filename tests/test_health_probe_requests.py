"""Health checks with a method, a Host, extra headers and an expected body (issue 24): what the
probe sends and how its answer is judged, against real replicas; thresholds on the manual clock."""

from __future__ import annotations

import pytest

from proxy.cluster.options import MAX_EXPECT_BODY
from proxy.config import PolicyError, parse_policy
from proxy.metrics import Metrics
from tests.support.health import SteppingClock, settle, step
from tests.support.picker import build, picks, policy_for, sample
from tests.support.policyfile import at
from tests.support.raw_upstream import RawUpstream, ok, status


def checks(port: int, extra: str) -> str:
    return (
        f"replicas: [{{url: http://127.0.0.1:{port}}}]\n"
        f"health_check: {{path: /ready, interval: 1s, timeout: 500ms, jitter: 0%, {extra}}}\n"
    )


async def test_the_probe_sends_the_method_host_and_headers_configured():
    async with RawUpstream(ok(b"")) as replica:
        up, _ = build(
            checks(replica.port, 'method: OPTIONS, host: App.Internal:8000, headers: {X-Probe-Key: "k 1"}')
        )
        try:
            assert await up.health.probe(0) == "pass"
        finally:
            await up.close()
    sent = replica.requests[0]
    assert sent.method == b"OPTIONS" and sent.target == b"/ready"
    assert sent.header("host") == b"app.internal:8000"
    assert sent.header("x-probe-key") == b"k 1" and sent.header("user-agent") == b"fender-health-check"


async def test_defaults_are_get_and_the_replica_authority():
    async with RawUpstream(ok(b"")) as replica:
        up, _ = build(checks(replica.port, "healthy_threshold: 1"))
        try:
            assert await up.health.probe(0) == "pass"
        finally:
            await up.close()
    assert replica.requests[0].method == b"GET"
    assert replica.requests[0].header("host") == f"127.0.0.1:{replica.port}".encode()


@pytest.mark.parametrize(
    ("body", "result"),
    [
        (b'{"status": "ok", "db": "up"}', "pass"),
        (b'{"status": "degraded"}', "fail"),
        (b"x" * (MAX_EXPECT_BODY - 3) + b'"db": "up"', "fail"),  # beyond the first 64 KiB: not looked at
        (b"x" * (MAX_EXPECT_BODY - 20) + b'"db": "up"', "pass"),  # within it, across read chunks
    ],
)
async def test_expect_body_is_a_substring_of_the_first_64kib(body, result):
    async with RawUpstream(ok(body)) as replica:
        up, _ = build(checks(replica.port, 'expect_body: \'"db": "up"\''))
        try:
            assert await up.health.probe(0) == result
        finally:
            await up.close()


async def test_a_wrong_status_fails_whatever_the_body():
    async with RawUpstream(status(503, b'"db": "up"')) as replica:
        up, _ = build(checks(replica.port, 'expect_body: \'"db": "up"\''))
        try:
            assert await up.health.probe(0) == "fail"
        finally:
            await up.close()


async def test_a_replica_whose_body_lacks_the_text_leaves_rotation():
    metrics = Metrics()
    async with RawUpstream(ok(b"ready")) as primary, RawUpstream(ok(b"ready")) as standby:
        extra = "expect_body: ready, unhealthy_threshold: 2, healthy_threshold: 1"
        up, clock = build(
            f"replicas:\n  - {{url: http://127.0.0.1:{primary.port}}}\n"
            f"  - {{url: http://127.0.0.1:{standby.port}, priority: 1}}\n"
            f"health_check: {{path: /ready, interval: 1s, timeout: 500ms, jitter: 0%, {extra}}}\n",
            SteppingClock(),
            metrics=metrics,
        )
        await up.start()
        try:
            await settle(up, clock)
            await step(up, clock)
            assert picks(up, 2) == {primary.port: 2}
            primary.handler = ok(b"starting")  # 200, but not ready yet
            await step(up, clock)
            await step(up, clock)
            assert picks(up, 2) == {standby.port: 2}  # two failing probes: out
            name = f"127.0.0.1:{primary.port}"
            assert (
                sample(metrics, "fender_health_checks_total", upstream="svc", replica=name, result="fail")
                == 2
            )
            primary.handler = ok(b"ready")
            await step(up, clock)
            assert picks(up, 2) == {primary.port: 2}
        finally:
            await up.close()


@pytest.mark.parametrize(
    ("extra", "needle", "where", "says"),
    [
        ("method: POST", "POST", "health_check.method", "GET"),
        ("method: HEAD, expect_body: ok", "ok}", "health_check.expect_body", "HEAD gets none"),
        ("host: 'a b'", "'a b'", "health_check.host", "not a valid host"),
        ("host: 'app:99999'", "'app:99999'", "health_check.host", "port"),
        ("headers: {Host: x}", "x}", "health_check.headers.Host", "use health_check.host"),
        ("headers: {Content-Length: '5'}", "'5'", "health_check.headers.Content-Length", "frames"),
        ('headers: {X-A: "a\\r\\nX-B: b"}', '"a', "health_check.headers.X-A", "control characters"),
        ("headers: {'x a': b}", "'x a'", "health_check.headers", "not a valid header name"),
        ("expect_body: ''", "''", "health_check.expect_body", ""),
    ],
)
def test_bad_probe_settings_are_refused_at_their_place(extra, needle, where, says):
    text = policy_for(checks(9, extra))
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "drill.yaml")
    found = [str(issue) for issue in info.value.issues]
    assert len(found) == 1, found
    assert found[0].startswith(f"{at(text, needle)}: upstreams.svc.{where}"), found[0]
    assert says in found[0]
