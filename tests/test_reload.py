"""Hot reload: validation before anything changes, atomic swap, hand-over, rollback, file watch."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.config import load_policy, parse_policy
from proxy.dataplane.runtime import Runtime
from proxy.kernel.handover import Handover
from proxy.metrics import Metrics
from proxy.server.fender import Fender, bind_socket
from tests.conftest import free_port, wait_port
from tests.support.raw_upstream import RawUpstream, ok


def policy(port: int, extra: str = "", timeout: str = "15s", pool: str = "", routes: str = "") -> str:
    return (
        textwrap.dedent(
            f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        upstreams:
          echo:
            replicas: [{{url: http://127.0.0.1:{port}}}]
            {pool}
        routes:
          - name: all
            upstream: echo
            timeout: {timeout}
        """
        )
        + textwrap.dedent(extra)
        + textwrap.indent(textwrap.dedent(routes), "  ")
    )


BAD = "upstreams:\n  echo:\n    replicas: [{url: http://127.0.0.1:1}]\nroutes:\n  - name: all\n    upstream: echo\n    timeout: 5\n"


async def until(predicate, within: float = 5.0, step: float = 0.02) -> None:
    """Bounded wait for a condition that has no event to wait on (e.g. a file poll)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (polls state with no event, bounded by the timeout)
            await asyncio.sleep(step)


@pytest.fixture
async def file_fender(tmp_path):
    started: list[Fender] = []

    async def start(text: str, clock=None) -> Fender:
        path = tmp_path / "policy.yaml"
        path.write_text(text)
        kwargs = {"clock": clock} if clock is not None else {}
        fender = Fender(load_policy(path), str(path), **kwargs)
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        fender.url = f"http://127.0.0.1:{fender.data_port}"
        fender.admin_url = f"http://127.0.0.1:{fender.admin_port}"
        fender.path = path
        started.append(fender)
        return fender

    yield start
    for fender in started:
        await fender.stop()


def metric(fender: Fender, name: str, **labels) -> float:
    value = fender.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_invalid_policy_keeps_the_running_one_and_is_reported(echo_upstream, file_fender):
    fender = await file_fender(policy(echo_upstream.port))
    first_runtime = fender.runtime
    fender.path.write_text(BAD)
    async with httpx.AsyncClient() as client:
        r = await client.post(fender.admin_url + "/admin/reload")
        assert r.status_code == 422
        body = r.json()
        assert body["result"] == "failed"
        # FILE:LINE:COL: message, pointing at `timeout: 5` (line 7, column 14)
        assert body["error"].startswith(f"{fender.path}:7:14: routes[0].timeout:")
        assert fender.runtime is first_runtime
        assert (await client.get(fender.url + "/x")).status_code == 200
        status = (await client.get(fender.admin_url + "/admin/config/status")).json()
    assert status["ok"] is False
    assert status["error"] == body["error"]
    assert status["matches_file"] is False
    assert status["applied_by"] == "start"
    assert status["source"] == str(fender.path)
    assert status["version"] == 1
    assert metric(fender, "fender_config_reloads_total", trigger="api", result="failed") == 1
    assert metric(fender, "fender_config_last_reload_success") == 0
    assert metric(fender, "fender_config_differs_from_file") == 1


async def test_valid_policy_is_applied_and_unchanged_upstream_is_kept(echo_upstream, file_fender):
    fender = await file_fender(policy(echo_upstream.port))
    old_upstream = fender.runtime.upstreams["echo"]
    async with httpx.AsyncClient() as client:
        assert (await client.get(fender.url + "/a")).status_code == 200
        fender.path.write_text(
            policy(echo_upstream.port, routes="- {name: v2, match: {path_prefix: /v2}, upstream: echo}\n")
        )
        r = await client.post(fender.admin_url + "/admin/reload")
        assert r.status_code == 200 and r.json()["result"] == "applied"
        assert [route.name for route in fender.runtime.routes] == ["all", "v2"]
        # The upstream's settings did not change: the same object (and its pooled connection) serves on.
        assert fender.runtime.upstreams["echo"] is old_upstream
        assert (await client.get(fender.url + "/b")).status_code == 200
        again = await client.post(fender.admin_url + "/admin/reload")
        status = (await client.get(fender.admin_url + "/admin/config/status")).json()
    assert old_upstream.replicas[0].pool.connections_opened == 1
    assert again.json()["result"] == "unchanged"
    assert status["ok"] is True and status["error"] is None
    assert status["applied_by"] == "api" and status["matches_file"] is True
    assert metric(fender, "fender_config_reloads_total", trigger="api", result="applied") == 1
    assert metric(fender, "fender_config_reloads_total", trigger="api", result="unchanged") == 1


async def test_in_flight_request_finishes_on_the_old_runtime(file_fender):
    arrived = asyncio.Event()
    gate = asyncio.Event()

    async def gated(req, conn):
        arrived.set()
        await gate.wait()
        await conn.send(200, (), b"old")

    async with RawUpstream(gated) as old_up, RawUpstream(ok(b"new")) as new_up:
        fender = await file_fender(policy(old_up.port))
        old_runtime = fender.runtime
        old_pool = old_runtime.upstreams["echo"].replicas[0].pool
        async with httpx.AsyncClient(timeout=10) as client:
            slow = asyncio.ensure_future(client.get(fender.url + "/slow"))
            await asyncio.wait_for(arrived.wait(), 5)
            fender.path.write_text(policy(new_up.port))
            assert (await client.post(fender.admin_url + "/admin/reload")).json()["result"] == "applied"
            assert fender.runtime is not old_runtime
            fresh = await client.get(fender.url + "/fresh")
            assert fresh.text == "new"
            assert old_runtime.active == 1  # the old runtime still serves its request
            assert not old_pool._closed
            gate.set()
            response = await slow
        assert response.status_code == 200 and response.text == "old"
        await until(lambda: old_pool._closed)  # retired once its last request ended
        assert old_runtime.active == 0


class Table:
    """A stand-in for a policy module's stateful runtime object (breaker, bucket table, cache)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict = {}
        self.closed = False
        self.took_from = None

    def carry_over(self, old: Table) -> None:
        self.took_from = old
        self.entries = dict(list(old.entries.items())[: self.size])

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def table_module(monkeypatch):
    """A policy module plugged into the pipeline: one Table per route, sized by the route's timeout."""
    from proxy.dataplane import pipeline

    def build_layer(route, next_handler, ctx):
        ctx.keep(("table", route.name), route.timeout, lambda: Table(int(route.timeout)))
        return None

    monkeypatch.setattr(pipeline, "ORDER", (("timeout", build_layer),))


def tables(runtime: Runtime) -> dict[str, Table]:
    return {key[1]: obj for key, (_, obj) in runtime.handover.objects.items() if key[0] == "table"}


async def test_handover_keeps_equal_objects_and_carries_changed_ones(echo_upstream, table_module):
    two_routes = "- {name: b, match: {path_prefix: /b}, upstream: echo, timeout: 2s}\n"
    first = Runtime(parse_policy(policy(echo_upstream.port, timeout="2s", routes=two_routes)), Metrics())
    a, b = tables(first)["all"], tables(first)["b"]
    a.entries = {"k1": 1, "k2": 2}
    b.entries = {"k1": 1, "k2": 2}

    changed_b = two_routes.replace("timeout: 2s", "timeout: 1s")
    second = Runtime(
        parse_policy(policy(echo_upstream.port, timeout="2s", routes=changed_b)), Metrics(), previous=first
    )
    assert second.upstreams["echo"] is first.upstreams["echo"]
    a2, b2 = tables(second)["all"], tables(second)["b"]
    assert a2 is a  # equal settings: the very object, state and all
    assert b2 is not b and b2.took_from is b and b2.entries == {"k1": 1}
    assert second.kept_objects == 2  # the upstream and table "all"
    await first.retire(second.owned_ids())
    assert b.closed and not a.closed
    assert not first.upstreams["echo"].replicas[0].pool._closed
    await second.close()
    assert a.closed and b2.closed and second.upstreams["echo"].replicas[0].pool._closed
    assert Handover().keep("k", 1, lambda: "built") == "built"


class Named(Table):
    def __init__(self, name: str) -> None:
        super().__init__(0)
        self.name = name


@pytest.fixture
def keeping_module(monkeypatch):
    """A policy module of the common shape: objects by ``ctx.keep``, shown by ``ctx.expose``.

    One object per route keyed with its settings (as breakers are), one table per route name
    whose settings may change (as rate-limit tables are)."""
    from proxy.dataplane import pipeline

    def build_layer(route, next_handler, ctx):
        key = ("named", route.name, route.timeout)
        named = ctx.keep(key, route.timeout, lambda: Named(route.name))
        ctx.expose("named", route.name, named)
        table = ctx.keep(("table", route.name), route.timeout, lambda: Table(int(route.timeout)))
        ctx.expose("table", route.name, table)
        return None

    monkeypatch.setattr(pipeline, "ORDER", (("timeout", build_layer),))


async def test_state_is_handed_over_through_keep(echo_upstream, keeping_module):
    extra = "- {name: b, match: {path_prefix: /b}, upstream: echo, timeout: 2s}\n"
    gone = "- {name: c, match: {path_prefix: /c}, upstream: echo, timeout: 2s}\n"
    first = Runtime(parse_policy(policy(echo_upstream.port, timeout="2s", routes=extra + gone)), Metrics())
    old_named = dict(first.exposed["named"])
    old_tables = dict(first.exposed["table"])
    for table in old_tables.values():
        table.entries = {"k1": 1, "k2": 2}

    changed = extra.replace("timeout: 2s", "timeout: 1s")
    second = Runtime(
        parse_policy(policy(echo_upstream.port, timeout="2s", routes=changed)), Metrics(), previous=first
    )
    named = second.exposed["named"]
    assert set(named) == {"all", "b"}  # c is gone from the new runtime
    assert named["all"] is old_named["all"]  # same settings: same object
    assert named["b"] is not old_named["b"]  # new settings: a new object
    tables = second.exposed["table"]
    assert tables["b"].took_from is old_tables["b"] and tables["b"].entries == {"k1": 1}
    assert tables["all"] is old_tables["all"] and tables["all"].entries == {"k1": 1, "k2": 2}
    await first.retire(second.owned_ids())
    assert old_named["c"].closed and old_named["b"].closed
    assert not old_named["all"].closed
    await second.close()


async def test_manual_rollback_returns_to_the_previous_policy(echo_upstream, file_fender):
    fender = await file_fender(policy(echo_upstream.port, timeout="15s"))
    async with httpx.AsyncClient() as client:
        assert (await client.post(fender.admin_url + "/admin/rollback")).status_code == 409
        fender.path.write_text(policy(echo_upstream.port, timeout="3s"))
        assert (await client.post(fender.admin_url + "/admin/reload")).json()["result"] == "applied"
        assert fender.runtime.routes[0].timeout == 3
        r = await client.post(fender.admin_url + "/admin/rollback")
        assert r.status_code == 200 and r.json()["result"] == "applied"
        status = (await client.get(fender.admin_url + "/admin/config/status")).json()
        assert (await client.post(fender.admin_url + "/admin/rollback")).status_code == 409
    assert fender.runtime.routes[0].timeout == 15
    assert status["applied_by"] == "rollback"
    assert status["matches_file"] is False  # the file still holds the 3s policy
    assert metric(fender, "fender_config_rollbacks_total", reason="manual") == 1
    assert metric(fender, "fender_config_differs_from_file") == 1


async def test_automatic_rollback_when_a_changed_upstream_is_unreachable(echo_upstream, file_fender):
    clock = ManualClock()
    grace = "reload: {watch: false, rollback_grace: 3s}\n"
    text = policy(echo_upstream.port).replace("reload: {watch: false}\n", grace)
    fender = await file_fender(text, clock=clock)
    dead_port = free_port()
    fender.path.write_text(policy(dead_port).replace("reload: {watch: false}\n", grace))
    assert (await fender.reloader.reload("api")).result == "applied"
    assert fender.runtime.upstreams["echo"].replicas[0].port == dead_port
    for _ in range(20):  # bounded: 20 x 0.5s of manual time, far past the 3s grace
        if fender.reloader.current.trigger == "auto_rollback":
            break
        await until(lambda: clock.sleepers > 0 or fender.reloader.current.trigger == "auto_rollback")
        clock.advance(0.5)
        await asyncio.sleep(0)
    await until(lambda: fender.reloader.current.trigger == "auto_rollback")
    assert fender.runtime.upstreams["echo"].replicas[0].port == echo_upstream.port
    assert metric(fender, "fender_config_rollbacks_total", reason="unreachable") == 1
    async with httpx.AsyncClient() as client:
        assert (await client.get(fender.url + "/after")).status_code == 200


async def test_no_automatic_rollback_when_the_upstream_answers(echo_upstream, file_fender):
    clock = ManualClock()
    grace = "reload: {watch: false, rollback_grace: 2s}\n"
    fender = await file_fender(
        policy(echo_upstream.port).replace("reload: {watch: false}\n", grace), clock=clock
    )
    fender.path.write_text(
        policy(echo_upstream.port, pool="pool: {max_connections: 7}").replace(
            "reload: {watch: false}\n", grace
        )
    )
    assert (await fender.reloader.reload("api")).result == "applied"
    guard = fender.reloader._guard_task
    assert guard is not None
    await asyncio.wait_for(guard, 5)  # the first probe reaches the replica: the guard ends at once
    assert fender.reloader.current.trigger == "api"
    assert metric(fender, "fender_config_rollbacks_total", reason="unreachable") == 0


async def test_file_watch_follows_a_configmap_style_symlink_swap(echo_upstream, tmp_path):
    # Kubernetes mounts ConfigMaps as policy.yaml -> ..data/policy.yaml with ..data a symlink swapped atomically.
    text = policy(echo_upstream.port).replace("reload: {watch: false}", "reload: {watch_interval: 100ms}")
    for version, timeout in (("v1", "15s"), ("v2", "4s")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "policy.yaml").write_text(text.replace("timeout: 15s", f"timeout: {timeout}"))
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/policy.yaml", tmp_path / "policy.yaml")
    path = str(tmp_path / "policy.yaml")
    fender = Fender(load_policy(path), path)
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    try:
        os.symlink("v2", tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await until(lambda: fender.runtime.routes[0].timeout == 4)
        assert fender.reloader.current.trigger == "file"
        # A broken edit is reported once and does not change the running policy.
        (tmp_path / "v2" / "policy.yaml").write_text(BAD)
        await until(lambda: fender.reloader.last_attempt.result == "failed")
        assert fender.runtime.routes[0].timeout == 4
        assert metric(fender, "fender_config_reloads_total", trigger="file", result="failed") == 1
    finally:
        await fender.stop()


async def test_zero_dropped_requests_across_ten_reloads(echo_upstream, file_fender):
    """4 clients, 400 requests; 10 reloads (good and bad alternating) while they run."""
    good = [
        policy(echo_upstream.port, pool="pool: {max_connections: 50}"),
        policy(echo_upstream.port, pool="pool: {max_connections: 60}"),
    ]
    fender = await file_fender(good[0])
    total, clients = 400, 4
    done = 0
    failures: list[str] = []
    progress = asyncio.Condition()

    async def client_loop(client: httpx.AsyncClient, n: int) -> None:
        nonlocal done
        for i in range(n):
            try:
                r = await client.get(f"{fender.url}/item/{i}")
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.headers.get('x-fender-error')}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            async with progress:
                done += 1
                progress.notify_all()

    async def reloads(admin: httpx.AsyncClient) -> list[str]:
        results = []
        for k in range(10):
            async with progress:
                await asyncio.wait_for(progress.wait_for(lambda k=k: done >= (k + 1) * 30), 30)
            fender.path.write_text(good[(k // 2 + 1) % 2] if k % 2 == 0 else BAD)
            results.append((await admin.post(fender.admin_url + "/admin/reload")).json()["result"])
        return results

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client, httpx.AsyncClient() as admin:
        reloader = asyncio.ensure_future(reloads(admin))
        await asyncio.gather(*(client_loop(client, total // clients) for _ in range(clients)))
        results = await asyncio.wait_for(reloader, 30)
    assert failures == []
    assert done == total
    assert results == ["applied", "failed"] * 5
    assert metric(fender, "fender_requests_total", route="all", method="GET", status_class="2xx") == total


def test_sighup_reloads_the_policy_file(fender_process):
    port, admin = free_port(), free_port()
    text = policy(free_port()).replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
    text = text.replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}\ndrain: {{delay: 0s}}")
    proc = fender_process(text)
    proc.start(port)
    wait_port(admin)
    proc.policy_path.write_text(text.replace("timeout: 15s", "timeout: 2s"))
    proc.proc.send_signal(signal.SIGHUP)
    status: dict = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status.get("applied_by") != "signal":
        status = httpx.get(f"http://127.0.0.1:{admin}/admin/config/status").json()
        time.sleep(0.05)
    assert status["applied_by"] == "signal" and status["ok"] is True
    config = httpx.get(f"http://127.0.0.1:{admin}/admin/config").json()
    assert config["policy"]["routes"][0]["timeout"] == "2s"


async def test_listener_settings_are_recorded_for_the_next_start(echo_upstream, file_fender):
    fender = await file_fender(policy(echo_upstream.port))
    data_port = fender.data_port
    changed = policy(echo_upstream.port, timeout="9s").replace(
        "listen: 127.0.0.1:0", f"listen: 127.0.0.1:{free_port()}"
    )
    fender.path.write_text(changed.replace("watch: false", "watch: false, watch_interval: 2s"))
    attempt = await fender.reloader.reload("api")
    status = fender.reloader.status()
    assert attempt.result == "applied"
    assert status["pending_restart"] == ["listen"]
    assert fender.runtime.routes[0].timeout == 9  # the rest applies now
    async with httpx.AsyncClient() as client:  # and the listener stays where it was
        assert (await client.get(f"http://127.0.0.1:{data_port}/still")).status_code == 200


async def test_a_module_failing_to_start_leaves_the_running_policy(echo_upstream, file_fender, monkeypatch):
    """A runtime that builds but cannot start (e.g. a health checker) is closed; its kept objects are not."""
    from proxy.dataplane import pipeline

    class Refuses(Table):
        def start(self):
            raise RuntimeError("cannot start")

    built: list[Refuses] = []

    def build_layer(route, next_handler, ctx):
        if route.timeout == 7:
            built.append(ctx.keep(("refuses", route.name), 7, lambda: Refuses(1)))
        return None

    monkeypatch.setattr(pipeline, "ORDER", (("timeout", build_layer),))
    fender = await file_fender(policy(echo_upstream.port))
    running = fender.runtime
    fender.path.write_text(policy(echo_upstream.port, timeout="7s"))
    attempt = await fender.reloader.reload("api")
    assert attempt.result == "failed" and "cannot build the runtime: cannot start" in attempt.error
    assert fender.runtime is running
    assert len(built) == 1 and built[0].closed
    assert not running.upstreams["echo"].replicas[0].pool._closed
    async with httpx.AsyncClient() as client:
        assert (await client.get(fender.url + "/x")).status_code == 200


async def test_a_signal_during_start_waits_for_the_listeners(echo_upstream):
    """Handlers go in before start (a SIGHUP with none would end the process); early signals act after it."""
    from proxy.config import parse_policy
    from proxy.server.fender import Fender, bind_socket

    fender = Fender(parse_policy(policy(echo_upstream.port), "p.yaml"), "p.yaml")
    acted: list[str] = []
    fender._on_signal(acted.append, ("reload",))
    assert acted == []  # not started yet: kept for later
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    try:
        assert acted == ["reload"]
        fender._on_signal(acted.append, ("again",))
        assert acted == ["reload", "again"]
    finally:
        await fender.stop()
