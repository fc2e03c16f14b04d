"""Active health checks: one background task per replica, probing an HTTP path.

Each task sleeps a jittered interval (so a fleet of sidecars started together
does not probe in lockstep), sends ``<method> <path>`` (GET unless configured; with the
configured Host and extra headers) over its own one-connection
pool (Fender's HTTP/1.1 client, never the pool that carries traffic) and
reports pass or fail to the replica picker, which owns the state machine
(``healthy_threshold`` passes in a row to come back, ``unhealthy_threshold``
fails in a row to go down). A probe passes when its status is in ``expect_status`` and, with
``expect_body``, the first 64 KiB of its body contain that text. Time comes from the injected
clock; the probe itself is bounded by ``timeout`` in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from proxy.clock import Clock
from proxy.cluster.options import (
    ERROR,
    FAIL,
    MAX_EXPECT_BODY,
    PASS,
    TIMEOUT,
    HealthCheckOptions,
    parse_status_ranges,
)
from proxy.cluster.picker import ReplicaPicker
from proxy.upstream import UpstreamError, UpstreamPool

__all__ = ["HealthChecker"]


class HealthChecker:
    """The probe tasks of one upstream; started by ``start()``, stopped by ``close()``."""

    def __init__(
        self,
        options: HealthCheckOptions,
        picker: ReplicaPicker,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self.picker = picker
        self.clock = clock
        self._rng = rng or random.Random()
        self._ranges = parse_status_ranges(options.expect_status)
        self._target = options.path.encode("latin-1")
        self._method = options.method.encode("ascii")
        self._host = options.host.encode("latin-1") if options.host is not None else None
        self._extra = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in options.headers.items()]
        self._expect_body = options.expect_body.encode() if options.expect_body is not None else None
        self._tasks: list[asyncio.Task[None]] = []
        self._pools = [
            UpstreamPool(
                state.replica.host,
                state.replica.port,
                unix_path=state.replica.unix_path,
                max_connections=1,
                max_keepalive=1,
                connect_timeout=options.timeout,
                keepalive_idle_timeout=max(options.interval * 3, 5.0),
                max_pending=0,
                tls=None if state.replica.tls is None else state.replica.tls.client(state.replica.host),
            )
            for state in picker.states
        ]

    def start(self) -> None:
        if self._tasks:
            return
        for index in range(len(self._pools)):
            task = asyncio.create_task(
                self._run(index), name=f"health-check {self.picker.states[index].name}"
            )
            self._tasks.append(task)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(pool.close() for pool in self._pools), return_exceptions=True)

    def _wait(self) -> float:
        jitter = self.options.jitter
        return self.options.interval * (1.0 + self._rng.uniform(-jitter, jitter))

    async def _run(self, index: int) -> None:
        clock = self.clock
        # The first probe lands somewhere in the first interval (jitter across a fleet).
        await clock.sleep(self._rng.uniform(0.0, self.options.interval * max(self.options.jitter, 0.05)))
        while True:
            started = clock.now()
            result = await self.probe(index)
            self.picker.record_check(index, result, clock.now() - started, clock.now())
            await clock.sleep(self._wait())

    async def probe(self, index: int) -> str:
        """One probe of one replica: PASS, FAIL (unexpected status), TIMEOUT or ERROR."""
        pool = self._pools[index]
        state = self.picker.states[index]
        host = self._host if self._host is not None else state.replica.authority
        headers = [(b"host", host), (b"user-agent", b"fender-health-check"), *self._extra]
        try:
            response = await pool.request(
                self._method,
                self._target,
                headers,
                head_timeout=self.options.timeout,
                idle_timeout=self.options.timeout,
            )
        except UpstreamError as error:
            return TIMEOUT if error.reason in ("timeout", "connect_timeout") else ERROR
        wanted = self._expect_body
        body = b""
        complete = True
        try:
            async with asyncio.timeout(self.options.timeout):
                while chunk := await response.read():
                    if wanted is not None and len(body) < MAX_EXPECT_BODY:
                        body += chunk[: MAX_EXPECT_BODY - len(body)]
        except (UpstreamError, TimeoutError):
            response.close()
            complete = False
        status = response.status
        if not any(low <= status <= high for low, high in self._ranges):
            return FAIL
        if wanted is not None and wanted not in body:
            # A body cut short may still have held the text further on: that is a timeout or an error.
            if not complete and len(body) < MAX_EXPECT_BODY:
                return ERROR
            return FAIL
        return PASS
