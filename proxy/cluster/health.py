"""Active health checks: one background task per replica, probing an HTTP path.

Each task sleeps a jittered interval (so a fleet of sidecars started together
does not probe in lockstep), sends ``<method> <path>`` (GET unless configured; with the
configured Host and extra headers) over its own one-connection
pool (never the pool that carries traffic: Fender's HTTP/1.1 client; for an ``https://`` replica
of an upstream with ``protocol: h2`` or ``auto``, that protocol by ALPN; the gRPC health
protocol always over HTTP/2, ALPN ``h2`` on TLS) and
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
from typing import Any

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
from proxy.cluster.picker import ReplicaPicker, ReplicaState
from proxy.grpc import grpc_status
from proxy.upstream import UpstreamError, UpstreamPool
from proxy.upstream.alpn import AutoPool, auto_pools
from proxy.upstream.http2 import H2Pool

__all__ = ["HealthChecker"]

ALPN_H2 = ("h2",)


class HealthChecker:
    """The probe tasks of one upstream; started by ``start()``, stopped by ``close()``."""

    def __init__(
        self,
        options: HealthCheckOptions,
        picker: ReplicaPicker,
        clock: Clock,
        rng: random.Random | None = None,
        pool_class: type[UpstreamPool] = UpstreamPool,
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
        self._pool_class = pool_class
        self._started = False
        self._grpc_body = _grpc_health_request(options.service) if options.grpc else None
        # Per replica state (by identity): its probe pool, and its task once started.
        self._probes: dict[int, tuple[ReplicaState, UpstreamPool | H2Pool | AutoPool]] = {}
        self._task_of: dict[int, asyncio.Task[None]] = {}
        for state in picker.states:
            self._add(state)

    @property
    def _tasks(self) -> list[asyncio.Task[None]]:
        return list(self._task_of.values())

    @property
    def _pools(self) -> list[UpstreamPool | H2Pool | AutoPool]:
        """The probe pools in the picker's replica order."""
        return [self._probes[id(state)][1] for state in self.picker.states if id(state) in self._probes]

    def _add(self, state: ReplicaState) -> None:
        replica = state.replica
        pool: UpstreamPool | H2Pool | AutoPool
        options: dict[str, Any] = {
            "unix_path": replica.unix_path,
            "max_connections": 1,
            "max_keepalive": 1,
            "connect_timeout": self.options.timeout,
            "keepalive_idle_timeout": max(self.options.interval * 3, 5.0),
            "max_pending": 0,
        }
        tls = replica.tls
        resolve = getattr(replica, "resolve", None)
        if self.options.grpc:  # the standard gRPC health service speaks HTTP/2 (ALPN h2 over TLS)
            client = None if tls is None else tls.client(replica.tls_name, ALPN_H2)
            pool = H2Pool(replica.host, replica.port, tls=client, resolve=resolve, **options)
            self._probes[id(state)] = (state, pool)
            return
        client = None if tls is None else tls.client(replica.tls_name)
        speaks = getattr(replica.pool, "protocol", "http1")
        if client is not None and speaks == "h2":
            # An https:// replica is probed in the protocol it is spoken to (cleartext: HTTP/1.1).
            pool = H2Pool(replica.host, replica.port, tls=client, resolve=resolve, **options)
        elif client is not None and speaks == "auto":
            pool = auto_pools(replica.host, replica.port, client, resolve, self._pool_class, **options)
        else:
            pool = self._pool_class(
                replica.host, replica.port, tls=client, **options, **_resolve_kwargs(replica)
            )
        self._probes[id(state)] = (state, pool)

    def _start_one(self, state: ReplicaState) -> None:
        key = id(state)
        if key not in self._task_of:
            self._task_of[key] = asyncio.create_task(self._run(state), name=f"health-check {state.name}")

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for state, _ in list(self._probes.values()):
            self._start_one(state)

    async def sync(self, added: list[ReplicaState], removed: list[ReplicaState]) -> None:
        """DNS changed the replicas: probe the new ones, stop probing the removed ones."""
        for state in added:
            if id(state) not in self._probes:
                self._add(state)
                if self._started:
                    self._start_one(state)
        stopped: list[asyncio.Task[None] | UpstreamPool | H2Pool | AutoPool] = []
        for state in removed:
            entry = self._probes.pop(id(state), None)
            task = self._task_of.pop(id(state), None)
            if task is not None:
                task.cancel()
                stopped.append(task)
            if entry is not None:
                stopped.append(entry[1])
        for item in stopped:
            if isinstance(item, asyncio.Task):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await item
            else:
                await item.close()

    async def close(self) -> None:
        tasks, self._task_of = list(self._task_of.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(pool.close() for _, pool in self._probes.values()), return_exceptions=True)

    def _wait(self) -> float:
        jitter = self.options.jitter
        return self.options.interval * (1.0 + self._rng.uniform(-jitter, jitter))

    async def _run(self, state: ReplicaState) -> None:
        clock = self.clock
        # The first probe lands somewhere in the first interval (jitter across a fleet).
        await clock.sleep(self._rng.uniform(0.0, self.options.interval * max(self.options.jitter, 0.05)))
        while True:
            started = clock.now()
            result = await self.probe(state)
            self.picker.record_check(state, result, clock.now() - started, clock.now())
            await clock.sleep(self._wait())

    async def probe(self, index: int | ReplicaState) -> str:
        """One probe of one replica (its index or state): PASS, FAIL (unexpected status), TIMEOUT or ERROR."""
        state = self.picker.states[index] if isinstance(index, int) else index
        pool = self._probes[id(state)][1]
        if self._grpc_body is not None:
            return await self._probe_grpc(state, pool)
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

    async def _probe_grpc(self, state: ReplicaState, pool: UpstreamPool | H2Pool | AutoPool) -> str:
        """grpc.health.v1.Health/Check: PASS when the answer is grpc-status 0 with status SERVING."""
        body = self._grpc_body
        assert body is not None
        try:
            response = await pool.request(
                b"POST",
                _GRPC_HEALTH_PATH,
                [
                    (b"host", state.replica.authority),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                    (b"user-agent", b"fender-health-check"),
                ],
                body=body,
                head_timeout=self.options.timeout,
                idle_timeout=self.options.timeout,
            )
        except UpstreamError as error:
            return TIMEOUT if error.reason in ("timeout", "connect_timeout") else ERROR
        body = b""
        try:
            async with asyncio.timeout(self.options.timeout):
                for _ in range(64):
                    chunk = await response.read()
                    if not chunk:
                        break
                    body += chunk
                    if len(body) > 4096:
                        break  # a health answer is a few bytes
        except (UpstreamError, TimeoutError):
            response.close()
            return ERROR
        response.close()
        if response.status != 200:
            return FAIL
        status = grpc_status(response.trailers or response.headers)
        if status != 0:
            return FAIL
        return PASS if _serving(body) else FAIL


_GRPC_HEALTH_PATH = b"/grpc.health.v1.Health/Check"
_SERVING = 1


def _grpc_health_request(service: str) -> bytes:
    """A gRPC message holding HealthCheckRequest{service} (protobuf field 1, a string)."""
    name = service.encode()
    message = (b"\x0a" + _varint(len(name)) + name) if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _serving(body: bytes) -> bool:
    """The HealthCheckResponse in a gRPC body says SERVING (field 1, varint, value 1)."""
    if len(body) < 5 or body[0] != 0:
        return False
    message = body[5 : 5 + int.from_bytes(body[1:5], "big")]
    # Tag 0x08 is field 1 as a varint; SERVING is 1 (one byte). UNKNOWN (0) is the empty message.
    return len(message) >= 2 and message[0] == 0x08 and message[1] == _SERVING


def _resolve_kwargs(replica: Any) -> dict[str, Any]:
    """A replica given by host name connects through the DNS name cache (see proxy.cluster.dns)."""
    resolve = getattr(replica, "resolve", None)
    return {} if resolve is None else {"resolve": resolve}
