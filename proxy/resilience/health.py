"""Active health checks: one background task per replica, probing an HTTP path.

Each task sleeps a jittered interval (so a fleet of sidecars started together
does not probe in lockstep), sends ``GET <path>`` over its own one-connection
pool (Fender's HTTP/1.1 client, never the pool that carries traffic) and
reports pass or fail to the replica picker, which owns the state machine
(``healthy_threshold`` passes in a row to come back, ``unhealthy_threshold``
fails in a row to go down). Time comes from the injected clock; the probe
itself is bounded by ``timeout`` in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator, model_validator

from proxy.clock import Clock
from proxy.config.base import Count, PolicyModel, Text, keep_ordered
from proxy.config.units import Duration, Percent, describe_value, format_duration, policy_error
from proxy.grpc import grpc_status
from proxy.upstream import UpstreamError, UpstreamPool
from proxy.upstream.http2 import H2Pool

if TYPE_CHECKING:
    from proxy.resilience.failover import ReplicaPicker

__all__ = ["HealthCheckOptions", "HealthChecker", "parse_status_ranges"]

_RANGE_RE = re.compile(r"([1-5][0-9]{2})(?:-([1-5][0-9]{2}))?")


def parse_status_ranges(items: tuple[Any, ...]) -> tuple[tuple[int, int], ...]:
    """``[200, "300-399"]`` -> ``((200, 200), (300, 399))``; refuses anything else with a hint."""
    out = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            text = str(item)
        elif isinstance(item, str):
            text = item.strip()
        else:
            raise policy_error(
                f"expected a status like 200 or a range like 200-299, got {describe_value(item)}"
            )
        match = _RANGE_RE.fullmatch(text)
        if match is None:
            raise policy_error(f"{describe_value(item)} is not a status (100-599) or a range like 200-299")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if high < low:
            raise policy_error(f"{describe_value(item)}: the range is backwards (write {high}-{low})")
        out.append((low, high))
    return tuple(out)


StatusRange = Annotated[
    int | Text,
    Field(json_schema_extra={"examples": [200, "200-299"]}),
]


class HealthCheckOptions(PolicyModel):
    """Active health checks: Fender probes each replica in the background."""

    path: Text = Field(
        default="/healthz",
        json_schema_extra={"pattern": "^/"},
        description="Path probed with GET on each replica (the query string may be included).",
    )
    interval: Annotated[Duration, Field(gt=0)] = Field(
        default="2s",
        description=(
            "Time between two probes of one replica (HAProxy's inter, 2s). Detection of a dead replica takes "
            "about interval x unhealthy_threshold; failback about interval x healthy_threshold."
        ),
    )
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="1s",
        description=(
            "A probe with no complete response head within this long fails (connect included); this is "
            "what catches a black hole that accepts connections but never answers. Must not exceed interval; "
            "when only interval is written and it is shorter than 1s, the timeout defaults to it (and a "
            "written timeout above the default interval raises the interval to it)."
        ),
    )
    jitter: Percent = Field(
        default="10%",
        description=(
            "Each wait is interval +/- this share, chosen at random, and the first probe waits a random part "
            "of jitter x interval (at least 5%), so a fleet of sidecars does not probe in lockstep."
        ),
    )
    healthy_threshold: Count = Field(
        default=2,
        ge=1,
        le=100,
        description="Passing probes in a row that bring an unhealthy (or ejected) replica back (HAProxy's rise).",
    )
    unhealthy_threshold: Count = Field(
        default=3,
        ge=1,
        le=100,
        description="Failing probes in a row that take a healthy replica out of rotation (HAProxy's fall).",
    )
    expect_status: tuple[StatusRange, ...] = Field(
        default=("200-299",),
        min_length=1,
        description='Statuses that count as a pass: single codes (204) or ranges ("200-299"). Anything else fails.',
    )

    grpc: bool = Field(
        default=False,
        description=(
            "Probe with the standard gRPC health protocol (grpc.health.v1.Health/Check over HTTP/2, "
            "whatever the upstream's protocol) instead of GET path: a pass is the status SERVING; "
            "path and expect_status are then unused."
        ),
    )
    service: Text = Field(
        default="",
        max_length=200,
        description='With grpc: true, the service name asked about; "" (the default) is the server as a whole.',
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in " \t\r\n#"):
            raise policy_error(f'{describe_value(value)} must start with "/" and contain no spaces or "#"')
        return value

    @field_validator("expect_status")
    @classmethod
    def _check_statuses(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        parse_status_ranges(value)
        return value

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthCheckOptions:
        keep_ordered(
            self,
            "timeout",
            "interval",
            f"timeout ({format_duration(self.timeout)}) cannot exceed interval "
            f"({format_duration(self.interval)}): probes of one replica would overlap",
            "timeout",
        )
        return self


# Probe results, also the `result` label of fender_health_checks_total.
PASS, FAIL, TIMEOUT, ERROR = "pass", "fail", "timeout", "error"
RESULTS = (PASS, FAIL, TIMEOUT, ERROR)


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
        self._tasks: list[asyncio.Task] = []
        pool_class = H2Pool if options.grpc else UpstreamPool
        self._grpc_body = _grpc_health_request(options.service) if options.grpc else None
        self._pools = [
            pool_class(
                state.replica.host,
                state.replica.port,
                unix_path=state.replica.unix_path,
                max_connections=1,
                max_keepalive=1,
                connect_timeout=options.timeout,
                keepalive_idle_timeout=max(options.interval * 3, 5.0),
                max_pending=0,
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
        if self._grpc_body is not None:
            return await self._probe_grpc(index)
        pool = self._pools[index]
        state = self.picker.states[index]
        try:
            response = await pool.request(
                b"GET",
                self._target,
                [(b"host", state.replica.authority), (b"user-agent", b"fender-health-check")],
                head_timeout=self.options.timeout,
                idle_timeout=self.options.timeout,
            )
        except UpstreamError as error:
            return TIMEOUT if error.reason in ("timeout", "connect_timeout") else ERROR
        try:
            async with asyncio.timeout(self.options.timeout):
                while await response.read():
                    pass
        except (UpstreamError, TimeoutError):
            response.close()
        status = response.status
        for low, high in self._ranges:
            if low <= status <= high:
                return PASS
        return FAIL

    async def _probe_grpc(self, index: int) -> str:
        """grpc.health.v1.Health/Check: PASS when the answer is grpc-status 0 with status SERVING."""
        pool = self._pools[index]
        state = self.picker.states[index]
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
                body=self._grpc_body,
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
