"""The format of cached responses in Redis: versioned, length-checked, checksummed.

A value is ``MAGIC (4) | version (1) | meta length (4) | body length (4) |
crc32 (4) | meta (JSON) | bodies``. The reader checks every part (magic,
version, both lengths against the real size, the CRC of meta and bodies)
and turns anything that does not match into ``None``: the caller deletes it
and treats it as a miss, so a truncated, foreign or older-format value is
never served. Times are stored as wall-clock seconds, because each sidecar's
monotonic clock has its own origin.

No pickle: the bytes come from a shared server, so decoding runs no code.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from proxy.policies.cache.store import Entry, Variants

MAGIC = b"FNDc"
VERSION = 1
_HEAD = struct.Struct(">4sBIII")
# A header value or name is bytes: kept as latin-1 text in the JSON (a lossless 1:1 mapping).
_L1 = "latin-1"


def encode(variants: Variants, offset: float) -> bytes:
    """``variants`` as one blob; ``offset`` = wall clock - the layer's clock."""
    metas = []
    bodies = []
    for e in variants.entries:
        metas.append(
            {
                "s": e.status,
                "h": [[n.decode(_L1), v.decode(_L1)] for n, v in e.headers],
                "b": len(e.body),
                "et": e.etag.decode(_L1) if e.etag is not None else None,
                "lm": e.last_modified.decode(_L1) if e.last_modified is not None else None,
                "d": e.date,
                "vy": [n.decode(_L1) for n in e.vary],
                "sel": [v.decode(_L1) if v is not None else None for v in e.selection],
                "rt": e.response_time + offset,
                "ia": e.initial_age,
                "fu": e.fresh_until + offset if e.fresh_until >= 0 else -1.0,
                "swr": e.stale_while_revalidate_until + offset,
                "sie": e.stale_if_error_until + offset,
                "mv": e.must_validate,
                "ns": e.no_stale,
                # no-cache="..." fields (absent in older blobs: none held)
                "hd": [[n.decode(_L1), v.decode(_L1)] for n, v in e.held],
                "tg": [t.decode(_L1) for t in e.tags],
            }
        )
        bodies.append(e.body)
    meta = json.dumps(metas, separators=(",", ":")).encode()
    body = b"".join(bodies)
    crc = zlib.crc32(body, zlib.crc32(meta))
    return _HEAD.pack(MAGIC, VERSION, len(meta), len(body), crc) + meta + body


def decode(blob: bytes, offset: float) -> Variants | None:
    """The Variants in ``blob`` (times moved onto the layer's clock), or None when it is not valid."""
    try:
        if len(blob) < _HEAD.size:
            return None
        magic, version, meta_len, body_len, crc = _HEAD.unpack_from(blob)
        if magic != MAGIC or version != VERSION or _HEAD.size + meta_len + body_len != len(blob):
            return None
        view = memoryview(blob)
        meta = view[_HEAD.size : _HEAD.size + meta_len]
        bodies = view[_HEAD.size + meta_len :]
        if zlib.crc32(bodies, zlib.crc32(meta)) != crc:
            return None
        metas = json.loads(bytes(meta))
        entries = []
        at = 0
        for m in metas:
            size = m["b"]
            if size < 0 or at + size > body_len:
                return None
            body = bytes(bodies[at : at + size])
            at += size
            entries.append(_entry(m, body, offset))
        if at != body_len or not entries:
            return None
        return Variants(entries)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeError):
        return None


def _entry(m: dict[str, Any], body: bytes, offset: float) -> Entry:
    # Rebuild with the constructor (so served_headers and size are computed as for a fresh
    # entry), then set the absolute times exactly as the storing sidecar computed them.
    entry = Entry(
        int(m["s"]),
        [(n.encode(_L1), v.encode(_L1)) for n, v in m["h"]],
        body,
        etag=m["et"].encode(_L1) if m["et"] is not None else None,
        last_modified=m["lm"].encode(_L1) if m["lm"] is not None else None,
        date=float(m["d"]),
        vary=tuple(n.encode(_L1) for n in m["vy"]),
        selection=tuple(v.encode(_L1) if v is not None else None for v in m["sel"]),
        response_time=float(m["rt"]) - offset,
        initial_age=float(m["ia"]),
        lifetime=0.0,
        swr=0.0,
        sie=0.0,
        must_validate=bool(m["mv"]),
        no_stale=bool(m["ns"]),
        held=[(n.encode(_L1), v.encode(_L1)) for n, v in m.get("hd", ())],
        # Absent in values stored before purge by tag existed.
        tags=tuple(t.encode(_L1) for t in m.get("tg", ())),
    )
    if len(entry.vary) != len(entry.selection):
        raise ValueError("vary and selection differ in length")
    entry.fresh_until = float(m["fu"]) - offset if m["fu"] >= 0 else -1.0
    entry.stale_while_revalidate_until = float(m["swr"]) - offset
    entry.stale_if_error_until = float(m["sie"]) - offset
    return entry


def expiry(variants: Variants, now: float) -> float:
    """Seconds the value is worth keeping in Redis: until the last variant's stale windows end."""
    last = max(
        max(e.stale_while_revalidate_until, e.stale_if_error_until, e.fresh_until) for e in variants.entries
    )
    return last - now
