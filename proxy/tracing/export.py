"""Batched background export of finished spans to an OTLP/HTTP collector.

The request path appends each span's encoded bytes to a bounded deque (or
counts it dropped when the deque is full); one background task sends them.
It waits until a batch's worth (``BATCH``) is queued or ``INTERVAL`` has passed
since the last export, then POSTs everything queued (up to ``MAX_BATCH``) in
one request: under load a post carries hundreds of spans, never a few (sending
again as soon as one post returned made a post per two or three spans and cost
more than the requests, measured at 100% sampling). A slow or down collector
costs requests nothing: the queue fills, further spans are dropped and counted.

The POST goes over a kept-alive connection of :class:`OtlpHttpClient`, a
minimal HTTP/1.1 client on asyncio streams: an export request is one write and
one response head to read, where httpx's general client cost ~15 times the
instructions per post (counted under callgrind). Nothing here blocks the event
loop: no encoding is left to do (the spans are encoded as they end, a few
microseconds each) and every wait is an await.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from urllib.parse import urlsplit

from proxy import __version__
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.tracing.spans import export_request, scope_header

log = logging.getLogger("fender")

BATCH = 512  # spans that make an export start before INTERVAL is up (the OpenTelemetry SDK's batch size)
MAX_BATCH = 4096  # spans in one export request at most (~1.5 MB; collectors accept 4-20 MiB)
INTERVAL = 1.0  # seconds between exports of a batch that is not full
TIMEOUT = 10.0  # per export request
ATTEMPTS = 3  # per batch, with backoff between them; then the batch is dropped
BACKOFF = 0.5  # first wait between attempts, doubled each time
WARN_EVERY = 60.0  # at most one warning about an unreachable collector per this many seconds
MAX_RESPONSE_BODY = 1 << 20  # a collector answers a few bytes; past this the connection is dropped


class ExportError(Exception):
    """An export request got no HTTP answer (connection refused or lost, timeout, a malformed reply)."""


class OtlpHttpClient:
    """POSTs protobuf bodies to one OTLP/HTTP URL over a kept-alive HTTP/1.1 connection (http or https).

    Environment proxy settings (HTTPS_PROXY) are not used: the collector is reached directly.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or ""
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"POST {target} HTTP/1.1",
            f"host: {parts.netloc.rpartition('@')[2]}",
            "content-type: application/x-protobuf",
            f"user-agent: fender/{__version__}",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1", "replace")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> int:
        """The response status; raises ExportError when there is none."""
        try:
            async with asyncio.timeout(self._timeout):
                reused = self._writer is not None
                try:
                    return await self._exchange(body)
                except (OSError, asyncio.IncompleteReadError):
                    self.close()
                    if not reused:
                        raise
                    # The collector closed the kept-alive connection meanwhile: once more, afresh.
                    return await self._exchange(body)
        except TimeoutError:
            self.close()
            raise ExportError(f"no answer within {self._timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
            self.close()
            raise ExportError(f"{type(error).__name__}: {error}"[:200]) from None

    async def _exchange(self, body: bytes) -> int:
        if self._writer is None:
            if self._tls and self._ssl is None:
                self._ssl = ssl.create_default_context()
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._ssl if self._tls else None
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(b"%s%d\r\n\r\n" % (self._head, len(body)))
        writer.write(body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")  # StreamReader's limit (64 KiB) bounds it
        status_line, _, fields = head.partition(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise ValueError(f"not an HTTP/1.x response: {status_line[:60]!r}")
        status = int(rest[:3])
        length = None
        chunked = close = False
        for line in fields.lower().split(b"\r\n"):
            name, _, value = line.partition(b":")
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"connection":
                close = b"close" in value
        if chunked:
            await self._skip_chunked(reader)
        elif length is not None:
            if length > MAX_RESPONSE_BODY:
                raise ValueError(f"response body of {length} bytes")
            await reader.readexactly(length)
        else:
            close = True  # the body runs to the end of the connection: not read, the connection closed
        if close or version == b"HTTP/1.0":
            self.close()
        return status

    async def _skip_chunked(self, reader: asyncio.StreamReader) -> None:
        total = 0
        while True:  # bounded: MAX_RESPONSE_BODY bytes at most
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            total += size
            if total > MAX_RESPONSE_BODY:
                raise ValueError("chunked response body too large")
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailer fields
                    total += 1
                    if total > MAX_RESPONSE_BODY:
                        raise ValueError("too many trailer fields")
                return
            await reader.readexactly(size + 2)

    def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()


class SpanExporter:
    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        service_name: str,
        queue_size: int,
        metrics,
        clock: Clock = SYSTEM_CLOCK,
        interval: float = INTERVAL,
    ) -> None:
        self.url = url
        self._headers = headers
        self._header = scope_header(service_name, __version__)
        self._cap = queue_size
        self._interval = interval
        self.queue: deque[bytes] = deque()
        self.posts = 0  # export requests sent (tests check the batching with it)
        self._exported = metrics.trace_spans_exported
        self._full = metrics.trace_spans_dropped.labels("queue_full")
        self._failed = metrics.trace_spans_dropped.labels("export_failed")
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._warned_at: float | None = None

    def add(self, span: bytes) -> None:
        """Queue one encoded span (proxy.tracing.spans.span), or count it dropped when the queue is full."""
        queue = self.queue
        if len(queue) >= self._cap:
            self._full.inc()
            return
        queue.append(span)
        n = len(queue)
        if n == BATCH or n == 1:  # a batch's worth, or the first span the idle task waits for
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fender-trace-export")

    async def close(self) -> None:
        """Stop the export task, sending what is queued with one last attempt (each post bounded by TIMEOUT)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        client = OtlpHttpClient(self.url, self._headers)
        try:
            while self.queue:  # bounded: each pass takes up to MAX_BATCH spans off a queue nobody adds to
                if not await self._send(client, self._take(), attempts=1):
                    # The collector is down or slow: do not wait TIMEOUT for each batch left.
                    self._failed.inc(len(self.queue))
                    self.queue.clear()
        finally:
            client.close()

    def _take(self) -> list[bytes]:
        queue = self.queue
        if len(queue) <= MAX_BATCH:
            batch = list(queue)
            queue.clear()
            return batch
        return [queue.popleft() for _ in range(MAX_BATCH)]

    async def _run(self) -> None:
        client = OtlpHttpClient(self.url, self._headers)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.queue:  # idle: no timer until a span arrives
                    self._wake.clear()
                    await self._wake.wait()
                # Until a batch's worth is queued, or INTERVAL after the first span came.
                due = loop.time() + self._interval
                while len(self.queue) < BATCH:
                    self._wake.clear()
                    left = due - loop.time()
                    if left <= 0:
                        break
                    try:
                        async with asyncio.timeout(left):
                            await self._wake.wait()
                    except TimeoutError:
                        break
                if self.queue:
                    await self._send(client, self._take(), ATTEMPTS)
        finally:
            client.close()

    async def _send(self, client: OtlpHttpClient, batch: list[bytes], attempts: int) -> bool:
        """Whether the collector took ``batch``; a batch it did not take is counted dropped."""
        body = export_request(batch, self._header)
        wait = BACKOFF
        problem = ""
        for attempt in range(attempts):
            if attempt:
                await self._clock.sleep(wait)
                wait *= 2
            self.posts += 1
            try:
                status = await client.post(body)
            except ExportError as error:
                problem = str(error)
                continue
            if status < 300:
                self._exported.inc(len(batch))
                return True
            problem = f"HTTP {status}"
            if status < 500 and status != 429:
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
        return False
