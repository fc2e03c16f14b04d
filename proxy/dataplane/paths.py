"""Request-target normalisation before routing (RFC 3986 section 6.2.2).

Routing and forwarding use the same normalised path, so ``/public/../admin``
cannot match the ``/public`` route and still reach ``/admin`` upstream
(Envoy CVE-2019-9901). Percent-encoded unreserved characters are decoded,
other escapes are upper-cased and kept (``%2F`` stays an escape, so it never
splits a segment), dot segments are removed and repeated slashes merged.
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(rb"/{2,}")
_LONE_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PERCENT = ord("%")
_DOT = ord(".")


def _fix_escape(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    if byte in _UNRESERVED:
        return bytes((byte,))
    return b"%" + match.group(1).upper()


def normalise_path(raw: bytes) -> bytes | None:
    """Return the normalised path, or None when it is not an origin-form path."""
    if not raw.startswith(b"/"):
        return None
    # Fast path: nothing to normalise in the common case. Single bytes are tested as ints and
    # substrings with find(): CPython 3.11's bytes `in` with a bytes needle first tries it as an
    # int, raising and clearing a TypeError, which costs several times the search itself.
    percent = _PERCENT in raw
    if not percent and raw.find(b"//") < 0 and (_DOT not in raw or raw.find(b"/.") < 0):
        return raw
    path = _ESCAPE.sub(_fix_escape, raw) if percent else raw
    if _PERCENT in path and _bad_escape(path):
        return None
    path = _SLASHES.sub(b"/", path)
    if path.find(b"/.") >= 0:
        path = _remove_dot_segments(path)
    return path


def _bad_escape(path: bytes) -> bool:
    # A '%' not followed by two hex digits is not a valid escape (RFC 3986 2.1).
    return _LONE_PERCENT.search(path) is not None


def _remove_dot_segments(path: bytes) -> bytes:
    segments = path.split(b"/")
    out: list[bytes] = []
    for seg in segments[1:]:
        if seg == b"..":
            if out:
                out.pop()
        elif seg != b".":
            out.append(seg)
    # A trailing "." or ".." leaves a directory path, so keep the final slash.
    if segments[-1] in (b".", b".."):
        out.append(b"")
    return b"/" + b"/".join(out)
