"""W3C Trace Context (https://www.w3.org/TR/trace-context/): reading and writing ``traceparent``."""

from __future__ import annotations

from binascii import unhexlify

_HEX = frozenset(b"0123456789abcdef")
_ZERO_TRACE = b"\0" * 16
_ZERO_SPAN = b"\0" * 8


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) from a traceparent value, or None when it is invalid.

    Version 00 is exactly 55 characters; a later version may append fields after a dash,
    which are ignored (section 3.2.4). Version ff, all-zero ids and upper-case hex are invalid.
    """
    value = value.strip()
    if len(value) < 55 or (len(value) > 55 and (value[:2] == b"00" or value[55:56] != b"-")):
        return None
    if value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-" or value[:2] == b"ff":
        return None
    version, trace, span, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if not _HEX.issuperset(version + trace + span + flags):
        return None
    trace_id = unhexlify(trace)
    span_id = unhexlify(span)
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: bytes, span_id: bytes, sampled: bool) -> bytes:
    return b"00-%s-%s-%s" % (trace_id.hex().encode(), span_id.hex().encode(), b"01" if sampled else b"00")


def incoming_context(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bool] | None:
    """The client's trace context: its traceparent when there is exactly one valid value."""
    found = None
    for name, value in headers:
        if name == b"traceparent":
            if found is not None:
                return None  # two traceparent fields: ambiguous, start afresh (section 3.2)
            found = value
    return None if found is None else parse_traceparent(found)
