"""Tracing's hand-written OTLP encoding (decoded by the official definitions) and its exporter's batching."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from prometheus_client import generate_latest

from proxy.metrics import Metrics
from proxy.tracing import spans
from proxy.tracing.export import BATCH, MAX_BATCH, ExportError, OtlpHttpClient, SpanExporter
from tests.support.metrics import metric_value
from tests.support.otlp_receiver import OtlpReceiver, attributes

TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
PARENT = bytes.fromhex("00f067aa0ba902b7")
SPAN = bytes.fromhex("a3ce929d0e0e4736")


def value(metrics: Metrics, name: str, **labels) -> float:
    return metric_value(generate_latest(metrics.registry).decode(), name, **labels)


def decode(encoded_spans: list[bytes], service: str = "svc", version: str = "1.2.3"):
    body = spans.export_request(encoded_spans, spans.scope_header(service, version))
    return ExportTraceServiceRequest.FromString(body)


def test_a_span_with_every_field_decodes_with_the_official_definitions():
    long_path = b"/" + b"x" * 20_000  # lengths of three varint bytes
    attrs = b"".join(
        [
            spans.attribute("a.bool", True),
            spans.attribute("a.false", False),
            spans.attribute("a.int", 200),
            spans.attribute("a.big", 2**62),
            spans.attribute("a.negative", -5),
            spans.attribute("a.float", 1.5),
            spans.attribute("a.str", "päth"),
            spans.attribute("a.latin1", b"caf\xe9"),  # header bytes: latin-1 on the wire
            spans.string_attribute(spans.key_field("url.path"), b"/short"),
            spans.string_attribute(spans.key_field("url.long"), long_path),
            spans.double_head("fender.backoff_ms") + spans.pack_double(12.25),
            spans.cached({}, 4, "http.request.method", "GET"),
        ]
    )
    extra = spans.events(
        [
            (15, b"retry 1 after 503", b""),
            (16, b"breaker_open", spans.event_attribute("fender.upstream", "up")),
        ]
    ) + spans.error_status(b"HTTP 503")
    server = spans.span(
        spans.span_head(TRACE, PARENT, b"vendor=abc"),
        SPAN,
        spans.name_and_kind("GET route", spans.SERVER),
        10,
        2**63 + 5,  # fixed64 takes the whole unsigned range
        attrs,
        extra,
    )
    client = spans.span(
        spans.span_head(TRACE, SPAN), PARENT, spans.name_and_kind("GET", spans.CLIENT), 11, 19, b""
    )
    request = decode([server, client], service="fender-ü")
    (resource_spans,) = request.resource_spans
    assert {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes} == {
        "service.name": "fender-ü"
    }
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("fender", "1.2.3")
    s, c = scope_spans.spans
    assert (s.trace_id, s.span_id, s.parent_span_id, s.trace_state) == (TRACE, SPAN, PARENT, "vendor=abc")
    assert (s.name, s.kind) == ("GET route", SpanProto.SPAN_KIND_SERVER)
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (10, 2**63 + 5)
    assert attributes(s) == {
        "a.bool": True,
        "a.false": False,
        "a.int": 200,
        "a.big": 2**62,
        "a.negative": -5,
        "a.float": 1.5,
        "a.str": "päth",
        "a.latin1": "café",
        "url.path": "/short",
        "url.long": long_path.decode(),
        "fender.backoff_ms": 12.25,
        "http.request.method": "GET",
    }
    assert [(e.time_unix_nano, e.name, attributes(e)) for e in s.events] == [
        (15, "retry 1 after 503", {}),
        (16, "breaker_open", {"fender.upstream": "up"}),
    ]
    assert (s.status.code, s.status.message) == (2, "HTTP 503")
    assert (c.trace_id, c.span_id, c.parent_span_id, c.trace_state) == (TRACE, PARENT, SPAN, "")
    assert (c.name, c.kind, c.start_time_unix_nano, c.end_time_unix_nano) == ("GET", 3, 11, 19)
    assert list(c.attributes) == [] and c.status.code == 0


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**35, 2**63 - 1, -1, -(2**63)])
def test_varints_round_trip_through_the_official_decoder(n):
    encoded = spans.span(spans.span_head(TRACE, b""), SPAN, b"", 0, 0, spans.attribute("n", n))
    (resource_spans,) = decode([encoded]).resource_spans
    assert attributes(resource_spans.scope_spans[0].spans[0]) == {"n": n}


def test_spans_of_every_size_around_the_two_byte_length_frame():
    # A span's frame length is written fast for 128..16383 bytes and generically otherwise.
    encoded = [
        spans.span(spans.span_head(TRACE, b""), SPAN, b"", 0, 0, spans.attribute("p", "x" * size))
        for size in (1, 60, 100, 16_300, 16_400)
    ]
    decoded = decode(encoded).resource_spans[0].scope_spans[0].spans
    assert [len(attributes(s)["p"]) for s in decoded] == [1, 60, 100, 16_300, 16_400]


def test_unsampled_traceparents_come_in_blocks_of_valid_distinct_ids():
    from proxy.tracing.context import parse_traceparent
    from proxy.tracing.tracer import _traceparents

    first, second = _traceparents(), _traceparents()
    headers = first + second
    parsed = [parse_traceparent(h) for h in headers]
    assert all(p is not None and p[2] is False for p in parsed), headers[:3]
    assert all(len(h) == 55 and h.startswith(b"00-") and h.endswith(b"-00") for h in headers)
    assert len({p[0] for p in parsed}) == len(headers) == 512  # every trace id fresh
    # One parent span id per block (span ids are unique within a trace; these are all different traces).
    assert len({p[1] for p in parsed[:256]}) == len({p[1] for p in parsed[256:]}) == 1
    assert parsed[0][1] != parsed[256][1]


# --------------------------------------------------------------------------- the exporter


async def wait_until(predicate, what: str) -> None:
    for _ in range(500):  # bounded: 5 s
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still not {what}")


def one_span(i: int) -> bytes:
    return spans.span(spans.span_head(TRACE, b""), i.to_bytes(8, "big"), b"", i, i, b"")


async def test_spans_queued_while_a_post_is_out_wait_for_a_batch_not_a_post_each():
    metrics = Metrics()
    async with OtlpReceiver() as collector:
        exporter = SpanExporter(collector.url + "/v1/traces", {}, "svc", 10_000, metrics, interval=60.0)
        exporter.start()
        try:
            collector.hold.clear()  # the first export waits at the collector
            for i in range(BATCH + 100):
                exporter.add(one_span(i))
            await wait_until(lambda: collector.connections == 1 and not exporter.queue, "posting")
            for i in range(300):  # under a batch, arriving while the post is out
                exporter.add(one_span(i))
            collector.hold.set()
            await collector.wait_for(lambda got: len(got) == BATCH + 100)
            await wait_until(lambda: value(metrics, "fender_trace_spans_exported_total") > 0, "done")
            # Once the post returned, the 300 were not sent at once: they wait for a batch or the interval.
            assert len(exporter.queue) == 300
            assert exporter.posts == 1
        finally:
            await exporter.close()  # sends what is queued, once
        await collector.wait_for(lambda got: len(got) == BATCH + 400)
    assert exporter.posts == 2 and not exporter.queue
    assert collector.connections == 2  # the export task's kept-alive one, then close()'s
    assert value(metrics, "fender_trace_spans_exported_total") == BATCH + 400


async def test_a_full_queue_drops_and_counts_and_close_stops_with_the_collector_gone():
    metrics = Metrics()
    async with OtlpReceiver() as collector:
        url = collector.url + "/v1/traces"
    cap = MAX_BATCH + 3
    exporter = SpanExporter(url, {}, "svc", cap, metrics, interval=60.0)  # the collector is gone now
    exporter.start()
    for i in range(cap + 2):
        exporter.add(one_span(i))
    assert len(exporter.queue) == cap
    assert value(metrics, "fender_trace_spans_dropped_total", reason="queue_full") == 2
    async with asyncio.timeout(5):
        await exporter.close()
    assert exporter._task is None and not exporter.queue
    assert value(metrics, "fender_trace_spans_dropped_total", reason="export_failed") == cap
    assert exporter.posts == 1  # close() tries once, and not again for the second batch


async def test_the_client_reuses_its_connection_reads_chunked_replies_and_reconnects_after_a_close():
    heads: list[bytes] = []
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if len(heads) == 1:
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                elif len(heads) == 2:
                    writer.write(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy")
                    await writer.drain()
                    break
                else:
                    writer.write(b"HTTP/1.1 400 Bad\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = OtlpHttpClient(f"http://127.0.0.1:{port}/v1/traces", {"x-api-key": "secret"}, timeout=5)
    try:
        assert await client.post(b"\x0a\x00") == 200
        assert await client.post(b"") == 503
        assert await client.post(b"abc") == 400
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert accepted == 2  # the first two posts on one connection; the third after the server closed it
    assert all(h.startswith(b"POST /v1/traces HTTP/1.1\r\n") for h in heads)
    assert b"x-api-key: secret\r\n" in heads[0] and b"content-type: application/x-protobuf" in heads[0]
    assert b"content-length: 3\r\n" in heads[2]


async def test_the_client_reports_a_refused_connection_and_a_reply_that_is_not_http():
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-nope\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = OtlpHttpClient(f"http://127.0.0.1:{port}", {}, timeout=5)
    try:
        with pytest.raises(ExportError, match="not an HTTP/1.x response"):
            await client.post(b"")
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    refused = OtlpHttpClient(f"http://127.0.0.1:{port}", {}, timeout=5)
    with pytest.raises(ExportError):
        await refused.post(b"")
