"""Headline: replica processes are killed (SIGKILL) under a steady client stream; no request fails.

Two replica processes behind a real Fender with retries and 200ms health
checks. A bounded stream of GETs (5 concurrent clients at a fixed pace) runs
while a replica is killed and later restarted on the same port.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_port

# A replica that answers every request (including the health check) with its own name.
REPLICA_SCRIPT = """
import sys, uvicorn
name = sys.argv[2].encode()
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(name)).encode())]})
    await send({"type": "http.response.body", "body": name})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off", ws="none")
"""

INTERVAL = 0.2  # health-check interval of the test policy (200ms)
CLIENTS = 5
PACE = 0.02  # each client waits this long between its requests
MAX_REQUESTS = 600  # hard bound on the stream, whatever happens


class Replica:
    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REPLICA_SCRIPT, str(self.port), self.name],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    async def start(self) -> None:
        """Start the process (again, on the same port) and wait until it accepts connections."""
        await asyncio.to_thread(self._spawn)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
async def replicas():
    started: list[Replica] = []

    async def make(name: str) -> Replica:
        replica = Replica(name)
        await replica.start()
        started.append(replica)
        return replica

    yield make
    for replica in started:
        replica.stop()


def policy(first: Replica, second: Replica, second_priority: int) -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        upstreams:
          svc:
            replicas:
              - {{url: http://127.0.0.1:{first.port}, priority: 0}}
              - {{url: http://127.0.0.1:{second.port}, priority: {second_priority}}}
            health_check: {{path: /healthz, interval: 200ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 2}}
            outlier_detection: {{consecutive_failures: 3, ejection_time: 10s}}
        routes:
          - name: all
            upstream: svc
            timeout: 2s
            retry:
              attempts: 3
              retry_on: [connect_failure, reset, timeout]
              budget: {{ratio: 100%, min_per_second: 100.0}}
        """
    )


class Stream:
    """A bounded, paced stream of GETs from CLIENTS concurrent clients; records (phase, status, body)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.phase = "before"
        self.results: list[tuple[str, int, str]] = []
        self.stop = asyncio.Event()
        self.progress = asyncio.Event()

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set() and len(self.results) < MAX_REQUESTS:
            phase = self.phase
            try:
                response = await client.get(self.url + "/item")
                self.results.append((phase, response.status_code, response.text))
            except httpx.HTTPError as exc:
                self.results.append((phase, 0, repr(exc)))
            self.progress.set()
            await asyncio.sleep(PACE)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            await asyncio.gather(*(self._client(client) for _ in range(CLIENTS)))

    async def until(self, predicate, within: float = 15.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self.progress.clear()
                await self.progress.wait()

    def count(self, phase: str | None = None) -> int:
        return sum(1 for p, _, _ in self.results if phase is None or p == phase)

    def bodies(self, phase: str) -> list[str]:
        return [body for p, _, body in self.results if p == phase]


async def run_kill_and_restart(start_fender, first: Replica, second: Replica, active_active: bool):
    fender = await start_fender(policy(first, second, 0 if active_active else 1))
    picker = fender.runtime.upstreams["svc"].picker
    stream = Stream(fender.url)
    runner = asyncio.create_task(stream.run())
    try:
        await stream.until(lambda: stream.count() >= 40)
        first.kill()
        stream.phase = "killed"
        killed_at = stream.count()
        # Health checks notice within unhealthy_threshold intervals; keep streaming well past that.
        await stream.until(lambda: stream.count() >= killed_at + 60)
        state = picker.state_of(f"127.0.0.1:{first.port}")
        assert not state.active_healthy or state.is_ejected()
        await first.start()  # same port
        stream.phase = "restarted"
        # Failback: wait (bounded) until the restarted replica serves again, then 30 more requests.
        await stream.until(lambda: first.name in stream.bodies("restarted"))
        stream.phase = "back"
        await stream.until(lambda: stream.count("back") >= 30)
    finally:
        stream.stop.set()
        await asyncio.wait_for(runner, 15)
    failures = [r for r in stream.results if r[1] != 200]
    assert failures == [], failures[:5]
    assert stream.count() < MAX_REQUESTS
    return stream, picker


async def test_active_passive_primary_killed_mid_stream(start_fender, replicas):
    primary = await replicas("primary")
    standby = await replicas("standby")
    stream, picker = await run_kill_and_restart(start_fender, primary, standby, active_active=False)
    # (a request in flight at the kill may have been retried on the standby)
    assert set(stream.bodies("before")[:30]) == {"primary"}
    killed = stream.bodies("killed")
    # The standby answers from the first request after the kill (retried there at once),
    # well within one health-check interval, and serves every request while the primary is down.
    assert set(killed) == {"standby"}
    # Failback: once the restarted primary passed healthy_threshold checks, traffic is back on it.
    back = stream.bodies("back")
    assert back[-10:] == ["primary"] * 10
    assert picker.active_label == "0"
    assert ("0", "1") in picker.failovers_seen and picker.failovers_seen[-1] == ("1", "0")


async def test_active_active_one_of_two_killed_mid_stream(start_fender, replicas):
    a = await replicas("a")
    b = await replicas("b")
    stream, picker = await run_kill_and_restart(start_fender, a, b, active_active=True)
    assert set(stream.bodies("before")[:30]) == {"a", "b"}
    assert set(stream.bodies("killed")) == {"b"}
    back = stream.bodies("back")
    assert set(back[-10:]) == {"a", "b"}  # spread over both again
    assert picker.active_label == "0"
