"""A real OTLP/HTTP trace receiver for tests: decodes export requests with opentelemetry-proto.

    async with OtlpReceiver() as collector:
        ...  # tracing: {otlp_endpoint: collector.url}
        await collector.wait_for(lambda spans: len(spans) >= 2)

``hold`` (an asyncio.Event, set by default) makes every export wait until it is
set: a slow collector. Each export request's headers are kept in ``headers``.
"""

from __future__ import annotations

import asyncio

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list = []  # opentelemetry.proto.trace.v1.trace_pb2.Span, in arrival order
        self.resources: list = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.connections = 0  # accepted, over the receiver's life
        self.hold = asyncio.Event()
        self.hold.set()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> OtlpReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.hold.set()
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.spans))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self.hold.wait()
                request = ExportTraceServiceRequest.FromString(body)
                async with self._changed:
                    self.paths.append(path)
                    self.headers.append(headers)
                    for resource_spans in request.resource_spans:
                        self.resources.append(resource_spans.resource)
                        for scope_spans in resource_spans.scope_spans:
                            self.spans.extend(scope_spans.spans)
                    self._changed.notify_all()
                reply = ExportTraceServiceResponse().SerializeToString()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(reply), reply)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the exporter closed its connection, or the test ended
        finally:
            self._connections.discard(task)
            writer.close()


def attributes(span) -> dict:
    """A span's (or event's) attributes as a plain dict of Python values."""
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out
