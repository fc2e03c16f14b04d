"""State that a reload carries over and a restart restores, for every policy module on main.

Reload: rate-limit buckets, bulkheads (slots and queue), breakers, the cache store and replica
health/ejections/pools survive a reload that leaves their settings alone. Restart: breaker
states and replica health/ejections come back from the checkpoint when the settings match.
"""

from __future__ import annotations

import asyncio
import json
import textwrap

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.config import load_policy
from proxy.server.fender import Fender, bind_socket
from tests.support.raw_upstream import RawUpstream, ok, status

TOKEN = "handover-test-token-0123456789"


async def until(predicate, within: float = 5.0, step: float = 0.01) -> None:
    """Bounded wait for state that has no event to wait on."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (polls runtime state, bounded by the timeout)
            await asyncio.sleep(step)


def policy(
    port: int, route: str = "", upstream: str = "", top: str = "", timeout: str = "15s", replicas: str = ""
) -> str:
    replicas = replicas or f"[{{url: http://127.0.0.1:{port}}}]"
    route = route.rstrip("\n") + "\n" if route else ""
    return (
        textwrap.dedent(
            f"""\
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            reload: {{watch: false}}
            drain: {{delay: 0s, timeout: 5s}}
            upstreams:
              up:
                replicas: {replicas}
            """
        )
        + textwrap.indent(textwrap.dedent(upstream), "    ")
        + textwrap.dedent(
            f"""\
            routes:
              - name: r
                upstream: up
                timeout: {timeout}
            """
        )
        + textwrap.indent(textwrap.dedent(route), "    ")
        + textwrap.dedent(top)
    )


@pytest.fixture
async def fenders(tmp_path):
    """``start(text, clock)`` runs a Fender on a policy file; ``reload(fender, text)`` applies a new one."""
    started: list[Fender] = []

    async def start(text: str, clock=None, name: str = "policy.yaml") -> Fender:
        path = tmp_path / name
        path.write_text(text)
        fender = Fender(load_policy(path), str(path), clock=clock or ManualClock())
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        fender.url = f"http://127.0.0.1:{fender.data_port}"
        fender.admin_url = f"http://127.0.0.1:{fender.admin_port}"
        fender.path = path
        started.append(fender)
        return fender

    async def stop(fender: Fender) -> None:
        started.remove(fender)
        await fender.stop()

    async def reload(fender: Fender, text: str) -> None:
        fender.path.write_text(text)
        attempt = await fender.reloader.reload("api")
        assert attempt.result == "applied", attempt.errors

    start.reload = reload
    start.stop = stop
    yield start
    for fender in started:
        await fender.stop()


async def test_rate_limit_buckets_survive_a_reload_that_keeps_the_limit(fenders):
    async with RawUpstream(ok(b"hi")) as up:
        limit = "rate_limit: {rate: 2/m, burst: 2, key: route}"
        fender = await fenders(policy(up.port, route=limit))
        bucket = fender.runtime.exposed["ratelimit"]["r"].limits[0].limiter
        async with httpx.AsyncClient(base_url=fender.url) as client:
            assert [(await client.get("/")).status_code for _ in range(3)] == [200, 200, 429]
            # Another route setting changes; the limit does not: the emptied bucket stays empty.
            await fenders.reload(fender, policy(up.port, route=limit, timeout="14s"))
            assert fender.runtime.exposed["ratelimit"]["r"].limits[0].limiter is bucket
            assert (await client.get("/")).status_code == 429
            # A changed limit starts with fresh (full) buckets.
            await fenders.reload(
                fender, policy(up.port, route="rate_limit: {rate: 3/m, burst: 3, key: route}")
            )
            assert (await client.get("/")).status_code == 200
        assert len(up.requests) == 3


async def test_bulkhead_slots_and_queue_hold_across_reloads(fenders):
    arrived, gate = asyncio.Event(), asyncio.Event()

    async def handler(req, conn):
        if req.target == b"/long":
            arrived.set()
            await gate.wait()
        await conn.send(200, (), b"done")

    async with RawUpstream(handler) as up:
        strict = "bulkhead: {max_concurrent: 1, max_queued: 0}"
        fender = await fenders(policy(up.port, route=strict))
        async with httpx.AsyncClient(base_url=fender.url, timeout=10) as client:
            first = asyncio.ensure_future(client.get("/long"))
            await asyncio.wait_for(arrived.wait(), 5)
            # Unchanged bulkhead: the same object, still full.
            await fenders.reload(fender, policy(up.port, route=strict, timeout="14s"))
            busy = await client.get("/other")
            assert busy.status_code == 503 and busy.headers["x-fender-error"] == "bulkhead_full"
            # Changed bulkhead (a queue now): it takes over the slot held by the old runtime's request,
            # so the new request waits instead of running next to it.
            queued = "bulkhead: {max_concurrent: 1, max_queued: 1, queue_timeout: 30s}"
            await fenders.reload(fender, policy(up.port, route=queued))
            bulkhead = fender.runtime.exposed["bulkhead"]["r"].bulkhead
            assert bulkhead.in_flight == 1
            second = asyncio.ensure_future(client.get("/second"))
            await until(lambda: bulkhead.queued == 1)
            assert len(up.requests) == 1 and not second.done()
            gate.set()  # the old runtime's request ends; its slot goes to the queued one
            assert (await first).status_code == 200
            assert (await second).status_code == 200
            assert [r.target for r in up.requests] == [b"/long", b"/second"]
            await until(lambda: bulkhead.in_flight == 0)
            assert (await client.get("/third")).status_code == 200


async def test_breaker_state_survives_a_reload_that_keeps_its_settings(fenders):
    async with RawUpstream(status(500)) as up:
        breaker = "circuit_breaker: {consecutive_failures: 1, open_for: 30s}"
        fender = await fenders(policy(up.port, route=breaker))
        async with httpx.AsyncClient(base_url=fender.url) as client:
            assert (await client.get("/")).status_code == 500
            assert (await client.get("/")).headers["x-fender-error"] == "breaker_open"
            await fenders.reload(fender, policy(up.port, route=breaker, timeout="14s"))
            reply = await client.get("/")
            assert reply.status_code == 503 and reply.headers["x-fender-error"] == "breaker_open"
            assert len(up.requests) == 1
            # Other breaker settings: a new, closed breaker.
            changed = "circuit_breaker: {consecutive_failures: 1, open_for: 20s}"
            await fenders.reload(fender, policy(up.port, route=changed))
            assert (await client.get("/")).status_code == 500
            assert len(up.requests) == 2


async def test_reload_giving_one_of_two_routes_other_breaker_settings(fenders):
    def text(port: int, open_for: str) -> str:
        # Both routes share the upstream's breaker until route s gets other settings.
        route_s = (
            "  - name: s\n"
            "    match: {path_prefix: /s}\n"
            "    upstream: up\n"
            f"    circuit_breaker: {{consecutive_failures: 1, open_for: {open_for}}}\n"
        )
        shared = policy(port, route="circuit_breaker: {consecutive_failures: 1, open_for: 30s}")
        return shared.replace("  - name: r\n", route_s + "  - name: r\n")  # s first: r takes every path

    async with RawUpstream(status(500)) as up:
        fender = await fenders(text(up.port, "30s"))
        async with httpx.AsyncClient(base_url=fender.url) as client:
            assert (await client.get("/")).status_code == 500  # the shared breaker opens
            # Route s gets its own settings: a new breaker next to the kept (open) one.
            await fenders.reload(fender, text(up.port, "20s"))
            assert (await client.get("/")).headers["x-fender-error"] == "breaker_open"
            assert (await client.get("/s")).status_code == 500
        assert len(up.requests) == 2


async def test_cache_store_survives_a_reload_and_is_resized(fenders):
    async with RawUpstream(ok(b"cached", headers=[("cache-control", "max-age=60")])) as up:
        fender = await fenders(policy(up.port, route="cache: {}"))
        store = fender.runtime.exposed["cache"]["store"]
        async with httpx.AsyncClient(base_url=fender.url) as client:
            assert (await client.get("/a")).content == b"cached"
            assert "hit" in (await client.get("/a")).headers["cache-status"]
            await fenders.reload(fender, policy(up.port, route="cache: {}", top="cache: {max_size: 32MiB}\n"))
            assert fender.runtime.exposed["cache"]["store"] is store and store.max_size == 32 * 1024 * 1024
            assert "hit" in (await client.get("/a")).headers["cache-status"]
            # A bound below what is stored evicts (least recently used first) instead of starting empty.
            tiny = "cache: {max_size: 1KiB, max_object_size: 1KiB}\n"
            await fenders.reload(fender, policy(up.port, route="cache: {}", top=tiny))
            assert fender.runtime.exposed["cache"]["store"] is store and store.bytes <= 1024
        assert len(up.requests) == 1


async def test_changed_upstream_keeps_replica_health_pools_and_stops_old_checks(fenders, echo_upstream):
    async with RawUpstream(status(500)) as bad:
        good_url, bad_url = f"http://127.0.0.1:{echo_upstream.port}", f"http://127.0.0.1:{bad.port}"

        def text(balance: str, pool: str = "") -> str:
            return policy(
                0,
                replicas=f"[{{url: {good_url}}}, {{url: {bad_url}}}]",
                upstream=f"""
                balance: {balance}
                panic_threshold: 0%
                outlier_detection: {{consecutive_failures: 1, ejection_time: 30s}}
                health_check: {{interval: 10s, timeout: 1s}}
                {pool}
                """,
            )

        fender = await fenders(text("round_robin"))
        async with httpx.AsyncClient(base_url=fender.url) as client:
            codes = sorted([(await client.get("/")).status_code for _ in range(2)])
            assert codes == [200, 500] and len(bad.requests) == 1  # the bad replica is now ejected
            old = fender.runtime.upstreams["up"]
            old_tasks = list(old.health._tasks)
            assert old_tasks
            good_pool = old.replicas[0].pool

            await fenders.reload(fender, text("least_request"))  # the upstream's settings changed
            new = fender.runtime.upstreams["up"]
            assert new is not old
            assert new.picker.state_of(f"127.0.0.1:{bad.port}").is_ejected()
            assert new.replicas[0].pool is good_pool  # same URL and pool settings: warm connections kept
            assert old.health._tasks == [] and all(task.done() for task in old_tasks)
            assert new.health._tasks
            assert [(await client.get("/")).status_code for _ in range(4)] == [200] * 4
            assert len(bad.requests) == 1

            await fenders.reload(fender, text("least_request", pool="pool: {max_connections: 50}"))
            newer = fender.runtime.upstreams["up"]
            assert newer.replicas[0].pool is not good_pool  # other pool settings: a new pool
            assert newer.picker.state_of(f"127.0.0.1:{bad.port}").is_ejected()
            assert (await client.get("/")).status_code == 200


def restart_policy(good: int, bad: int, state, open_for: str = "30s", ejection: str = "30s") -> str:
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        drain: {{delay: 0s, timeout: 5s}}
        checkpoint: {{path: "{state}", interval: 1h}}
        upstreams:
          flaky:
            replicas: [{{url: http://127.0.0.1:{bad}}}]
          ejecting:
            replicas: [{{url: http://127.0.0.1:{good}}}, {{url: http://127.0.0.1:{bad}}}]
            panic_threshold: 0%
            outlier_detection: {{consecutive_failures: 1, ejection_time: {ejection}}}
          checked:
            replicas: [{{url: http://127.0.0.1:{good}}}, {{url: http://127.0.0.1:{bad}}}]
            panic_threshold: 0%
            health_check: {{interval: 1s, timeout: 1s, jitter: 0%, unhealthy_threshold: 1}}
        routes:
          - name: b
            match: {{path_prefix: /b}}
            upstream: flaky
            circuit_breaker: {{consecutive_failures: 1, open_for: {open_for}}}
          - name: e
            match: {{path_prefix: /e}}
            upstream: ejecting
          - name: h
            match: {{path_prefix: /h}}
            upstream: checked
        """
    )


async def test_open_breaker_and_down_replicas_stay_so_across_a_restart(fenders, echo_upstream, tmp_path):
    async with RawUpstream(status(500)) as bad:
        state = tmp_path / "state.json"
        text = restart_policy(echo_upstream.port, bad.port, state)
        bad_name = f"127.0.0.1:{bad.port}"

        def calls(prefix: bytes) -> int:
            return sum(1 for r in bad.requests if r.target.startswith(prefix))

        clock = ManualClock()
        first = await fenders(text, clock)
        clock.advance(1.0)  # the first health probes run: the bad replica fails /healthz
        checked = first.runtime.upstreams["checked"].picker
        await until(lambda: not checked.state_of(bad_name).active_healthy)
        async with httpx.AsyncClient(base_url=first.url) as client:
            assert (await client.get("/b")).status_code == 500  # trips the breaker
            assert sorted([(await client.get("/e")).status_code for _ in range(2)]) == [200, 500]
        assert calls(b"/b") == 1 and calls(b"/e") == 1
        await fenders.stop(first)  # writes the checkpoint on the way out

        # Another process: a clock with another origin; the file carries wall-clock times.
        clock = ManualClock(start=50_000.0)
        second = await fenders(text, clock)
        async with httpx.AsyncClient(base_url=second.url) as client:
            reply = await client.get("/b")
            assert reply.status_code == 503 and reply.headers["x-fender-error"] == "breaker_open"
            assert 1 <= int(reply.headers["retry-after"]) <= 30
            assert [(await client.get("/e")).status_code for _ in range(4)] == [200] * 4
            assert [(await client.get("/h")).status_code for _ in range(4)] == [200] * 4
            assert calls(b"/b") == 1 and calls(b"/e") == 1  # nothing reached the known-bad upstream
            upstreams = (await client.get(second.admin_url + "/admin/upstreams")).json()["upstreams"]
            states = {u: {r["name"]: r["state"] for r in v["replicas"]} for u, v in upstreams.items()}
            assert states["ejecting"][bad_name] == "ejected" and states["checked"][bad_name] == "unhealthy"
            clock.advance(30.0)  # open_for and the ejection run out on the new clock
            assert (await client.get("/b")).status_code == 500
            assert sorted([(await client.get("/e")).status_code for _ in range(2)]) == [200, 500]
            assert calls(b"/b") == 2 and calls(b"/e") == 2
        await fenders.stop(second)

        # Other breaker and ejection settings: their saved state does not apply.
        third = await fenders(
            restart_policy(echo_upstream.port, bad.port, state, "20s", "20s"), ManualClock()
        )
        assert third.metrics.registry.get_sample_value(
            "fender_checkpoint_restores_total", {"result": "restored"}
        )
        async with httpx.AsyncClient(base_url=third.url) as client:
            assert (await client.get("/b")).status_code == 500
            assert sorted([(await client.get("/e")).status_code for _ in range(2)]) == [200, 500]
        assert calls(b"/b") == 3 and calls(b"/e") == 3


async def test_every_mutating_admin_endpoint_needs_the_token(fenders, monkeypatch):
    monkeypatch.setenv("FENDER_HANDOVER_TOKEN", TOKEN)
    async with RawUpstream(status(500)) as up:
        text = policy(
            up.port,
            route="circuit_breaker: {consecutive_failures: 1, open_for: 30s}\ncache: {}",
            top="admin_auth: {token_env: FENDER_HANDOVER_TOKEN}\n",
        )
        fender = await fenders(text)
        mutating = [
            route.path.replace("{name}", "up").replace("{action}", "open")
            for route in fender.admin_app.routes
            if route.methods and {"POST", "PUT", "PATCH", "DELETE"} & set(route.methods)
        ]
        assert {"/admin/reload", "/admin/rollback", "/admin/checkpoint", "/admin/cache/purge"} <= set(
            mutating
        )
        assert "/admin/breakers/up/open" in mutating
        breaker = fender.runtime.exposed["breaker"]
        (only,) = breaker.values()
        async with httpx.AsyncClient(base_url=fender.admin_url) as client:
            for path in mutating:
                reply = await client.post(path)
                assert reply.status_code == 401, path
                assert reply.headers["www-authenticate"].startswith("Bearer"), path
            assert fender.reloader.last_attempt is None and only.state == 0  # nothing happened
            auth = {"authorization": f"Bearer {TOKEN}"}
            opened = await client.post("/admin/breakers/up/open", headers=auth)
            assert opened.status_code == 200 and opened.json()["state"] == "open"
            reset = await client.post("/admin/breakers/up/reset", headers=auth)
            assert reset.status_code == 200 and reset.json()["state"] == "closed"
            assert reset.json()["trips"] == 0
            # Every endpoint of every module on main is documented with its answers, not just a docstring.
            doc = (await client.get("/admin/openapi.json", headers=auth)).json()
            generic = [
                p
                for p, ops in doc["paths"].items()
                for op in ops.values()
                if op.get("x-fender-generic") and p.startswith("/admin/")  # the page's static files aside
            ]
            assert generic == []
            assert set(doc["paths"]) >= {
                "/admin/breakers/{name}/{action}",
                "/admin/ratelimits",
                "/admin/bulkheads",
            }


async def test_bulkhead_take_over_with_a_lowered_limit_and_a_cancelled_waiter():
    from proxy.policies.bulkhead.bulkhead import Bulkhead

    clock = ManualClock()
    old = Bulkhead(2, 5, 30.0, clock)
    assert old.try_acquire() and old.try_acquire()
    waiter = asyncio.ensure_future(old.acquire())
    await until(lambda: old.queued == 1)
    new = Bulkhead(1, 0, 30.0, clock)
    new.carry_over(old)
    assert new.in_flight == 0  # nothing moves while the new runtime is only built
    new.take_over()
    assert (new.in_flight, new.queued, old.in_flight, old.queued) == (2, 1, 0, 0)
    assert not old.try_acquire() and not new.try_acquire()  # the old object asks the new one
    waiter.cancel()  # a waiter moved to the new queue leaves it cleanly
    await asyncio.gather(waiter, return_exceptions=True)
    assert new.queued == 0
    old.release()  # an old request ends: 2 -> 1, still at the new limit of 1
    assert new.in_flight == 1 and not new.try_acquire()
    old.release()
    assert new.in_flight == 0 and old.try_acquire() and new.in_flight == 1


def test_breaker_checkpoint_restores_only_matching_settings_and_bounds_the_time_left():
    from proxy.policies.breaker.machine import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
    from proxy.policies.breaker.options import BreakerOptions

    options = BreakerOptions(open_for="10s", max_open_for="1m")
    clock = ManualClock()
    saved = CircuitBreaker("up", options, clock)
    saved.force("open")
    data = json.loads(json.dumps(saved.checkpoint_snapshot()))
    # A clock far ahead (a bad wall clock on the writer): never more than open_for left.
    far = dict(data, open_until=data["open_until"] + 3600)
    restored = CircuitBreaker("up", options, ManualClock(start=7.0))
    restored.checkpoint_restore(far)
    assert restored.state == OPEN and 0 < restored.retry_after() <= 10
    # Half-open: reopened with no time left, so the next call is a trial call.
    saved.clock.advance(10)
    assert saved.acquire() >= 0 and saved.state == HALF_OPEN
    half = CircuitBreaker("up", options, ManualClock())
    half.checkpoint_restore(json.loads(json.dumps(saved.checkpoint_snapshot())))
    assert half.state == OPEN and half.retry_after() == 0 and half.acquire() >= 0
    # Other settings: nothing restored.
    other = CircuitBreaker("up", BreakerOptions(open_for="5s"), ManualClock())
    other.checkpoint_restore(data)
    assert other.state == CLOSED
