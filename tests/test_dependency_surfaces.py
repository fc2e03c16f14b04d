"""The private parts of dependencies Fender overrides or reads, checked to exist as used.

Each is bounded in pyproject.toml; this fails at once when an upgrade inside the bound renames
one, where the behaviour tests that depend on it (HTTP/2 stream errors, GOAWAY, the fast
metrics, uvicorn's stop) would fail less plainly or, for an override, not at all.
"""

from __future__ import annotations

import inspect

import pytest

pytestmark = pytest.mark.unit


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_h2_hooks_fender_overrides_exist_with_their_signatures():
    import h2.connection
    import h2.stream

    # proxy/upstream/http2.py: StreamErrorConnection, _ClientConnection, CheckedStream
    connection = h2.connection.H2Connection
    assert _params(connection._begin_new_stream) == ["self", "stream_id", "allowed_ids"]
    assert _params(connection._receive_frame) == ["self", "frame"]
    assert _params(connection._receive_goaway_frame) == ["self", "frame"]
    assert isinstance(connection.__dict__.get("open_inbound_streams"), property)
    assert h2.connection.ConnectionState.CLIENT_OPEN
    stream = h2.stream.H2Stream
    assert _params(stream._initialize_content_length) == ["self", "headers"]
    assert _params(stream._track_content_length) == ["self", "length", "end_stream"]
    assert _params(stream.receive_headers) == ["self", "headers", "end_stream", "header_encoding"]
    made = stream(1, None, 65535, 65535)
    for attribute in ("_expected_content_length", "_actual_content_length", "stream_id"):
        assert hasattr(made, attribute), attribute
    conn = connection()
    assert isinstance(conn.streams, dict) and hasattr(conn, "state_machine")


def test_prometheus_client_parts_the_fast_metrics_read_exist():
    from prometheus_client import Histogram, values

    # proxy/metrics.py replaces the value class and reads a histogram child's buckets and bounds;
    # proxy/tracing/tracer.py sets exemplars on those buckets.
    assert values.ValueClass is not None
    child = Histogram("surface_probe_seconds", "probe", registry=None)
    assert isinstance(child._buckets, list) and isinstance(child._upper_bounds, list)
    assert len(child._buckets) == len(child._upper_bounds)
    assert hasattr(child._buckets[0], "set_exemplar")


def test_uvicorn_server_methods_fender_overrides_exist():
    import uvicorn

    # proxy/server/fender.py: _Server overrides these three.
    server = uvicorn.Server
    assert _params(server.startup) == ["self", "sockets"]
    assert _params(server.main_loop) == ["self"]
    assert _params(server.shutdown) == ["self", "sockets"]
    assert inspect.iscoroutinefunction(server.startup) and inspect.iscoroutinefunction(server.shutdown)
