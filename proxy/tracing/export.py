"""Batched background export of finished spans to an OTLP/HTTP collector.

The request path only appends a span to a bounded deque (or counts it dropped
when the deque is full); one background task takes batches off it, encodes
them in a worker thread and POSTs them. A slow or down collector therefore
costs requests nothing: the queue fills, further spans are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import httpx

from proxy import __version__
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.tracing.spans import Span, encode

log = logging.getLogger("fender")

BATCH = 512  # spans per export request (the OpenTelemetry SDK's default batch size)
SLICE = 64  # spans encoded at a time between two turns of the event loop (about half a millisecond)
INTERVAL = 1.0  # seconds between exports of a batch that is not full
TIMEOUT = 10.0  # per export request
ATTEMPTS = 3  # per batch, with backoff between them; then the batch is dropped
BACKOFF = 0.5  # first wait between attempts, doubled each time
WARN_EVERY = 60.0  # at most one warning about an unreachable collector per this many seconds


class SpanExporter:
    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        service_name: str,
        queue_size: int,
        metrics,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.url = url
        self._headers = {"content-type": "application/x-protobuf", **headers}
        self._service = service_name
        self._cap = queue_size
        self.queue: deque[Span] = deque()
        self._exported = metrics.trace_spans_exported
        self._full = metrics.trace_spans_dropped.labels("queue_full")
        self._failed = metrics.trace_spans_dropped.labels("export_failed")
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._warned_at: float | None = None

    def add(self, span: Span) -> None:
        queue = self.queue
        if len(queue) >= self._cap:
            self._full.inc()
            return
        queue.append(span)
        if len(queue) == BATCH:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fender-trace-export")

    async def close(self) -> None:
        """Stop the export task, sending what is queued with one last attempt (bounded by TIMEOUT)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self.queue:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                while self.queue:
                    await self._send(client, self._take(), attempts=1)

    def _take(self) -> list[Span]:
        queue = self.queue
        return [queue.popleft() for _ in range(min(BATCH, len(queue)))]

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            while True:
                if len(self.queue) < BATCH:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(INTERVAL):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                while self.queue:
                    await self._send(client, self._take(), ATTEMPTS)

    async def _send(self, client: httpx.AsyncClient, batch: list[Span], attempts: int) -> None:
        # Encoded in the event loop a slice at a time, yielding between slices: a worker thread
        # contended for the GIL with the loop and cost requests more (measured with
        # tests/bench/tracing.py). Serialised protobuf messages concatenate into one whose
        # repeated fields hold both parts', so the slices make one export request.
        parts = []
        for start in range(0, len(batch), SLICE):
            parts.append(encode(batch[start : start + SLICE], self._service, __version__))
            await asyncio.sleep(0)
        body = b"".join(parts)
        wait = BACKOFF
        problem = ""
        for attempt in range(attempts):
            if attempt:
                await self._clock.sleep(wait)
                wait *= 2
            try:
                response = await client.post(self.url, content=body, headers=self._headers)
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"[:200]
                continue
            if response.status_code < 300:
                self._exported.inc(len(batch))
                return
            problem = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code != 429:
                break  # the collector refuses this request as such: trying again would not help
        self._failed.inc(len(batch))
        now = self._clock.now()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(
                "tracing: could not export %d spans to %s (%s); dropping them (fender_trace_spans_dropped_total)",
                len(batch),
                self.url,
                problem,
            )
