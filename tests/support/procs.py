"""Process facts from /proc and leak checks for the hardening tests.

``open_fds(pid)`` and ``rss_kib(pid)`` read /proc; :func:`wait_until` re-checks a
condition a bounded number of times and fails the test when it never holds (for
facts outside this process, such as a kernel closing a socket, there is no event
to wait on). :class:`LeakCheck`
records this process's open fds and asyncio tasks and asserts they return to
that baseline; :func:`start_fender_process` runs Fender as a subprocess on a
policy text (tests.conftest.FenderProcess) and returns it with its ports.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.server.fender import Fender
from tests.support.launch import launch_fender


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_targets(pid: int | str = "self") -> list[str]:
    """What each fd points at (for a readable failure message)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


async def wait_until(
    predicate: Callable[[], bool],
    within: float = 5.0,
    step: float = 0.02,
    what: str | Callable[[], str] = "",
) -> None:
    """Re-check ``predicate`` every ``step`` seconds; AssertionError when it still fails after ``within``
    seconds (``what`` says what was awaited; a callable is asked at that moment, for current numbers)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() >= deadline:
            if predicate():
                return
            said = what() if callable(what) else what
            raise AssertionError(f"not reached within {within}s: {said or predicate}")
        await asyncio.sleep(step)


class LeakCheck:
    """Baseline of this process's fds and asyncio tasks, and the check that both come back."""

    def __init__(self) -> None:
        self.fds = open_fds()
        self.targets = fd_targets()
        self.tasks = len(asyncio.all_tasks())

    async def assert_back(self, within: float = 5.0, fd_slack: int = 0) -> None:
        await wait_until(
            lambda: open_fds() <= self.fds + fd_slack,
            within,
            what=lambda: (
                f"fds {open_fds()} > baseline {self.fds}: new {sorted(set(fd_targets()) - set(self.targets))}"
            ),
        )
        await wait_until(
            lambda: len(asyncio.all_tasks()) <= self.tasks,
            within,
            what=lambda: f"tasks {len(asyncio.all_tasks())} > baseline {self.tasks}: {asyncio.all_tasks()}",
        )


async def assert_fender_alive(fender) -> None:
    """Fender still answers: admin /healthz is 200 and the data port serves HTTP (any status)."""
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(fender.admin_url + "/healthz")).status_code == 200
        response = await client.get(fender.url + "/__fender_alive_probe__")
        assert 200 <= response.status_code < 600


def start_fender_process(make, text: str, port: int):
    """Start Fender as a subprocess with ``make`` (the ``fender_process`` fixture) listening on ``port``."""
    proc = make(text)
    proc.start(port)
    return proc


@pytest.fixture
async def checked_fender():
    """Like ``start_fender``, and at the end of the test: every Fender it started still answers
    (data and admin port), then, once stopped, this process's fds and asyncio tasks are back
    to what they were before the test (no leaked socket, task or timer-held connection)."""
    leak = LeakCheck()
    started: list[Fender] = []

    async def start(text: str) -> Fender:
        fender = await launch_fender(text)
        started.append(fender)
        return fender

    yield start
    try:
        for fender in started:
            await assert_fender_alive(fender)
    finally:
        for fender in started:
            await fender.stop()
    await leak.assert_back()


class FenderSubprocess:
    """Fender as a real subprocess (tests.conftest.FenderProcess) on a policy text, with /proc facts.

    ``check()`` asserts what every subprocess test ends with: the process is alive, its admin
    port answers, and its open fds are back to the baseline taken right after start, apart
    from connections still open to upstreams (``upstream_connections()`` tells how many).
    """

    def __init__(self, make, text: str) -> None:
        from tests.conftest import free_port

        self.port = free_port()
        self.admin_port = free_port()
        text = text.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{self.port}")
        text = text.replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{self.admin_port}")
        self.proc = make(text)
        self.proc.start(self.port)
        self.pid = self.proc.proc.pid
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.base_fds = open_fds(self.pid)

    def fds(self) -> int:
        return open_fds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    async def check(self, upstream_connections: Callable[[], int] = lambda: 0, within: float = 10.0) -> None:
        assert self.proc.proc.poll() is None, "fender exited"
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(self.admin_url + "/healthz")).status_code == 200
        await wait_until(
            lambda: self.fds() - upstream_connections() <= self.base_fds,
            within,
            what=lambda: (
                f"fender fds {self.fds()} (upstream conns {upstream_connections()}) > baseline "
                f"{self.base_fds}: {fd_targets(self.pid)}"
            ),
        )


@pytest.fixture
async def checked_fender_process(fender_process):
    """Start Fender subprocesses with ``await start(text, upstream_connections=lambda: n)``; when the
    test ends, each one must still be alive, answer on its admin port and be back to its fd
    baseline (apart from ``upstream_connections()`` pooled upstream connections)."""
    started: list[tuple[FenderSubprocess, Callable[[], int]]] = []

    async def start(text: str, upstream_connections: Callable[[], int] = lambda: 0) -> FenderSubprocess:
        fender = FenderSubprocess(fender_process, text)
        started.append((fender, upstream_connections))
        return fender

    yield start
    for fender, upstream_connections in started:
        await fender.check(upstream_connections)
