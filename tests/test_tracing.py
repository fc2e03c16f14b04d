"""Distributed tracing: W3C Trace Context through Fender and spans exported to a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import pytest

from proxy.config import parse_policy
from proxy.config.loader import PolicyError
from proxy.metrics import Metrics
from proxy.tracing.context import format_traceparent, parse_traceparent
from proxy.tracing.tracer import Tracer
from tests.conftest import free_port, policy_text
from tests.support.metrics import get_metrics, metric_value
from tests.support.otlp_receiver import OtlpReceiver, attributes
from tests.support.raw_upstream import RawUpstream, ok, sequence, status

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SERVER, CLIENT = 2, 3  # SpanKind values of the OTLP protocol


def tracing(endpoint: str, sample: str = "100%", extra: str = "") -> str:
    return f"tracing: {{otlp_endpoint: '{endpoint}', sample: '{sample}', service_name: fender-test{extra}}}\n"


def traced(endpoint: str, port: int, routes: str = "", sample: str = "100%", extra: str = "") -> str:
    return tracing(endpoint, sample, extra) + policy_text(port, routes=routes)


def of_trace(spans, trace_hex: str, kind: int | None = None) -> list:
    return [s for s in spans if s.trace_id.hex() == trace_hex and (kind is None or s.kind == kind)]


def upstream_traceparent(up: RawUpstream, index: int = -1) -> tuple[bytes, bytes, bool]:
    value = up.requests[index].header(b"traceparent")
    assert value is not None
    parsed = parse_traceparent(value)
    assert parsed is not None, value
    return parsed


# --------------------------------------------------------------------------- trace context


def test_traceparent_parsing_follows_the_w3c_rules():
    good = f"00-{TRACE}-{PARENT}-01".encode()
    assert parse_traceparent(good) == (bytes.fromhex(TRACE), bytes.fromhex(PARENT), True)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00".encode())[2] is False
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01-later".encode())[0] == bytes.fromhex(TRACE)
    for bad in (
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}",
        "garbage",
    ):
        assert parse_traceparent(bad.encode()) is None, bad
    assert (
        format_traceparent(bytes.fromhex(TRACE), bytes.fromhex(PARENT), False)
        == f"00-{TRACE}-{PARENT}-00".encode()
    )


def test_a_bad_tracing_section_is_refused_with_its_location():
    text = "tracing:\n  otlp_endpoint: ftp://collector\n" + policy_text(9)
    with pytest.raises(PolicyError, match=r"test.yaml:2:\d+.*otlp_endpoint must be an http"):
        parse_policy(text, "test.yaml")
    text = "tracing:\n  otlp_endpoint: http://c:4318\n  headers: {x-key: '${FENDER_TEST_UNSET_KEY}'}\n"
    with pytest.raises(PolicyError, match="FENDER_TEST_UNSET_KEY is not set"):
        parse_policy(text + policy_text(9), "test.yaml")
    text = 'tracing:\n  otlp_endpoint: http://c:4318\n  headers: {x-key: "a\\r\\nx-evil: 1"}\n'
    with pytest.raises(PolicyError, match=r"test.yaml:3:\d+.*control character"):
        parse_policy(text + policy_text(9), "test.yaml")


async def test_without_tracing_traceparent_passes_through_untouched(start_fender):
    async with RawUpstream(ok()) as up:
        fender = await start_fender(policy_text(up.port))
        sent = f"00-{TRACE}-{PARENT}-01"
        async with httpx.AsyncClient() as client:
            assert (await client.get(fender.url + "/", headers={"traceparent": sent})).status_code == 200
            assert (await client.get(fender.url + "/")).status_code == 200
    assert up.requests[0].header(b"traceparent") == sent.encode()
    assert up.requests[1].header(b"traceparent") is None
    pipeline = fender.dataplane.runtime.routes[0].pipeline
    assert "Span" not in type(pipeline.__self__).__name__


async def test_a_sampled_parent_is_continued_and_the_upstream_sees_fenders_span(start_fender, caplog):
    caplog.set_level(logging.INFO, "fender.access")
    async with OtlpReceiver() as collector, RawUpstream(ok()) as up:
        text = traced(collector.url, up.port, sample="0%").replace(
            "listen:", "server: {access_log: true}\nlisten:", 1
        )
        fender = await start_fender(text)
        headers = {
            "traceparent": f"00-{TRACE}-{PARENT}-01",
            "tracestate": "vendor=abc",
            "fender-explain": "1",
        }
        async with httpx.AsyncClient() as client:
            response = await client.get(fender.url + "/items?x=1", headers=headers)
        assert response.status_code == 200
        await collector.wait_for(lambda spans: len(of_trace(spans, TRACE)) == 2)
    server = of_trace(collector.spans, TRACE, SERVER)[0]
    client_span = of_trace(collector.spans, TRACE, CLIENT)[0]
    assert server.parent_span_id.hex() == PARENT
    assert server.trace_state == "vendor=abc"
    assert client_span.parent_span_id == server.span_id
    # The upstream's parent is Fender's client span for that try; tracestate goes along unchanged.
    assert upstream_traceparent(up) == (bytes.fromhex(TRACE), client_span.span_id, True)
    assert up.requests[0].header(b"tracestate") == b"vendor=abc"
    a = attributes(server)
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/items" and a["url.query"] == "x=1"
    assert a["http.response.status_code"] == 200
    assert (a["fender.route"], a["fender.upstream"], a["fender.tries"]) == ("all", "echo", 1)
    resource = {kv.key: kv.value.string_value for kv in collector.resources[0].attributes}
    assert resource["service.name"] == "fender-test"
    assert collector.paths[0] == "/v1/traces"
    assert f"trace {TRACE}" in response.headers["fender-trace"]
    assert any(f"trace={TRACE}" in r.getMessage() for r in caplog.records if r.name == "fender.access")


async def test_an_unsampled_parent_is_not_recorded_but_still_propagated(start_fender, caplog):
    caplog.set_level(logging.INFO, "fender.access")
    async with OtlpReceiver() as collector, RawUpstream(ok()) as up:
        text = traced(collector.url, up.port, sample="100%")
        fender = await start_fender(text.replace("listen:", "server: {access_log: true}\nlisten:", 1))
        async with httpx.AsyncClient() as client:
            unsampled = {"traceparent": f"00-{TRACE}-{PARENT}-00"}
            assert (await client.get(fender.url + "/", headers=unsampled)).status_code == 200
            # A sampled request after it: once its spans arrived, the first one's would have too.
            other = "0af7651916cd43dd8448eb211c80319c"
            sampled = {"traceparent": f"00-{other}-{PARENT}-01"}
            assert (await client.get(fender.url + "/", headers=sampled)).status_code == 200
        await collector.wait_for(lambda spans: len(of_trace(spans, other)) == 2)
    assert of_trace(collector.spans, TRACE) == []
    trace_id, span_id, flag = upstream_traceparent(up, 0)
    assert (trace_id.hex(), flag) == (TRACE, False)
    assert span_id.hex() != PARENT  # Fender is the upstream's parent even when not recording
    lines = [r.getMessage() for r in caplog.records if r.name == "fender.access"]
    assert f"trace={TRACE}" in lines[0]


async def test_new_roots_are_sampled_at_the_configured_rate_with_a_seeded_sampler(start_fender):
    requests, seed = 60, 1234
    # The sampled places the seeded sampler gives (geometric gaps: see Tracer.gap), taken from
    # a tracer of the same options.
    options = parse_policy(traced("http://127.0.0.1:9", 9, sample="30%", extra=f", sample_seed: {seed}"))
    schedule = Tracer(options.tracing, Metrics())
    places = [schedule.next_new_trace() is None for _ in range(requests)]
    expected = sum(places)
    assert 0 < expected < requests
    async with OtlpReceiver() as collector, RawUpstream(ok()) as up:
        fender = await start_fender(
            traced(collector.url, up.port, sample="30%", extra=f", sample_seed: {seed}")
        )
        async with httpx.AsyncClient() as client:
            for i in range(requests):
                assert (await client.get(fender.url + f"/{i}")).status_code == 200
            sentinel = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
            assert (await client.get(fender.url + "/last", headers=sentinel)).status_code == 200
        await collector.wait_for(lambda spans: len(of_trace(spans, TRACE)) == 2)
    roots = [s for s in collector.spans if s.kind == SERVER and s.trace_id.hex() != TRACE]
    assert len(roots) == expected
    assert all(s.parent_span_id == b"" for s in roots)
    assert len({s.trace_id for s in roots}) == expected
    # Every request got a fresh trace id, sampled or not (flag 01 exactly for the sampled ones).
    contexts = [upstream_traceparent(up, i) for i in range(requests)]
    assert [c[2] for c in contexts] == places
    assert len({c[0] for c in contexts}) == requests
    assert {c[0] for c in contexts if c[2]} == {s.trace_id for s in roots}


RETRY_ROUTE = """
- name: all
  upstream: echo
  retry:
    attempts: 3
    backoff: {initial: 30ms, max: 30ms, jitter: none}
"""


async def test_a_retried_request_has_one_client_span_per_try_with_its_backoff(start_fender):
    async with OtlpReceiver() as collector, RawUpstream(sequence(status(503), status(503), ok())) as up:
        fender = await start_fender(traced(collector.url, up.port, RETRY_ROUTE))
        async with httpx.AsyncClient() as client:
            response = await client.get(fender.url + "/", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        assert response.status_code == 200
        await collector.wait_for(lambda spans: len(of_trace(spans, TRACE)) == 4)
    server = of_trace(collector.spans, TRACE, SERVER)[0]
    tries = sorted(of_trace(collector.spans, TRACE, CLIENT), key=lambda s: s.start_time_unix_nano)
    assert len(tries) == 3 == len(up.requests)
    found = [attributes(s) for s in tries]
    assert [a["fender.attempt"] for a in found] == [1, 2, 3]
    assert [a["http.response.status_code"] for a in found] == [503, 503, 200]
    assert [a.get("http.request.resend_count") for a in found] == [None, 1, 2]
    assert {a["fender.replica"] for a in found} == {f"127.0.0.1:{up.port}"}
    assert {a["server.port"] for a in found} == {up.port}
    assert found[0]["fender.backoff_ms"] == 0
    assert all(a["fender.backoff_ms"] >= 25 for a in found[1:])  # the 30ms wait, clock granularity aside
    assert [s.status.code for s in tries] == [2, 2, 0]  # ERROR, ERROR, UNSET
    assert all(s.parent_span_id == server.span_id for s in tries)
    # Each try told the upstream its own span as the parent.
    assert [upstream_traceparent(up, i)[1] for i in range(3)] == [s.span_id for s in tries]
    assert attributes(server)["fender.tries"] == 3
    # The layers' decisions (what Fender-Trace would list) are the server span's events ...
    assert [e.name for e in server.events if e.name.startswith("retry")] == [
        "retry 1 after 503, backoff 30.0ms",
        "retry 2 after 503, backoff 30.0ms",
    ]
    assert "fender-trace" not in response.headers  # ... without a Fender-Trace nobody asked for


async def test_a_cache_hit_has_a_server_span_and_no_client_span(start_fender):
    cacheable = ok(b"stored", headers=[(b"cache-control", b"max-age=60")])
    routes = "- {name: all, upstream: echo, cache: {}}"
    async with OtlpReceiver() as collector, RawUpstream(cacheable) as up:
        fender = await start_fender(traced(collector.url, up.port, routes))
        other = "0af7651916cd43dd8448eb211c80319c"
        async with httpx.AsyncClient() as client:
            first = await client.get(fender.url + "/a", headers={"traceparent": f"00-{other}-{PARENT}-01"})
            second = await client.get(fender.url + "/a", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        assert (first.text, second.text) == ("stored", "stored")
        await collector.wait_for(lambda spans: of_trace(spans, TRACE) and len(of_trace(spans, other)) == 2)
    assert len(up.requests) == 1
    assert [s.kind for s in of_trace(collector.spans, TRACE)] == [SERVER]
    assert attributes(of_trace(collector.spans, TRACE)[0])["fender.cache_status"] == "hit"
    assert attributes(of_trace(collector.spans, other, SERVER)[0])["fender.cache_status"] == "miss"


async def test_a_429_is_a_server_span_with_the_rate_limit_decision(start_fender):
    routes = "- {name: all, upstream: echo, rate_limit: {rate: 1/m, burst: 1}}"
    async with OtlpReceiver() as collector, RawUpstream(ok()) as up:
        fender = await start_fender(traced(collector.url, up.port, routes))
        other = "0af7651916cd43dd8448eb211c80319c"
        async with httpx.AsyncClient() as client:
            first = await client.get(fender.url + "/", headers={"traceparent": f"00-{other}-{PARENT}-01"})
            limited = await client.get(fender.url + "/", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        assert (first.status_code, limited.status_code) == (200, 429)
        await collector.wait_for(lambda spans: of_trace(spans, TRACE) and len(of_trace(spans, other)) == 2)
    spans = of_trace(collector.spans, TRACE)
    assert [s.kind for s in spans] == [SERVER]
    a = attributes(spans[0])
    assert (a["http.response.status_code"], a["fender.local_reason"], a["fender.rate_limit"]) == (
        429,
        "rate_limited",
        "limited",
    )
    assert attributes(of_trace(collector.spans, other, SERVER)[0])["fender.rate_limit"] == "allowed"


async def test_a_breaker_open_reply_has_a_breaker_event_and_no_client_span(start_fender):
    routes = "- {name: all, upstream: echo, circuit_breaker: {consecutive_failures: 1, open_for: 60s}}"
    async with OtlpReceiver() as collector, RawUpstream(status(503)) as up:
        fender = await start_fender(traced(collector.url, up.port, routes))
        async with httpx.AsyncClient() as client:
            assert (await client.get(fender.url + "/")).status_code == 503
            refused = await client.get(fender.url + "/", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        assert refused.headers["x-fender-error"] == "breaker_open"
        await collector.wait_for(lambda spans: of_trace(spans, TRACE))
    spans = of_trace(collector.spans, TRACE)
    assert [s.kind for s in spans] == [SERVER]
    assert attributes(spans[0])["fender.local_reason"] == "breaker_open"
    names = [e.name for e in spans[0].events]
    assert names[-1] == "breaker_open"
    assert any(re.fullmatch(r"breaker \S+ open rejected", name) for name in names), names
    assert spans[0].status.code == 2


def test_new_traces_are_sampled_at_the_rate_over_many_and_never_at_0_percent():
    rates = {}
    for sample in ("1%", "0%", "100%", "50%"):
        options = parse_policy(traced("http://127.0.0.1:9", 9, sample=sample, extra=", sample_seed: 7"))
        tracer = Tracer(options.tracing, Metrics())
        rates[sample] = sum(tracer.next_new_trace() is None for _ in range(100_000)) / 100_000
    assert 0.009 < rates["1%"] < 0.011  # +-3 standard deviations of 100k draws at 1%
    assert 0.495 < rates["50%"] < 0.505
    assert (rates["0%"], rates["100%"]) == (0.0, 1.0)


# --------------------------------------------------------------------------- export under trouble


async def wait_metric(fender, name: str, predicate, **labels) -> float:
    """Poll /metrics (bounded) until the value satisfies ``predicate``; the export runs in the background."""
    for _ in range(200):
        value = metric_value(await get_metrics(fender), name, **labels)
        if predicate(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} stayed at {value}")


async def test_a_down_collector_costs_requests_nothing_and_drops_are_counted(start_fender, caplog):
    caplog.set_level(logging.WARNING, "fender")
    requests = 20
    async with RawUpstream(ok()) as up:
        closed = f"http://127.0.0.1:{free_port()}"
        fender = await start_fender(traced(closed, up.port, extra=", queue_size: 4"))
        async with httpx.AsyncClient() as client:
            statuses = [(await client.get(fender.url + f"/{i}")).status_code for i in range(requests)]
            assert statuses == [200] * requests
            # Two spans a request; a queue's worth (4) waits for export, the rest is dropped at once.
            full = metric_value(
                await get_metrics(fender), "fender_trace_spans_dropped_total", reason="queue_full"
            )
            # (A slow run may see the first export take its batch midway: one more queue's worth then.)
            assert 2 * requests - 8 <= full <= 2 * requests - 4
            first = await wait_metric(
                fender, "fender_trace_spans_dropped_total", lambda v: v >= 4, reason="export_failed"
            )
            # A second batch fails too (after its retries): still one warning.
            statuses = [(await client.get(fender.url + f"/{i}")).status_code for i in range(2)]
            assert statuses == [200] * 2
            await wait_metric(
                fender, "fender_trace_spans_dropped_total", lambda v: v > first, reason="export_failed"
            )
    warnings = [r for r in caplog.records if "could not export" in r.getMessage()]
    assert len(warnings) == 1
    assert closed in warnings[0].getMessage()


async def test_a_slow_collector_costs_requests_nothing_and_drops_are_counted(start_fender):
    requests = 20
    async with OtlpReceiver() as collector, RawUpstream(ok()) as up:
        collector.hold.clear()  # every export hangs until the test lets it through
        fender = await start_fender(traced(collector.url, up.port, extra=", queue_size: 4"))
        async with httpx.AsyncClient() as client:
            statuses = [(await client.get(fender.url + f"/{i}")).status_code for i in range(requests)]
        assert statuses == [200] * requests  # all answered while the collector held its first export
        full = await wait_metric(
            fender, "fender_trace_spans_dropped_total", lambda v: v > 0, reason="queue_full"
        )
        assert full >= 2 * requests - 2 * 4
        collector.hold.set()
        exported = await wait_metric(
            fender, "fender_trace_spans_exported_total", lambda v: v + full == 2 * requests
        )
        await collector.wait_for(lambda spans: len(spans) == exported)


async def test_exemplars_link_the_duration_histogram_to_traces_in_openmetrics(start_fender):
    async with OtlpReceiver() as collector, RawUpstream(ok()) as up:
        fender = await start_fender(traced(collector.url, up.port))
        async with httpx.AsyncClient() as client:
            await client.get(fender.url + "/", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
            om = await client.get(
                fender.admin_url + "/metrics", headers={"accept": "application/openmetrics-text"}
            )
            plain = await client.get(fender.admin_url + "/metrics")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    lines = [
        line for line in om.text.splitlines() if line.startswith("fender_request_duration_seconds_bucket")
    ]
    assert any(f'# {{trace_id="{TRACE}"}}' in line and 'route="all"' in line for line in lines)
    assert om.text.rstrip().endswith("# EOF")
    assert "trace_id" not in plain.text  # the Prometheus text format has no exemplars


# --------------------------------------------------------------------------- reload


async def test_a_reload_turns_tracing_on_keeps_the_tracer_when_unchanged_and_turns_it_off(tmp_path):
    from proxy.config import load_policy
    from proxy.server.fender import Fender, bind_socket

    async with OtlpReceiver() as collector, RawUpstream(ok()) as up:
        plain = "reload: {watch: false}\n" + policy_text(up.port)
        path = tmp_path / "policy.yaml"
        path.write_text(plain)
        fender = Fender(load_policy(path), str(path))
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        url = f"http://127.0.0.1:{fender.data_port}/"
        sent = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
        try:
            async with httpx.AsyncClient() as client:
                await client.get(url, headers=sent)
                assert up.requests[-1].header(b"traceparent") == sent["traceparent"].encode()
                path.write_text(tracing(collector.url) + plain)
                assert (await fender.reloader.reload("api")).result == "applied"
                tracer = fender.runtime.tracer
                await client.get(url, headers=sent)
                await collector.wait_for(lambda spans: len(of_trace(spans, TRACE)) == 2)
                assert upstream_traceparent(up)[1] != bytes.fromhex(PARENT)
                # A reload that leaves tracing: as it was keeps the tracer (its queue and export task).
                other = plain.replace("listen:", "server: {access_log: true}\nlisten:", 1)
                path.write_text(tracing(collector.url) + other)
                assert (await fender.reloader.reload("api")).result == "applied"
                assert fender.runtime.policy.server.access_log  # a new runtime ...
                assert fender.runtime.tracer is tracer  # ... with the same tracer
                path.write_text(plain)
                assert (await fender.reloader.reload("api")).result == "applied"
                assert fender.runtime.tracer is None
                await client.get(url, headers=sent)
                assert up.requests[-1].header(b"traceparent") == sent["traceparent"].encode()
        finally:
            await fender.stop()
