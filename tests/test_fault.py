"""Fault injection (issue 24): the injector's choices with a seeded generator and the manual clock,
the layer in the upstream's place, and drills over real sockets (retries and the breaker meet an
injected abort as a real one; the admin API switches a drill; a reload keeps it)."""

# ruff: noqa: F811  (the fenders fixture comes from tests/support/policyfile.py)

from __future__ import annotations

import asyncio
import math
import random
import textwrap

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.cluster.upstream import UpstreamRuntime
from proxy.config import PolicyError, parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.chain import ORDER
from proxy.policies.context import LayerContext
from proxy.policies.fault.injector import NOTHING, FaultInjector
from proxy.policies.fault.layer import FaultReply, build_layer
from proxy.policies.fault.options import FaultOptions
from tests.support.metrics import metric_value
from tests.support.policyfile import at, fenders  # noqa: F401
from tests.support.procs import wait_until
from tests.support.raw_upstream import RawUpstream, ok, status

TOKEN = "fault-drill-token-0123456789abcdef"


def policy(port: int, route: str, top: str = "") -> str:
    return (
        textwrap.dedent(
            f"""\
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            reload: {{watch: false}}
            upstreams:
              up:
                replicas: [{{url: http://127.0.0.1:{port}}}]
            routes:
              - name: r
                upstream: up
            """
        )
        + textwrap.indent(textwrap.dedent(route).strip("\n") + "\n", "    ")
        + textwrap.dedent(top)
    )


def issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "drill.yaml")
    return [str(issue) for issue in info.value.issues]


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("section", "needle", "where", "says"),
    [
        ("fault: {abort: {status: 99}}", "99", "routes[0].fault.abort.status", "at least 200"),
        (
            "fault: {delay: {fixed: 100ms, percent: 150%}}",
            "150%",
            "routes[0].fault.delay.percent",
            "out of range",
        ),
        ("fault: {delay: {fixed: 2h}}", "2h", "routes[0].fault.delay.fixed", ""),
        ("fault: {max_active: 2}", "{max_active", "routes[0].fault", "needs a delay, an abort"),
        ("fault: {abort: {}, max_active: 0}", "0}", "routes[0].fault.max_active", ""),
        (
            "fault:\n  abort: {status: 503}\n  only_if_header: {'x fault': on}",
            "'x fault'",
            "routes[0].fault.only_if_header",
            "not a valid header name",
        ),
        ("fault: {delay: {percent: 10%}}", "delay", "routes[0].fault.delay.fixed", "required"),
        ("fault: {abort: {}, chaos: true}", "chaos", "routes[0].fault.chaos", ""),
    ],
)
def test_bad_fault_sections_are_refused_at_their_line_and_column(section, needle, where, says):
    text = policy(9, section)
    found = issues(text)
    assert len(found) == 1, found
    assert found[0].startswith(f"{at(text, needle)}: {where}"), found[0]
    assert says in found[0]


def test_fault_is_off_unless_configured_and_innermost():
    route = parse_policy(policy(9, "timeout: 1s")).routes[0]
    assert route.fault is None
    assert ORDER[-1][0] == "fault"  # around the forwarder: every other layer meets the fault as a real one
    options = parse_policy(policy(9, "fault: {abort: {}}")).routes[0].fault
    assert options.enabled and options.abort.status == 503 and options.abort.percent == 1.0


# --------------------------------------------------------------------------- the injector


def drill(text: str) -> FaultOptions:
    fault = parse_policy(policy(9, "fault: " + text)).routes[0].fault
    assert fault is not None
    return fault


def replayed(seed: int, tries: int, delay_share: float | None, abort_share: float | None) -> tuple[int, int]:
    """Delays and aborts a generator seeded so gives over ``tries``: the documented draw order."""
    rng = random.Random(seed)
    delays = aborts = 0
    for _ in range(tries):
        if delay_share is not None and rng.random() < delay_share:
            delays += 1
        if abort_share is not None and rng.random() < abort_share:
            aborts += 1
    return delays, aborts


def within_binomial(count: int, tries: int, share: float) -> bool:
    mean = tries * share
    return abs(count - mean) <= 5 * math.sqrt(tries * share * (1 - share))


@pytest.mark.parametrize("seed", [1, 7, 2024])
def test_percentages_give_exact_counts_for_a_seeded_generator(seed):
    injector = FaultInjector(
        "r", drill(f"{{delay: {{fixed: 300ms, percent: 10%}}, abort: {{percent: 5%}}, seed: {seed}}}")
    )
    tries = 20_000
    delays = aborts = both = 0
    for _ in range(tries):
        delay, abort = injector.choose()
        delays += delay is not None
        aborts += abort is not None
        both += delay is not None and abort is not None
    assert (delays, aborts) == replayed(seed, tries, 0.10, 0.05)
    assert within_binomial(delays, tries, 0.10) and within_binomial(aborts, tries, 0.05)
    assert within_binomial(both, tries, 0.005)  # independent draws: a try may be delayed and aborted


def test_zero_and_full_percent_and_header_scope():
    never = FaultInjector("r", drill("{abort: {percent: 0%}, seed: 3}"))
    assert all(never.choose() is NOTHING for _ in range(1000))
    always = FaultInjector("r", drill("{abort: {status: 429}, seed: 3}"))
    assert all(always.choose() == (None, 429) for _ in range(1000))
    scoped = FaultInjector("r", drill("{abort: {}, only_if_header: {X-Fender-Fault: 'on', x-team: a}}"))
    assert scoped.eligible([(b"x-team", b"a"), (b"x-fender-fault", b"on")])
    assert not scoped.eligible([(b"x-fender-fault", b"on")])
    assert not scoped.eligible([(b"x-fender-fault", b"ON"), (b"x-team", b"a")])  # values match exactly
    assert FaultInjector("r", drill("{abort: {}}")).eligible([])


def test_change_and_reset_keep_the_file_settings_apart():
    injector = FaultInjector("r", drill("{abort: {percent: 0%}, enabled: false, seed: 5}"))
    assert not injector.enabled
    injector.change(drill("{abort: {status: 502}, seed: 5}"), "admin API")
    assert injector.enabled and injector.choose() == (None, 502)
    snap = injector.snapshot()
    assert (
        snap["changed_by_admin"]
        and not snap["as_in_file"]
        and snap["abort"] == {"status": 502, "percent": "100%"}
    )
    injector.reset()
    assert (
        not injector.enabled
        and injector.snapshot()["as_in_file"]
        and not injector.snapshot()["changed_by_admin"]
    )


# --------------------------------------------------------------------------- the layer, manual clock


def layer_for(text: str, clock: ManualClock, next_handler, metrics: Metrics | None = None):
    parsed = parse_policy(policy(9, text))
    metrics = metrics or Metrics()
    upstream = UpstreamRuntime("up", parsed.upstreams["up"], metrics, clock)
    ctx = LayerContext(metrics, upstream, parsed, clock)
    handler = build_layer(parsed.routes[0], next_handler, ctx)
    return handler, ctx


def exchange(clock: ManualClock, headers=(), timeout: float = 15.0) -> Exchange:
    headers = list(headers)
    return Exchange(
        "GET", b"/", headers, b"h", b"", None, 0, b"id", "r", clock.now(),
        request_headers=headers, deadline=clock.now() + timeout,
    )  # fmt: skip


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


class Upstream:
    """The next handler: counts calls and answers 200 (a stand-in for the forwarder)."""

    def __init__(self, clock: ManualClock) -> None:
        self.calls = 0
        self.clock = clock
        self.try_timeouts: list[float | None] = []

    async def __call__(self, ex):
        self.calls += 1
        self.try_timeouts.append(ex.try_timeout)
        return LocalReply("no_route", status=200)  # any complete reply: the layer only passes it on


def test_a_route_without_fault_gets_no_layer():
    clock = ManualClock()
    handler, ctx = layer_for("timeout: 1s", clock, Upstream(clock))
    assert handler is None and "fault" not in ctx.exposed


async def test_delay_waits_on_the_clock_then_forwards_with_less_try_time():
    clock = ManualClock()
    upstream = Upstream(clock)
    metrics = Metrics()
    handler, ctx = layer_for("fault: {delay: {fixed: 300ms}}", clock, upstream, metrics)
    ex = exchange(clock)
    ex.trace = []
    ex.try_timeout = 1.0
    task = asyncio.create_task(handler(ex))
    await settle()
    injector = ctx.exposed["fault"]["r"]
    assert upstream.calls == 0 and injector.active == 1 and clock.sleepers == 1
    clock.advance(0.299)
    await settle()
    assert upstream.calls == 0
    clock.advance(0.001)
    reply = await task
    assert reply.status == 200 and upstream.calls == 1 and injector.active == 0
    assert upstream.try_timeouts == [pytest.approx(0.7)] and ex.try_timeout == 1.0  # restored after the try
    assert ex.trace == ["fault delay 300ms"]
    assert metrics.faults_injected.labels("r", "delay")._value.get() == 1


async def test_a_delay_past_the_try_time_ends_as_a_timeout():
    clock = ManualClock()
    upstream = Upstream(clock)
    handler, _ = layer_for("fault: {delay: {fixed: 5s}}", clock, upstream)
    ex = exchange(clock, timeout=2.0)
    ex.try_timeout = 0.5
    task = asyncio.create_task(handler(ex))
    await settle()
    clock.advance(0.5)
    reply = await task
    assert isinstance(reply, LocalReply) and reply.reason == "timeout" and upstream.calls == 0


async def test_max_active_lets_the_extra_tries_through_unfaulted():
    clock = ManualClock()
    upstream = Upstream(clock)
    handler, ctx = layer_for("fault: {delay: {fixed: 1s}, max_active: 2}", clock, upstream)
    tasks = [asyncio.create_task(handler(exchange(clock))) for _ in range(5)]
    await settle()
    injector = ctx.exposed["fault"]["r"]
    assert injector.active == 2 and clock.sleepers == 2 and upstream.calls == 3
    assert injector.skipped == 3 and injector.injected["delay"] == 2
    clock.advance(1.0)
    await asyncio.gather(*tasks)
    assert upstream.calls == 5 and injector.active == 0


async def test_abort_answers_in_the_upstream_place_with_the_reason_header():
    clock = ManualClock()
    upstream = Upstream(clock)
    handler, ctx = layer_for("fault: {abort: {status: 500}, only_if_header: {x-drill: yes}}", clock, upstream)
    plain = await handler(exchange(clock))
    assert plain.status == 200 and upstream.calls == 1
    reply = await handler(exchange(clock, [(b"x-drill", b"yes")]))
    assert isinstance(reply, FaultReply) and not isinstance(reply, LocalReply)
    assert reply.status == 500 and (b"x-fender-error", b"fault_injected") in reply.headers
    body = await reply.read()
    assert body.startswith(b"fender: fault injected") and await reply.read() == b""
    assert upstream.calls == 1 and ctx.exposed["fault"]["r"].injected == {"delay": 0, "abort": 1}


# --------------------------------------------------------------------------- real sockets


async def test_retries_meet_an_injected_abort_as_a_real_503(fenders):
    route = """
        explain: true
        retry: {attempts: 3, backoff: {initial: 1ms, max: 2ms}}
        fault:
          abort: {status: 503}
          only_if_header: {x-fender-fault: "on"}
    """
    async with RawUpstream(ok(b"real")) as up:
        fender = await fenders(policy(up.port, route))
        async with httpx.AsyncClient(base_url=fender.url) as client:
            marked = await client.get("/x", headers={"x-fender-fault": "on"})
            plain = await client.get("/x")
            metrics = (await client.get(fender.admin_url + "/metrics")).text
    assert marked.status_code == 503 and marked.headers["x-fender-error"] == "fault_injected"
    trace = marked.headers["fender-trace"]
    assert trace.count("fault abort 503") == 3 and "retry 2 after 503" in trace
    assert plain.status_code == 200 and plain.text == "real" and "fault" not in plain.headers["fender-trace"]
    assert len(up.requests) == 1  # only the unmarked request reached the upstream
    assert metric_value(metrics, "fender_faults_injected_total", route="r", kind="abort") == 3
    assert metric_value(metrics, "fender_retries_total", route="r", reason="503") == 2


async def test_the_breaker_opens_on_injected_aborts(fenders):
    route = """
        circuit_breaker: {consecutive_failures: 3, minimum_calls: 100, open_for: 1h}
        fault: {abort: {status: 502}}
    """
    async with RawUpstream(ok()) as up:
        fender = await fenders(policy(up.port, route))
        async with httpx.AsyncClient(base_url=fender.url) as client:
            answers = [(await client.get("/")).headers["x-fender-error"] for _ in range(4)]
            breakers = (await client.get(fender.admin_url + "/admin/breakers")).json()["breakers"]
    assert answers == ["fault_injected"] * 3 + ["breaker_open"]
    assert [b["state"] for b in breakers] == ["open"] and up.requests == []


async def test_percent_over_real_sockets_matches_the_seeded_draws(fenders):
    seed, tries = 11, 300
    async with RawUpstream(ok()) as up:
        fender = await fenders(
            policy(up.port, f"fault: {{abort: {{status: 500, percent: 20%}}, seed: {seed}}}")
        )
        async with httpx.AsyncClient(base_url=fender.url) as client:
            statuses = [(await client.get("/")).status_code for _ in range(tries)]
    _, aborts = replayed(seed, tries, None, 0.20)
    assert statuses.count(500) == aborts and statuses.count(200) == tries - aborts
    assert len(up.requests) == tries - aborts and within_binomial(aborts, tries, 0.20)


async def test_a_delay_beyond_the_deadline_is_a_504_timeout(fenders):
    route = """
        timeout: 50ms
        fault: {delay: {fixed: 10s}}
    """
    async with RawUpstream(ok()) as up:
        fender = await fenders(policy(up.port, route))
        async with httpx.AsyncClient(base_url=fender.url) as client:
            reply = await client.get("/")
    assert reply.status_code == 504 and reply.headers["x-fender-error"] == "timeout" and up.requests == []


async def test_admin_api_switches_a_drill_and_a_reload_keeps_it(fenders, monkeypatch):
    monkeypatch.setenv("FENDER_TEST_FAULT_TOKEN", TOKEN)
    top = "admin_auth: {token_env: FENDER_TEST_FAULT_TOKEN}\n"
    armed = "fault: {abort: {status: 503}, enabled: false}"
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with RawUpstream(status(200, b"up")) as up:
        text = policy(up.port, armed, top)
        fender = await fenders(text)
        async with (
            httpx.AsyncClient(base_url=fender.admin_url) as admin,
            httpx.AsyncClient(base_url=fender.url) as data,
        ):
            assert (await data.get("/")).status_code == 200
            refused = await admin.post("/admin/routes/r/fault", json={"enabled": True})
            assert refused.status_code == 401
            on = await admin.post("/admin/routes/r/fault", json={"enabled": True}, headers=auth)
            assert on.status_code == 200 and on.json()["enabled"] and on.json()["changed_by_admin"]
            assert (await data.get("/")).headers["x-fender-error"] == "fault_injected"

            changed = await admin.post(
                "/admin/routes/r/fault", json={"abort": {"status": 429, "percent": "100%"}}, headers=auth
            )
            assert changed.status_code == 200 and changed.json()["abort"] == {
                "status": 429,
                "percent": "100%",
            }
            assert (await data.get("/")).status_code == 429

            bad = await admin.post("/admin/routes/r/fault", json={"abort": {"percent": "150%"}}, headers=auth)
            assert bad.status_code == 400 and bad.json()["problems"][0]["at"] == "abort.percent"
            unknown = await admin.post("/admin/routes/r/fault", json={"abort_now": True}, headers=auth)
            assert unknown.status_code == 400 and "abort_now" in unknown.json()["error"]
            assert (await admin.post("/admin/routes/r/fault", content=b"{", headers=auth)).status_code == 400
            assert (
                await admin.post("/admin/routes/nope/fault", json={"enabled": True}, headers=auth)
            ).status_code == 404
            assert (await data.get("/")).status_code == 429  # refused changes changed nothing

            status_page = (await admin.get("/admin/status", headers=auth)).json()
            fault = {r["name"]: r["fault"] for r in status_page["routes"]}["r"]
            assert fault["enabled"] and fault["summary"] == "abort 429 on 100%" and fault["injected"] == 3

            injector = fender.dataplane.runtime.exposed["fault"]["r"]
            await fenders.reload(
                fender, policy(up.port, armed + "\ntimeout: 14s", top)
            )  # other settings change
            assert fender.dataplane.runtime.exposed["fault"]["r"] is injector
            assert (await data.get("/")).status_code == 429  # the drill survived the reload

            await fenders.reload(fender, policy(up.port, armed.replace("503", "500"), top))
            assert fender.dataplane.runtime.exposed["fault"]["r"] is not injector
            assert (
                await data.get("/")
            ).status_code == 200  # changed section: the file's settings again (off)

            on = await admin.post("/admin/routes/r/fault", json={"enabled": True}, headers=auth)
            assert (await data.get("/")).status_code == 500
            reset = await admin.post("/admin/routes/r/fault", json={"reset": True}, headers=auth)
            assert reset.status_code == 200 and not reset.json()["enabled"]
            assert (await data.get("/")).status_code == 200
            listed = (await admin.get("/admin/faults", headers=auth)).json()["routes"]
            assert list(listed) == ["r"] and listed["r"]["injected"]["abort"] == 1


async def test_a_route_without_fault_section_is_not_switchable(fenders):
    async with RawUpstream(ok()) as up:
        fender = await fenders(policy(up.port, "timeout: 2s"))
        async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
            reply = await admin.post("/admin/routes/r/fault", json={"enabled": True})
            status_page = (await admin.get("/admin/status")).json()
    assert reply.status_code == 404 and "has no fault: section" in reply.json()["error"]
    assert status_page["routes"][0]["fault"] is None


@pytest.mark.slow
async def test_concurrent_delays_respect_max_active_over_sockets(fenders):
    # A delayed request runs its delay out even if its client leaves (as with a slow upstream), so
    # the delay is short enough to wait for and long enough for the third request to overlap it.
    route = "fault: {delay: {fixed: 3s}, max_active: 2}\ntimeout: 30s"
    async with RawUpstream(ok()) as up:
        fender = await fenders(policy(up.port, route))
        async with httpx.AsyncClient(base_url=fender.url, timeout=20) as client:
            slow = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
            injector = fender.dataplane.runtime.exposed["fault"]["r"]
            await wait_until(lambda: injector.active == 2, within=5, what=lambda: str(injector.snapshot()))
            fast = await client.get("/fast")  # over the cap: goes through unfaulted
            assert fast.status_code == 200 and injector.skipped == 1 and len(up.requests) == 1
            answers = await asyncio.gather(*slow)
    assert [a.status_code for a in answers] == [200, 200] and injector.active == 0
    assert injector.injected["delay"] == 2 and len(up.requests) == 3


@pytest.mark.slow
async def test_the_status_page_shows_a_drill_switched_on(fenders):
    from tests.support.status_browser import _need_browser

    _need_browser()
    from playwright.async_api import async_playwright

    from tests.support.status_browser import CHROMIUM_ARGS, chromium_path

    async with RawUpstream(ok()) as up:
        fender = await fenders(policy(up.port, "fault: {abort: {status: 503, percent: 50%}, enabled: false}"))
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.set_default_timeout(15_000)
                await page.goto(fender.admin_url + "/")
                cell = page.locator('tr[data-route="r"] td.fault')
                await cell.locator('[data-state="armed, off"]').wait_for()
                async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
                    assert (
                        await admin.post("/admin/routes/r/fault", json={"enabled": True})
                    ).status_code == 200
                await cell.locator('[data-state="injecting"]').wait_for()
                text = await cell.inner_text()
            finally:
                await browser.close()
    assert "abort 503 on 50%" in text and "set by admin" in text
