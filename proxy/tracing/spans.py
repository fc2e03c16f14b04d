"""OTLP protobuf for the few messages Fender sends, written by hand: each span is encoded once, as it ends.

A span leaves the request path as the bytes of one ``Span`` field of an OTLP
``ScopeSpans`` message (field 2); an export request is those bytes joined under
one resource and scope (:func:`export_request`). Most of a span's attributes
do not change between requests (route, upstream, replica, status code, method),
so their encoded bytes are made once and reused (:class:`Attributes`); only
the ids, times, path, addresses and request id are encoded per span.

Why not the OpenTelemetry SDK or opentelemetry-proto's Python messages (measured
under callgrind with the tracing layers alone around a stub forwarder, per request
at 100% sampling, two spans): lean span objects plus the official messages (upb),
filled in place and serialised in batches of 512, cost 174k instructions (58k
building the spans, 116k encoding them); encoding here as each span ends, with
the constant attributes pre-encoded, costs 53k for everything. The encoding is
checked by decoding with the official definitions (tests/test_tracing_export.py).

Field numbers (opentelemetry/proto/trace/v1/trace.proto, common/v1/common.proto):
ExportTraceServiceRequest.resource_spans 1; ResourceSpans.resource 1, .scope_spans 2;
Resource.attributes 1; ScopeSpans.scope 1, .spans 2; InstrumentationScope.name 1,
.version 2; Span.trace_id 1, .span_id 2, .trace_state 3, .parent_span_id 4, .name 5,
.kind 6, .start_time_unix_nano 7 (fixed64), .end_time_unix_nano 8 (fixed64),
.attributes 9, .events 11, .status 15; Event.time_unix_nano 1 (fixed64), .name 2;
Status.message 2, .code 3; KeyValue.key 1, .value 2; AnyValue.string_value 1,
.bool_value 2, .int_value 3, .double_value 4.
"""

from __future__ import annotations

from struct import Struct

SERVER = 2  # Span.SpanKind
CLIENT = 3
STATUS_ERROR = 2  # Status.StatusCode

_TIMES = Struct("<BQBQ")  # start and end: two fixed64 fields (tags 0x39 and 0x41)
_DOUBLE = Struct("<d")
_EVENT_TIME = Struct("<BQ")


def varint(n: int) -> bytes:
    """A protobuf varint; a negative int64 as its 64-bit two's complement (ten bytes)."""
    if n < 0:
        n += 1 << 64
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: int, data: bytes) -> bytes:
    """A length-delimited field: tag byte (field number << 3 | 2), length, data."""
    n = len(data)
    return (b"%c%c%s" % (tag, n, data)) if n < 0x80 else bytes((tag,)) + varint(n) + data


def utf8(value: bytes | str) -> bytes:
    """Protobuf strings are UTF-8: header bytes (latin-1 on the wire) are re-encoded unless ASCII."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    return value if value.isascii() else value.decode("latin-1").encode()


def _key(key: str) -> bytes:
    return field(0x0A, key.encode())


def attribute(key: str, value: str | bytes | bool | int | float) -> bytes:
    """One ``Span.attributes`` entry (field 9): KeyValue{key, AnyValue}."""
    if isinstance(value, bool):
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif isinstance(value, int):
        any_value = b"\x18" + varint(value)
    elif isinstance(value, float):
        any_value = b"\x21" + _DOUBLE.pack(value)
    else:
        any_value = field(0x0A, utf8(value))
    return field(0x4A, _key(key) + field(0x12, any_value))


def event_attribute(key: str, value: str) -> bytes:
    """One ``Event.attributes`` entry (field 3) with a string value."""
    return field(0x1A, _key(key) + field(0x12, field(0x0A, utf8(value))))


def string_attribute(key: bytes, data: bytes) -> bytes:
    """A string attribute: ``key`` from :func:`key_field`, ``data`` UTF-8 bytes."""
    n = len(data)
    if n + len(key) < 0x7C:  # every length fits in one byte
        return b"J%c%s\x12%c\n%c%s" % (len(key) + n + 4, key, n + 2, n, data)
    return field(0x4A, key + field(0x12, field(0x0A, data)))


def key_field(key: str) -> bytes:
    return _key(key)


def cached(cache: dict, limit: int, key: str, value):
    """``attribute(key, value)`` from ``cache``, made and kept on a miss while the cache has room."""
    encoded = cache.get(value)
    if encoded is None:
        encoded = attribute(key, value)
        if len(cache) < limit:
            cache[value] = encoded
    return encoded


def double_head(key: str) -> bytes:
    """What precedes the 8 bytes of a float attribute's value: KeyValue{key, AnyValue{double_value}}."""
    encoded = _key(key)
    return b"J%c%s\x12\t!" % (len(encoded) + 11, encoded)


def pack_double(value: float) -> bytes:
    return _DOUBLE.pack(value)


def span(
    head: bytes,
    span_id: bytes,
    name: bytes,
    start_ns: int,
    end_ns: int,
    attributes: bytes,
    extra: bytes = b"",
) -> bytes:
    """One Span, framed as a ``ScopeSpans.spans`` field.

    ``head`` is :func:`span_head` (trace id, parent, trace state: shared by a request's spans),
    ``name`` the encoded name and kind (:func:`name_and_kind`), ``attributes`` the joined
    attribute fields and ``extra`` :func:`events` and :func:`error_status` fields, if any.
    """
    body = b"".join(
        (head, b"\x12\x08", span_id, name, _TIMES.pack(0x39, start_ns, 0x41, end_ns), attributes, extra)
    )
    n = len(body)
    if 0x80 <= n < 0x4000:
        return b"\x12%c%c%s" % (n & 0x7F | 0x80, n >> 7, body)
    return field(0x12, body)


def span_head(trace_id: bytes, parent_id: bytes, trace_state: bytes = b"") -> bytes:
    """The trace id, parent span id (none: b"") and trace state fields of a span."""
    head = b"\n\x10" + trace_id
    if parent_id:
        head += b'"\x08' + parent_id
    if trace_state:
        head += field(0x1A, trace_state)
    return head


def events(items: list[tuple[int, bytes, bytes]]) -> bytes:
    """Span events: (time ns, UTF-8 name, :func:`event_attribute` fields) each."""
    return b"".join(
        field(0x5A, _EVENT_TIME.pack(0x09, time_ns) + field(0x12, name) + attributes)
        for time_ns, name, attributes in items
    )


def error_status(message: bytes) -> bytes:
    """The Status field of a span that failed: code ERROR, ``message`` (UTF-8)."""
    return field(0x7A, field(0x12, message) + b"\x18\x02")


def name_and_kind(name: str, kind: int) -> bytes:
    return field(0x2A, utf8(name)) + b"\x30%c" % kind


def scope_header(service_name: str, version: str) -> tuple[bytes, bytes]:
    """The encoded Resource (with service.name) and InstrumentationScope (fender, version) fields."""
    resource = field(0x0A, _resource(service_name))
    scope = field(0x0A, field(0x0A, b"fender") + field(0x12, utf8(version)))
    return resource, scope


def _resource(service_name: str) -> bytes:
    # Resource.attributes is field 1 (tag 0x0a), where Span.attributes is field 9.
    kv = _key("service.name") + field(0x12, field(0x0A, utf8(service_name)))
    return field(0x0A, kv)


def export_request(spans: list[bytes], header: tuple[bytes, bytes]) -> bytes:
    """An ExportTraceServiceRequest: one ResourceSpans with one ScopeSpans holding ``spans``."""
    resource, scope = header
    scope_spans = scope + b"".join(spans)
    resource_spans = resource + _length_field(0x12, scope_spans)
    return _length_field(0x0A, resource_spans)


def _length_field(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + varint(len(data)) + data
