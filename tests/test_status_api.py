"""The status page's server side: the page and its assets, GET /admin/status, the traffic history,
replica drain, and the admin token. The browser test is tests/test_status_page.py."""

from __future__ import annotations

import asyncio
import fnmatch
import tomllib
from pathlib import Path

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.cluster.options import FAIL
from proxy.metrics import LATENCY_BUCKETS
from proxy.ops.history import TrafficHistory, quantile
from tests.conftest import ROOT, policy_text


async def _until(predicate, steps: int = 200) -> None:
    """Let background tasks run (bounded) until ``predicate()`` holds."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def _tick(clock: ManualClock, history: TrafficHistory) -> None:
    """Advance the clock by one sampling interval and wait for the sampler's reading."""
    await _until(lambda: clock.sleepers >= 1)
    count = len(history.readings)
    last = history.readings[-1].at
    clock.advance(history.interval)
    await _until(lambda: len(history.readings) > count or history.readings[-1].at > last)


def _cumulative(counts: list[int]) -> list[float]:
    out, total = [], 0
    for c in counts:
        total += c
        out.append(float(total))
    return out


def test_quantile_interpolates_within_buckets_like_histogram_quantile():
    n = len(LATENCY_BUCKETS) + 1
    assert quantile(0.5, [0.0] * n) is None
    # 10 observations, all in the (0.001, 0.0025] bucket: the median is halfway through it.
    counts = [0] * n
    counts[LATENCY_BUCKETS.index(0.0025)] = 10
    assert quantile(0.5, _cumulative(counts)) == pytest.approx(0.001 + 0.0015 * 0.5)
    # 90 fast (<= 5ms) and 10 in (0.5, 1.0]: p50 is in the first bucket, p99 is 90% through the slow one.
    counts = [0] * n
    counts[LATENCY_BUCKETS.index(0.005)] = 90
    counts[LATENCY_BUCKETS.index(1.0)] = 10
    buckets = _cumulative(counts)
    assert quantile(0.5, buckets) == pytest.approx(0.0025 + 0.0025 * (50 / 90))
    assert quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 0.9)
    # Beyond the last finite bucket all that is known is that bound.
    counts = [0] * n
    counts[-1] = 3
    assert quantile(0.99, _cumulative(counts)) == LATENCY_BUCKETS[-1]


async def test_history_rates_over_the_last_minute_and_bounded_ring(start_fender, echo_upstream):
    clock = ManualClock()
    fender = await start_fender(policy_text(echo_upstream.port), clock=clock)
    # Fender's own sampler paces itself on real time; this one sleeps on the test clock to be stepped.
    await fender.history.stop()
    history = fender.history = TrafficHistory(fender.metrics, clock)
    history.start()
    assert len(history.readings) == 1  # the baseline taken at start
    async with httpx.AsyncClient(base_url=fender.url) as client:
        for _ in range(8):
            assert (await client.get("/ok")).status_code == 200
        for _ in range(2):
            assert (await client.get("/status/500")).status_code == 500
    await _tick(clock, history)
    async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
        doc = (await admin.get("/admin/status")).json()
    (route,) = doc["routes"]
    assert route["name"] == "all" and route["upstream"] == "echo"
    assert route["requests"] == 10
    assert route["window_seconds"] == 5.0
    assert route["rate_per_second"] == 2.0  # 10 requests over 5 s
    assert route["error_rate"] == 0.2
    assert 0 < route["p50_seconds"] <= route["p99_seconds"] <= LATENCY_BUCKETS[-1]
    assert route["history"] == {"rate_per_second": [2.0], "error_rate": [0.2]}

    # 13 more intervals (65 s): the summary covers the last 60 s only, the old requests drop out.
    for _ in range(13):
        await _tick(clock, history)
    async with httpx.AsyncClient(base_url=fender.url) as client:
        for _ in range(3):
            assert (await client.get("/ok")).status_code == 200
    summary = history.routes(["all"])["all"]
    assert summary["window_seconds"] == 60.0
    assert summary["requests"] == 3
    assert summary["rate_per_second"] == 0.05
    assert summary["error_rate"] == 0.0
    assert len(summary["history"]["rate_per_second"]) == 14

    # The ring keeps 5 minutes: 61 readings at 5 s, however long Fender runs.
    for _ in range(60):
        await _tick(clock, history)
    assert len(history.readings) == history.readings.maxlen == 61
    assert history.readings[-1].at - history.readings[0].at == 300.0
    assert len(history.routes(["all"])["all"]["history"]["rate_per_second"]) == 60


async def test_sampler_stops_with_fender(start_fender, echo_upstream):
    clock = ManualClock()
    fender = await start_fender(policy_text(echo_upstream.port), clock=clock)
    assert clock.sleepers == 0  # not among the test clock's sleepers (see TrafficHistory.ticker)
    assert fender.history._task is not None and not fender.history._task.done()
    await fender.history.stop()
    fender.history = TrafficHistory(fender.metrics, clock)
    fender.history.start()
    await _until(lambda: clock.sleepers == 1)
    await fender.stop()
    assert fender.history._task is None
    count = len(fender.history.readings)
    clock.advance(60)
    await asyncio.sleep(0)
    assert len(fender.history.readings) == count


async def test_page_and_assets_are_served_with_a_strict_policy(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
        page = await admin.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert '<script src="status.js" defer></script>' in page.text
        assert "https://" not in page.text and "http://" not in page.text  # nothing from elsewhere
        js = await admin.get("/status.js")
        css = await admin.get("/status.css")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "admin/status" in js.text and "innerHTML" not in js.text
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "@media (max-width: 700px)" in css.text


def test_page_files_ship_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["proxy"]
    static = ROOT / "proxy" / "admin" / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["status.css", "status.html", "status.js"]
    for name in names:
        relative = str(Path("admin/static") / name)
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


FAILOVER = """
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams:
  svc:
    replicas:
      - {{url: http://127.0.0.1:{a}, priority: 0}}
      - {{url: http://127.0.0.1:{b}, priority: 1}}
routes:
  - name: api
    upstream: svc
    circuit_breaker: {{consecutive_failures: 3}}
"""


@pytest.fixture
async def two_echoes():
    from tests.conftest import EchoUpstream, start_asgi, stop_asgi

    servers = []
    apps = []
    for _ in range(2):
        app = EchoUpstream()
        server, port = await start_asgi(app)
        app.port = port
        servers.append(server)
        apps.append(app)
    yield apps
    for server in servers:
        await stop_asgi(server)


async def test_status_document_gathers_upstreams_breakers_cache_policy(start_fender, two_echoes):
    a, b = two_echoes
    fender = await start_fender(FAILOVER.format(a=a.port, b=b.port))
    async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
        assert (await admin.post("/admin/breakers/svc/open")).status_code == 200
        doc = (await admin.get("/admin/status")).json()
    assert doc["poll_seconds"] == 2.0
    (upstream,) = doc["upstreams"]
    assert upstream["name"] == "svc" and upstream["active_priority"] == 0
    primary, standby = upstream["replicas"]
    assert (primary["priority"], primary["state"], primary["serving"]) == (0, "healthy", True)
    assert (standby["priority"], standby["state"], standby["serving"]) == (1, "healthy", False)
    assert primary["state_for_seconds"] >= 0 and primary["drained"] is False
    (breaker,) = doc["breakers"]
    assert breaker["name"] == "svc" and breaker["state"] == "open"
    assert 0 < breaker["open_seconds_left"] <= 30
    assert breaker["failure_rate"] is None  # no calls in the window yet
    assert doc["cache"]["enabled"] is False and doc["cache"]["hit_ratio"] is None
    policy = doc["policy"]
    assert policy["ok"] is True and policy["version"] == 1 and policy["rollback_available"] == 0


async def test_drain_moves_traffic_to_the_standby_and_undrain_brings_it_back(start_fender, two_echoes):
    a, b = two_echoes
    fender = await start_fender(FAILOVER.format(a=a.port, b=b.port))
    primary = f"127.0.0.1:{a.port}"
    async with (
        httpx.AsyncClient(base_url=fender.admin_url) as admin,
        httpx.AsyncClient(base_url=fender.url) as client,
    ):
        r = await admin.post(f"/admin/upstreams/svc/replicas/{primary}/drain")
        assert r.status_code == 200
        drained = r.json()
        assert drained["active_priority"] == 1
        assert [(x["drained"], x["serving"]) for x in drained["replicas"]] == [(True, False), (False, True)]
        for _ in range(4):
            assert (await client.get("/x")).status_code == 200
        assert len(a.requests) == 0 and len(b.requests) == 4
        r = await admin.post(f"/admin/upstreams/svc/replicas/{primary}/undrain")
        assert r.json()["active_priority"] == 0
        assert (await client.get("/y")).status_code == 200
        assert len(a.requests) == 1
        assert (await admin.post("/admin/upstreams/svc/replicas/nope:1/drain")).status_code == 404
        assert (await admin.post("/admin/upstreams/nope/replicas/{primary}/drain")).status_code == 404
        assert (await admin.post(f"/admin/upstreams/svc/replicas/{primary}/explode")).status_code == 404


async def test_status_data_and_actions_need_the_token_but_the_page_does_not(
    start_fender, echo_upstream, monkeypatch
):
    monkeypatch.setenv("FENDER_TEST_STATUS_TOKEN", "status-page-test-token-0123")
    text = policy_text(echo_upstream.port) + "admin_auth: {token_env: FENDER_TEST_STATUS_TOKEN}\n"
    fender = await start_fender(text)
    upstream = f"127.0.0.1:{echo_upstream.port}"
    async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
        assert (await admin.get("/")).status_code == 200
        assert (await admin.get("/status.js")).status_code == 200
        assert (await admin.get("/admin/status")).status_code == 401
        assert (await admin.post(f"/admin/upstreams/echo/replicas/{upstream}/drain")).status_code == 401
        auth = {"authorization": "Bearer status-page-test-token-0123"}
        assert (await admin.get("/admin/status", headers=auth)).status_code == 200
        r = await admin.post(f"/admin/upstreams/echo/replicas/{upstream}/drain", headers=auth)
        assert r.status_code == 200 and r.json()["replicas"][0]["drained"] is True


async def test_openapi_lists_the_status_endpoints(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
        paths = (await admin.get("/admin/openapi.json")).json()["paths"]
    assert "/admin/status" in paths and "get" in paths["/admin/status"]
    assert paths["/admin/status"]["get"]["security"] == [{"bearer": []}]
    assert "post" in paths["/admin/upstreams/{upstream}/replicas/{replica}/{action}"]
    assert "/" in paths and "security" not in paths["/"]["get"]


def test_a_drained_replica_stays_out_even_when_the_picker_panics():
    from proxy.cluster.upstream import UpstreamRuntime
    from proxy.config import parse_policy
    from proxy.metrics import Metrics

    text = """
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams:
  svc:
    replicas: [{url: http://127.0.0.1:1001}, {url: http://127.0.0.1:1002}, {url: http://127.0.0.1:1003}]
    panic_threshold: 50%
    health_check: {path: /healthz, interval: 1h, unhealthy_threshold: 1}
routes: [{name: all, upstream: svc}]
"""
    clock = ManualClock()
    policy = parse_policy(text, "test.yaml")
    up = UpstreamRuntime("svc", policy.upstreams["svc"], Metrics(), clock)
    picker = up.picker
    picker.set_drained("127.0.0.1:1001", True)
    assert {up.choose().port for _ in range(6)} == {1002, 1003}
    assert picker.state_of("127.0.0.1:1001").health == "healthy"  # drained is not a health state
    # 1002 fails its checks: one of three eligible is below 50%, so the picker panics,
    # spreading over every replica regardless of health, except the drained one.
    clock.advance(3)
    picker.record_check(1, FAIL, 0.01, clock.now())
    snapshot = picker.snapshot()
    assert snapshot["panic"] is True
    assert {up.choose().port for _ in range(6)} == {1002, 1003}
    failing = snapshot["replicas"][1]
    assert (failing["state"], failing["state_for_seconds"]) == ("unhealthy", 0.0)
    clock.advance(4)
    assert picker.snapshot()["replicas"][1]["state_for_seconds"] == 4.0
    assert picker.snapshot()["replicas"][2]["state_for_seconds"] == 7.0  # healthy since the start
    picker.set_drained("127.0.0.1:1001", False)
    assert 1001 in {up.choose().port for _ in range(6)}
