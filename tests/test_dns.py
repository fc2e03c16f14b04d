"""Replicas from DNS against a real name server (dnsmasq) and real replicas on loopback addresses.

dnsmasq is started by each test on a free port of 127.0.0.1 (tests/support/dnsmasq.py) and
answers with TTL 1s; replicas listen on 127.0.0.2, 127.0.0.3, ... (all of 127.0.0.0/8 is on
the loopback interface) on one shared port, as pods behind a headless Service do. Fender
runs in-process with ``dns: {resolvers: ["127.0.0.1:PORT"]}`` and ``max_ttl`` below the
records' TTL so that changes show within about half a second. Waits on what the name server
does (a SIGHUP re-read, a restart) are bounded real-time waits; nothing sleeps to synchronise.
"""

# ruff: noqa: F811  (the fenders fixture comes from tests/support/policyfile.py)
from __future__ import annotations

import asyncio
import logging
import textwrap
import time

import httpx
import pytest

from proxy.cluster.dns.resolver import DnsResolver, LookupFailed
from proxy.cluster.options import DnsOptions
from proxy.server.fender import Fender
from tests.support.dnsmasq import Dnsmasq
from tests.support.policyfile import fenders  # noqa: F401  (the fenders fixture)
from tests.support.procs import wait_until
from tests.support.raw_upstream import NeverAccepts, RawUpstream, Request, Responder

pytestmark = pytest.mark.timeout(90)

A, B, C, D = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
HEALTH = "/healthz"


def named(address: str):
    """A replica handler answering with its own address (and 200 on the health path)."""

    async def handler(req: Request, conn: Responder) -> None:
        await conn.send(200, [("content-type", "text/plain")], address.encode())

    return handler


class Replicas:
    """Replica servers on several loopback addresses, all on one port (opened and closed by the test)."""

    def __init__(self) -> None:
        self.port = 0
        self.servers: dict[str, RawUpstream] = {}

    async def start(self, address: str) -> RawUpstream:
        server = RawUpstream(named(address), host=address, port=self.port)
        await server.__aenter__()
        self.port = server.port
        self.servers[address] = server
        return server

    async def stop(self, address: str) -> None:
        await self.servers.pop(address).close()

    def served(self, address: str) -> int:
        """Requests other than health checks that ``address`` received."""
        server = self.servers.get(address)
        return 0 if server is None else sum(1 for r in server.requests if r.target != HEALTH.encode())

    async def close(self) -> None:
        for address in list(self.servers):
            await self.stop(address)


@pytest.fixture
async def replicas():
    group = Replicas()
    yield group
    await group.close()


def policy(dns_port: int, replicas: str, upstream: str = "", dns: str = "", route: str = "") -> str:
    # Refresh every 0.5s (below the records' 1s TTL) unless the test says otherwise.
    ttl = "" if "ttl" in dns else ", max_ttl: 500ms, min_ttl: 100ms"
    return (
        textwrap.dedent(
            f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        drain: {{delay: 0s, timeout: 5s}}
        dns: {{resolvers: ["127.0.0.1:{dns_port}"]{ttl}{dns}}}
        upstreams:
          up:
            replicas: {replicas}
        """
        )
        + textwrap.indent(textwrap.dedent(upstream), "    ")
        + textwrap.dedent(
            """\
        routes:
          - name: r
            upstream: up
            timeout: 5s
        """
        )
        + textwrap.indent(textwrap.dedent(route), "    ")
    )


def names(fender: Fender) -> list[str]:
    return sorted(r.name for r in fender.dataplane.runtime.upstreams["up"].replicas)


def dns_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fender"]


async def get(client: httpx.AsyncClient, fender: Fender) -> httpx.Response:
    return await client.get(f"{fender.url}/x")


async def test_a_name_with_three_addresses_spreads_traffic_over_three_replicas(
    tmp_path, replicas, fenders, caplog
):
    caplog.set_level(logging.INFO, logger="fender")
    for address in (A, B, C):
        await replicas.start(address)
    async with Dnsmasq(tmp_path, {"svc.test": [A, B, C]}) as dns:
        fender = await fenders(
            policy(
                dns.port,
                f"[{{url: http://svc.test:{replicas.port}, resolve: true}}]",
                route="rewrite_host: true\n",
            )
        )
        # The first answer is in before the runtime goes live: all three from the first request.
        assert names(fender) == [f"{a}:{replicas.port} (svc.test)" for a in (A, B, C)]
        async with httpx.AsyncClient() as client:
            bodies = [(await get(client, fender)).text for _ in range(30)]
        # Round robin over three equal replicas: ten each; the Host sent is the name's.
        assert sorted(bodies.count(a) for a in (A, B, C)) == [10, 10, 10]
        host = replicas.servers[A].requests[-1].header(b"host")
        assert host == f"svc.test:{replicas.port}".encode()
        async with httpx.AsyncClient() as client:
            snapshot = (await client.get(f"{fender.admin_url}/admin/upstreams")).json()["upstreams"]["up"]
            status = (await client.get(f"{fender.admin_url}/admin/status")).json()
            metrics = (await client.get(f"{fender.admin_url}/metrics")).text
        assert {r["source"] for r in snapshot["replicas"]} == {"resolve svc.test"}
        assert {r["address"] for r in snapshot["replicas"]} == {f"{a}:{replicas.port}" for a in (A, B, C)}
        (entry,) = snapshot["dns"]
        assert entry["name"] == "svc.test" and entry["type"] == "resolve" and entry["replicas"] == 3
        assert status["upstreams"][0]["dns"][0]["last_outcome"] == "ok"
        assert 'fender_dns_replicas{upstream="up"} 3.0' in metrics
        assert 'fender_dns_lookups_total{outcome="ok",upstream="up"}' in metrics
        assert 'fender_dns_answer_age_seconds{name="svc.test",upstream="up"}' in metrics
        assert f'replica="{A}:{replicas.port} (svc.test)"' in metrics
    assert any(line.startswith("up: 0 -> 3 replicas (+") for line in dns_lines(caplog))


@pytest.mark.slow
async def test_an_address_added_and_one_removed_under_steady_load_fail_no_request(
    tmp_path, replicas, fenders, caplog
):
    caplog.set_level(logging.INFO, logger="fender")
    for address in (A, B, C, D):
        await replicas.start(address)
    port = replicas.port
    async with Dnsmasq(tmp_path, {"svc.test": [A, B, C]}) as dns:
        fender = await fenders(
            policy(
                dns.port,
                f"[{{url: http://svc.test:{port}, resolve: true}}]",
                upstream=f"health_check: {{path: {HEALTH}, interval: 200ms, timeout: 150ms}}\n",
            )
        )
        upstream = fender.dataplane.runtime.upstreams["up"]
        failures: list[str] = []
        sent = 0
        stop = asyncio.Event()
        change_seen: dict[str, float | int] = {}

        async def client_loop() -> None:
            nonlocal sent
            async with httpx.AsyncClient() as client:
                for _ in range(2000):  # bounded: the test stops it far earlier
                    if stop.is_set():
                        return
                    response = await get(client, fender)
                    sent += 1
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.headers.get('x-fender-error')}")
                    await asyncio.sleep(0.005)  # a steady pace, not a synchronisation

        loops = [asyncio.create_task(client_loop()) for _ in range(4)]
        try:
            await wait_until(lambda: sent >= 50, within=20, what="load running")
            await dns.set_hosts({"svc.test": [A, B, D]})
            d_name = f"{D}:{port} (svc.test)"

            def seen() -> bool:
                current = [r.name for r in upstream.replicas]
                if d_name in current and f"{C}:{port} (svc.test)" not in current:
                    change_seen.setdefault("c_served", replicas.served(C))
                    change_seen.setdefault("at", time.monotonic())
                    return True
                return False

            await wait_until(seen, within=10, what="the new answer applied")
            await wait_until(lambda: replicas.served(D) >= 10, within=10, what="traffic on the added replica")
            await wait_until(lambda: sent >= change_seen["c_served"] + 100, within=20, what="more load")
        finally:
            stop.set()
            await asyncio.gather(*loops)
        assert failures == []
        # The removed one got nothing new once the change was applied (requests then in flight finished).
        assert replicas.served(C) == change_seen["c_served"]
        # The added one took traffic only after its first (passing) health check: the replica saw
        # that probe before any client request.
        targets = [r.target for r in replicas.servers[D].requests]
        assert targets.index(HEALTH.encode()) < next(i for i, t in enumerate(targets) if t != HEALTH.encode())
    assert f"up: 3 -> 3 replicas (+{d_name}, -{C}:{port} (svc.test))" in dns_lines(caplog)


@pytest.mark.slow
async def test_dns_server_stopped_traffic_continues_on_the_last_set_and_recovers(
    tmp_path, replicas, fenders, caplog
):
    caplog.set_level(logging.INFO, logger="fender")
    for address in (A, B):
        await replicas.start(address)
    async with Dnsmasq(tmp_path, {"svc.test": [A, B]}) as dns:
        fender = await fenders(
            policy(
                dns.port, f"[{{url: http://svc.test:{replicas.port}, resolve: true}}]", dns=", timeout: 300ms"
            )
        )
        counter = fender.metrics.dns_lookups
        upstream = fender.dataplane.runtime.upstreams["up"]

        def count(outcome: str) -> float:
            return counter.labels("up", outcome)._value.get()

        await dns.stop()
        await wait_until(
            lambda: count("timeout") + count("unreachable") >= 2, within=10, what="failed lookups"
        )
        async with httpx.AsyncClient() as client:
            bodies = [(await get(client, fender)).text for _ in range(10)]
        assert sorted(set(bodies)) == [A, B]  # the last good set serves on
        assert len(upstream.replicas) == 2
        warned = [line for line in dns_lines(caplog) if "lookup of svc.test (resolve) failed" in line]
        assert len(warned) == 1  # rate-limited: one warning however many lookups failed
        assert "keeping the last good answer (2 replicas" in warned[0]
        ok_before = count("ok")
        await dns.start()  # the same port
        await wait_until(lambda: count("ok") > ok_before, within=10, what="lookups succeed again")
        assert "up: svc.test (resolve) resolves again" in dns_lines(caplog)
        assert upstream.dns_snapshot()[0]["failures_in_a_row"] == 0


@pytest.mark.slow
async def test_nxdomain_keeps_the_last_set_until_max_stale_then_503_naming_nothing_else(
    tmp_path, replicas, fenders, caplog
):
    caplog.set_level(logging.INFO, logger="fender")
    await replicas.start(A)
    async with Dnsmasq(tmp_path, {"svc.test": [A]}) as dns:
        fender = await fenders(
            policy(
                dns.port, f"[{{url: http://svc.test:{replicas.port}, resolve: true}}]", dns=", max_stale: 2s"
            )
        )
        upstream = fender.dataplane.runtime.upstreams["up"]
        await dns.set_hosts({"other.test": [B]})  # svc.test is now NXDOMAIN
        started = time.monotonic()
        async with httpx.AsyncClient() as client:
            await wait_until(
                lambda: upstream.dns_snapshot()[0]["last_outcome"] == "nxdomain", within=10, what="nxdomain"
            )
            # Still served from the last good answer while it is younger than max_stale.
            assert (await get(client, fender)).text == A
            await wait_until(lambda: not upstream.replicas, within=10, what="the set dropped")
            assert time.monotonic() - started >= 1.0  # not at the first NXDOMAIN
            response = await get(client, fender)
        assert response.status_code == 503 and response.headers["x-fender-error"] == "no_healthy_replica"
        lines = dns_lines(caplog)
        assert any(
            "svc.test (resolve)" in line and "dropped" in line and "NXDOMAIN" in line for line in lines
        )
        assert f"up: 1 -> 0 replicas (-{A}:{replicas.port} (svc.test))" in lines


async def test_a_name_that_does_not_resolve_at_start_does_not_stop_fender(
    tmp_path, replicas, fenders, caplog
):
    caplog.set_level(logging.INFO, logger="fender")
    await replicas.start(A)
    async with Dnsmasq(tmp_path, {"other.test": [B]}) as dns:
        fender = await fenders(
            policy(dns.port, f"[{{url: http://missing.test:{replicas.port}, resolve: true}}]")
        )
        async with httpx.AsyncClient() as client:
            response = await get(client, fender)
            assert response.status_code == 503 and response.headers["x-fender-error"] == "no_healthy_replica"
            assert any(
                "lookup of missing.test (resolve) failed: missing.test does not exist (NXDOMAIN)" in line
                for line in dns_lines(caplog)
            )
            await dns.set_hosts({"missing.test": [A]})
            upstream = fender.dataplane.runtime.upstreams["up"]
            await wait_until(lambda: len(upstream.replicas) == 1, within=10, what="the name resolving")
            assert (await get(client, fender)).text == A


@pytest.mark.slow
async def test_srv_priorities_are_failover_tiers_with_failback(tmp_path, replicas, fenders):
    await replicas.start(A)
    await replicas.start(B)
    port = replicas.port
    srv = [("_http._tcp.svc.test", "p0.test", port, 0, 10), ("_http._tcp.svc.test", "p1.test", port, 1, 10)]
    async with Dnsmasq(tmp_path, {"p0.test": [A], "p1.test": [B]}, srv) as dns:
        fender = await fenders(
            policy(
                dns.port,
                "[{srv: _http._tcp.svc.test}]",
                upstream=f"health_check: {{path: {HEALTH}, interval: 100ms, timeout: 80ms, unhealthy_threshold: 1, healthy_threshold: 1}}\n",
            )
        )
        upstream = fender.dataplane.runtime.upstreams["up"]
        assert sorted((r.name, r.priority) for r in upstream.replicas) == [
            (f"{A}:{port} (p0.test)", 0),
            (f"{B}:{port} (p1.test)", 1),
        ]
        async with httpx.AsyncClient() as client:
            assert {(await get(client, fender)).text for _ in range(6)} == {A}
            await replicas.stop(A)
            await wait_until(
                lambda: upstream.picker.active_label == "1", within=10, what="failover to tier 1"
            )
            assert {(await get(client, fender)).text for _ in range(6)} == {B}
            await replicas.start(A)  # the same port
            await wait_until(lambda: upstream.picker.active_label == "0", within=10, what="failback")
            assert {(await get(client, fender)).text for _ in range(6)} == {A}
        assert upstream.replicas[0].authority == f"p0.test:{port}".encode()


async def test_a_blackholed_first_address_costs_only_its_share_of_the_connect_timeout(tmp_path, fenders):
    async with NeverAccepts(host=A) as dead:
        good = RawUpstream(named(B), host=B, port=dead.port)
        async with good, Dnsmasq(tmp_path, {"two.test": [A, B]}) as dns:
            fender = await fenders(
                policy(
                    dns.port,
                    f"[{{url: http://two.test:{dead.port}}}]",  # a plain name: one replica, two addresses
                    upstream="pool: {connect_timeout: 1s, max_keepalive: 0}\n",
                )
            )
            cache = fender.dataplane.runtime.upstreams["up"].dns.cache
            blackhole_first = 0
            deadline = time.monotonic() + 8.0
            async with httpx.AsyncClient() as client:
                # Bounded in count and time; dnsmasq rotates the order of its answers, which the
                # cache keeps for 0.5s (max_ttl), so both orders come up.
                for _ in range(5000):
                    response = await get(client, fender)
                    assert response.status_code == 200 and response.text == B
                    if cache._entries["two.test"].addresses[0] == A:
                        blackhole_first += 1
                    if blackhole_first >= 2 or time.monotonic() > deadline:
                        break
            assert blackhole_first >= 2  # the dead address was tried first, and the request still made it


async def test_plain_names_use_the_cache_and_respect_the_ttl(tmp_path, replicas, fenders):
    await replicas.start(A)
    async with Dnsmasq(tmp_path, {"plain.test": [A]}) as dns:
        fender = await fenders(
            policy(
                dns.port,
                f"[{{url: http://plain.test:{replicas.port}}}]",
                upstream="pool: {max_keepalive: 0}\n",
                dns=", min_ttl: 1s, max_ttl: 60s",
            )
        )
        ok = fender.metrics.dns_lookups.labels("up", "ok")
        async with httpx.AsyncClient() as client:
            started = time.monotonic()
            for _ in range(20):  # twenty new connections within the 1s TTL
                assert (await get(client, fender)).text == A
            within_ttl = time.monotonic() - started < 1.0
        if within_ttl:
            assert ok._value.get() == 1  # one lookup for twenty connections
        else:
            assert ok._value.get() < 20
        assert fender.dataplane.runtime.upstreams["up"].replicas[0].name == f"plain.test:{replicas.port}"
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{fender.admin_url}/readyz")
        # Readiness reaches the name through the same resolver (the system's knows nothing of plain.test).
        assert ready.status_code == 200 and ready.json()["upstreams"]["up"]["reachable"]


async def test_max_addresses_caps_the_replicas_of_a_name(tmp_path, replicas, fenders, caplog):
    caplog.set_level(logging.INFO, logger="fender")
    addresses = [f"127.0.0.{n}" for n in range(2, 7)]
    async with Dnsmasq(tmp_path, {"many.test": addresses}) as dns:
        fender = await fenders(
            policy(dns.port, "[{url: http://many.test:9, resolve: true}]", dns=", max_addresses: 3")
        )
        assert len(fender.dataplane.runtime.upstreams["up"].replicas) == 3
    assert any(
        "many.test (resolve) gave 5 addresses; only the first 3 are used (dns.max_addresses)" in line
        for line in dns_lines(caplog)
    )


async def test_a_reload_keeps_the_resolved_set_and_replica_state(tmp_path, replicas, fenders):
    for address in (A, B):
        await replicas.start(address)
    port = replicas.port
    async with Dnsmasq(tmp_path, {"svc.test": [A, B]}) as dns:
        replicas_line = f"[{{url: http://svc.test:{port}, resolve: true}}]"
        outlier = "outlier_detection: {consecutive_failures: 1, ejection_time: 60s}\n"
        fender = await fenders(policy(dns.port, replicas_line, upstream=outlier))
        first = fender.dataplane.runtime.upstreams["up"]
        a_name = f"{A}:{port} (svc.test)"
        first.picker._eject(first.picker.state_of(a_name), first.clock.now())
        pool_a = first.picker.state_of(a_name).pool
        # Same names, other settings of the upstream: a new runtime, with the answer it had.
        await dns.stop()  # nothing to ask: the set can only come from the previous runtime
        await fenders.reload(fender, policy(dns.port, replicas_line, upstream=outlier + "balance: random\n"))
        second = fender.dataplane.runtime.upstreams["up"]
        assert second is not first
        assert sorted(r.name for r in second.replicas) == sorted(r.name for r in first.replicas)
        assert second.picker.state_of(a_name).health == "ejected"
        assert second.picker.state_of(a_name).pool is pool_a  # warm pool kept
        async with httpx.AsyncClient() as client:
            assert {(await get(client, fender)).text for _ in range(4)} == {B}
        # Another dns: section (the name server still down): rebuilt with the answers it had.
        await fenders.reload(
            fender,
            policy(dns.port, replicas_line, upstream=outlier + "balance: random\n", dns=", timeout: 1s"),
        )
        third = fender.dataplane.runtime.upstreams["up"]
        assert third is not second and third.dns is not second.dns
        assert sorted(r.name for r in third.replicas) == sorted(r.name for r in first.replicas)
        assert third.picker.state_of(a_name).health == "ejected"


async def test_checkpoints_restore_replica_state_by_address(tmp_path, replicas, fenders):
    await replicas.start(A)
    await replicas.start(B)
    port = replicas.port
    checkpoint = tmp_path / "state.json"
    async with Dnsmasq(tmp_path, {"svc.test": [A, B]}) as dns:
        text = (
            policy(
                dns.port,
                f"[{{url: http://svc.test:{port}, resolve: true}}]",
                upstream="outlier_detection: {consecutive_failures: 1, ejection_time: 60s}\n",
            )
            + f"checkpoint: {{path: {checkpoint}, interval: 1h}}\n"
        )
        fender = await fenders(text)
        up = fender.dataplane.runtime.upstreams["up"]
        up.picker._eject(up.picker.state_of(f"{A}:{port} (svc.test)"), up.clock.now())
        await fender.stop()
        saved = checkpoint.read_text()
        assert f'"{A}:{port}"' in saved  # by address, not by the name shown
        second = await fenders(text)
        state = second.dataplane.runtime.upstreams["up"].picker.state_of(f"{A}:{port} (svc.test)")
        assert state.health == "ejected"


async def test_validate_env_resolves_every_name_and_validate_stays_offline(tmp_path, replicas):
    import subprocess
    import sys

    from tests.conftest import ROOT

    srv = [("_http._tcp.svc.test", "p0.test", 9001, 0, 10)]
    async with Dnsmasq(tmp_path, {"svc.test": [A, B], "p0.test": [C]}, srv) as dns:
        path = tmp_path / "policy.yaml"
        path.write_text(
            policy(
                dns.port,
                "[{url: http://svc.test:9, resolve: true}, {srv: _http._tcp.svc.test}, "
                "{url: http://missing.test:9}]",
            )
        )

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "proxy", "validate", *args, str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )

        offline = await asyncio.to_thread(run)
        online = await asyncio.to_thread(run, "--env")
    assert offline.returncode == 0, offline.stderr
    assert "svc.test" not in offline.stdout + offline.stderr.replace(str(path), "")
    assert online.returncode == 0, online.stderr
    out = online.stdout
    assert f"svc.test (resolve): 2 addresses ({', '.join(sorted([A, B]))})" in out
    assert f"_http._tcp.svc.test (srv): 1 address ({C}:9001 (p0.test), priority 0, weight 10)" in out
    assert "missing.test: does not resolve: missing.test does not exist (NXDOMAIN)" in online.stderr


async def test_the_resolver_returns_ttls_srv_records_and_outcomes_from_a_real_name_server(tmp_path):
    srv = [("_http._tcp.svc.test", "a.test", 9001, 0, 10), ("_http._tcp.svc.test", "b.test", 9002, 1, 0)]
    async with Dnsmasq(
        tmp_path, {"svc.test": ["127.0.0.2", "127.0.0.3"], "a.test": ["127.0.0.4"]}, srv
    ) as dns:
        resolver = DnsResolver(DnsOptions(resolvers=[f"127.0.0.1:{dns.port}"], timeout="500ms"))
        answer = await resolver.addresses("svc.test")
        assert sorted(answer.addresses) == ["127.0.0.2", "127.0.0.3"] and answer.ttl == 1.0
        records = (await resolver.srv("_http._tcp.svc.test")).records
        assert [(r.priority, r.weight, r.port, r.target) for r in records] == [
            (0, 10, 9001, "a.test"),
            (1, 0, 9002, "b.test"),
        ]
        with pytest.raises(LookupFailed) as nx:
            await resolver.addresses("nope.test")
        assert nx.value.outcome == "nxdomain"
        with pytest.raises(LookupFailed) as refused:
            await resolver.addresses("outside.example")  # not local: dnsmasq has no upstream to ask
        assert refused.value.outcome == "refused"
        await dns.stop()
        with pytest.raises(LookupFailed) as down:
            await resolver.addresses("svc.test")
        assert down.value.outcome in ("timeout", "unreachable")
