"""proxy/grpc.py: the gRPC vocabulary the listener and the upstream side share."""

from __future__ import annotations

import pytest

from proxy import grpc
from proxy.kernel.reasons import REASONS


def test_every_reason_has_a_grpc_status():
    # A new reason must say what a gRPC client sees (docs/http2.md's table); none falls to the fallback.
    assert sorted(set(REASONS) - set(grpc.REASON_STATUS)) == []


@pytest.mark.parametrize(
    ("reason", "name"),
    [
        ("rate_limited", "resource_exhausted"),
        ("breaker_open", "unavailable"),
        ("bulkhead_full", "unavailable"),
        ("no_healthy_replica", "unavailable"),
        ("connect_failure", "unavailable"),
        ("timeout", "deadline_exceeded"),
        ("no_route", "unimplemented"),
        ("body_too_large", "resource_exhausted"),
        ("bad_response", "internal"),
    ],
)
def test_the_issue_table(reason, name):
    assert grpc.status_for(reason) == grpc.GRPC_CODES[name]


def test_unknown_reasons_follow_the_http_mapping():
    assert grpc.status_for("some_new_reason", 404) == grpc.GRPC_CODES["unimplemented"]
    assert grpc.status_for("some_new_reason", 503) == grpc.GRPC_CODES["unavailable"]
    assert grpc.status_for("some_new_reason", 418) == grpc.GRPC_CODES["unknown"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc+json", True),
        (b"Application/GRPC;charset=x", True),
        (b"application/grpc-web", False),
        (b"application/grpcx", False),
        (b"application/json", False),
        (None, False),
    ],
)
def test_is_grpc(value, expected):
    assert grpc.is_grpc(value) is expected


def test_grpc_message_is_percent_encoded_and_capped():
    assert grpc.encode_message("café 100%") == b"caf%C3%A9 100%25"
    fields = dict(grpc.local_headers("no_route", 404, "x" * 1000))
    assert fields[b"grpc-status"] == b"12"
    assert len(fields[b"grpc-message"]) == 256


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1S", 1.0), (b"1500m", 1.5), (b"2M", 120.0), (b"1H", 3600.0), (b"250u", 0.00025), (b"7n", 7e-9)],
)
def test_grpc_timeout_parses(value, seconds):
    assert grpc.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"123456789S", b"1s", b"-1S", b"1.5S", b"10X"])
def test_malformed_grpc_timeout(value):
    assert grpc.parse_timeout(value) is None


@pytest.mark.parametrize("seconds", [0.0, 0.000001, 0.25, 1.5, 59.0, 3600.0, 10**9])
def test_grpc_timeout_round_trip_never_lengthens(seconds):
    value = grpc.format_timeout(seconds)
    assert len(value) <= 9
    assert grpc.parse_timeout(value) <= seconds + 1e-9
    assert grpc.parse_timeout(value) >= seconds * 0.99
