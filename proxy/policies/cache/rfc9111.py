"""RFC 9111 rules for a shared cache, as pure functions over header lists.

Nothing here does I/O or reads a clock: times are passed in, in two scales.
``wall`` values are seconds since the epoch (what HTTP dates mean); ``mono``
values are the injected clock's seconds. The layer converts once per entry
(``wall = mono + offset``) so every per-request check is a float comparison.

References: RFC 9111 (HTTP Caching) sections 3 (storing), 4 (constructing
responses from caches), 5.2 (Cache-Control); RFC 9110 sections 8.8 and 13
(validators, conditional requests), 15.1 (heuristically cacheable status
codes); RFC 5861 (stale-while-revalidate, stale-if-error, both directions);
RFC 9213 (targeted cache-control fields) and the W3C Edge Architecture's
Surrogate-Control, which decide Fender's own storing before Cache-Control.
"""

from __future__ import annotations

import email.utils
import functools
from typing import TypeGuard
from urllib.parse import urlsplit

from proxy.kernel.fields import HOP_BY_HOP as _HOP_BY_HOP

# RFC 9110 15.1: cacheable by default, so heuristic freshness may apply (4.2.2).
# 206 is left out: Fender does not store partial content.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Status codes whose caching semantics this cache implements (for must-understand, 5.2.2.3).
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 451}
# RFC 9111 4.2.2: "a typical setting of this fraction might be 10%"; capped at a day.
HEURISTIC_FRACTION = 0.1
HEURISTIC_MAX = 86400.0
# delta-seconds larger than this are taken as this (RFC 9111 1.2.2: 2^31).
DELTA_MAX = 2147483648
# Safe methods (RFC 9110 9.2.1); any other method may invalidate (RFC 9111 4.4).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

# Hop-by-hop fields (RFC 9111 3.1) plus the proxy-authentication ones, never stored.
HOP_BY_HOP = _HOP_BY_HOP | {b"proxy-authenticate", b"proxy-authorization"}
# Never kept in a stored response: per-connection or re-created when serving.
# (Cache-Status: an upstream cache's verdict on that one request, not on later hits.)
_NOT_STORED = HOP_BY_HOP | {
    b"content-length",
    b"age",
    b"x-request-id",
    b"via",
    b"cache-status",
}
# RFC 9111 3.2: besides the fields 3.1 excepts from storage, Content-Length is never updated by a 304
# (framing), nor Content-Range (only meaningful for the partial content Fender does not store).
_NOT_UPDATED = _NOT_STORED | {b"content-range"}
SET_COOKIE = frozenset({b"set-cookie", b"set-cookie2"})
# RFC 9213 / W3C Edge Architecture: the fields that target this cache, first present wins.
DEFAULT_TARGETS = (b"fender-cache-control", b"surrogate-control", b"cdn-cache-control")
# Of those, the ones addressed to Fender alone: consumed here, never passed on (CDN-Cache-Control
# is for every CDN downstream too, RFC 9213 2.1, so it goes on).
FOR_FENDER_ONLY = frozenset({b"fender-cache-control", b"surrogate-control"})
# Request fields whose values compare case-insensitively for Vary (RFC 9110 12.5.3-12.5.5: codings,
# charsets and language tags are case-insensitive tokens).
_CASELESS_VARY = frozenset({b"accept-encoding", b"accept-charset", b"accept-language"})


# --------------------------------------------------------------------------- parsing


def parse_cache_control(values: list[bytes]) -> dict[str, str | None]:
    """Directives of one or more Cache-Control field lines: lower-case name -> argument or None.

    Quoted-string arguments are unquoted (commas inside quotes are kept); the
    first occurrence of a directive wins.
    """
    out: dict[str, str | None] = {}
    text = ", ".join(v.decode("latin-1") for v in values)
    i, n = 0, len(text)
    while i < n:
        # name
        j = i
        while j < n and text[j] not in ",=":
            j += 1
        raw_name = text[i:j].lstrip(" \t")
        name = raw_name.rstrip(" \t").lower()
        arg: str | None = None
        if j < n and text[j] == "=":
            j += 1
            if raw_name != raw_name.rstrip(" \t"):
                name = ""  # "max-age =60": not the token=value grammar, ignored (as cache-tests expects)
            if j < n and text[j] == '"':
                j += 1
                buf = []
                while j < n and text[j] != '"':
                    if text[j] == "\\" and j + 1 < n:
                        j += 1
                    buf.append(text[j])
                    j += 1
                arg = "".join(buf)
                j += 1
                while j < n and text[j] != ",":
                    j += 1
            else:
                k = j
                while j < n and text[j] != ",":
                    j += 1
                arg = text[k:j].rstrip(" \t")  # "max-age= 60" keeps its space and is invalid
        if name and name not in out:
            out[name] = arg
        i = j + 1
    return out


def delta_seconds(arg: str | None) -> int | None:
    """A delta-seconds argument (RFC 9111 1.2.2), or None when missing or invalid."""
    if arg is None or not arg.isdigit() or not arg.isascii():
        return None
    value = int(arg)
    return DELTA_MAX if value > DELTA_MAX else value


def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as epoch seconds, or None if invalid."""
    if not value:
        return None
    return _parse_http_date(value)


@functools.lru_cache(maxsize=256)
def _parse_http_date(value: bytes) -> float | None:
    # Memoised: responses of the same second carry the same Date, and parsing one costs microseconds.
    try:
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
    except (ValueError, TypeError, IndexError):
        return None
    if parsed is None:
        return None
    try:
        return float(email.utils.mktime_tz(parsed))
    except (ValueError, OverflowError):
        return None


def format_http_date(wall: float) -> bytes:
    return email.utils.formatdate(wall, usegmt=True).encode()


def field_names(arg: str | None) -> frozenset[bytes]:
    """The header names of a qualified private/no-cache directive."""
    if not arg:
        return frozenset()
    return frozenset(n.strip().lower().encode() for n in arg.split(",") if n.strip())


def header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def combined(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """All field lines of one header, combined (RFC 9110 5.3), whitespace around commas normalised."""
    values = [v for n, v in headers if n == name]
    if not values:
        return None
    return b",".join(p.strip() for v in values for p in v.split(b","))


def selecting_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """A request's value of a Vary-named field as RFC 9111 4.1 lets the cache compare it.

    Field lines combined, whitespace around commas and semicolons removed, empty list elements
    dropped; lower-cased for fields whose values are case-insensitive tokens (Accept-Encoding,
    Accept-Charset, Accept-Language). None when the request lacks the field (not the same as empty).
    """
    values = [v for n, v in headers if n == name]
    if not values:
        return None
    parts = [p.strip() for v in values for p in v.split(b",")]
    if name in _CASELESS_VARY:
        parts = [b";".join(q.strip() for q in p.split(b";")).lower() for p in parts]
    return b",".join(p for p in parts if p)


def strict_age(values: list[bytes]) -> int | None:
    """The Age of a response when it is exactly one field line holding one non-negative integer.

    0 when there is no Age; None for anything else (negative, fractional, non-numeric, a suffix or
    parameter, a list, two field lines): the caller treats the response as stale on arrival.
    """
    if not values:
        return 0
    if len(values) != 1:
        return None
    return delta_seconds(values[0].decode("latin-1").strip(" \t"))


def directives_for_fender(
    headers: list[tuple[bytes, bytes]], targets: tuple[bytes, ...]
) -> tuple[dict[str, str | None], bytes | None]:
    """The directives Fender stores by and the targeted field they came from (None: Cache-Control).

    RFC 9213 2.2: the first field of the target list present with a non-empty value wins, and
    Cache-Control (and Expires) are then ignored for this cache's own decision.
    """
    if targets:
        for target in targets:
            values = header_values(headers, target)
            if values:
                cc = parse_cache_control(values)
                if cc:
                    return cc, target
    return parse_cache_control(header_values(headers, b"cache-control")), None


# --------------------------------------------------------------------------- request side


class RequestDirectives:
    """What the client's Cache-Control (RFC 9111 5.2.1) asks of the cache."""

    __slots__ = (
        "no_cache",
        "no_store",
        "max_age",
        "max_stale",
        "min_fresh",
        "only_if_cached",
        "stale_if_error",
    )

    def __init__(self, cc: dict[str, str | None] | None, pragma_no_cache: bool = False) -> None:
        cc = cc or {}
        # RFC 9111 5.4: Pragma: no-cache counts only when there is no Cache-Control.
        self.no_cache = "no-cache" in cc or (pragma_no_cache and not cc)
        self.no_store = "no-store" in cc
        self.max_age = delta_seconds(cc.get("max-age")) if "max-age" in cc else None
        if "max-stale" in cc:
            arg = cc["max-stale"]
            # max-stale without a value: any staleness is acceptable.
            self.max_stale: float | None = float("inf") if arg is None else (delta_seconds(arg) or 0)
        else:
            self.max_stale = None
        self.min_fresh = delta_seconds(cc.get("min-fresh")) or 0 if "min-fresh" in cc else 0
        self.only_if_cached = "only-if-cached" in cc
        # RFC 5861 4: in a request, the staleness this client accepts when the upstream fails.
        self.stale_if_error = float(delta_seconds(cc.get("stale-if-error")) or 0)


# --------------------------------------------------------------------------- storing (section 3)


class Analysis:
    """What RFC 9111 says about one upstream response, decided once when it arrives."""

    __slots__ = (
        "storable",
        "why_not",
        "headers",
        "lifetime",
        "initial_age",
        "swr",
        "sie",
        "no_stale",
        "must_validate",
        "etag",
        "last_modified",
        "vary",
        "date",
        "explicit",
        "held",
        "bad_age",
        "targeted",
    )

    storable: bool
    why_not: str
    headers: list[tuple[bytes, bytes]]
    lifetime: float
    initial_age: float
    swr: float
    sie: float
    no_stale: bool
    must_validate: bool
    etag: bytes | None
    last_modified: bytes | None
    vary: tuple[bytes, ...] | None
    date: float
    explicit: bool
    held: list[tuple[bytes, bytes]]
    bad_age: bool
    targeted: bytes | None


def analyse(
    status: int,
    headers: list[tuple[bytes, bytes]],
    *,
    request_authorized: bool,
    request_no_store: bool,
    request_time: float,
    response_time: float,
    default_ttl: float = 0.0,
    store_set_cookie: bool = False,
    targets: tuple[bytes, ...] = DEFAULT_TARGETS,
) -> Analysis:
    """Decide storability (RFC 9111 3), freshness lifetime (4.2.1/4.2.2) and initial age (4.2.3).

    ``request_time``/``response_time`` are wall-clock seconds. ``headers`` are
    the upstream's raw pairs (lower-case names). ``targets``: the targeted
    cache-control fields (RFC 9213) Fender obeys before Cache-Control.
    ``store_set_cookie``: a response with Set-Cookie may be stored (with it).
    """
    a = Analysis()
    a.storable = False
    a.why_not = ""
    cc, a.targeted = directives_for_fender(headers, targets)
    a.vary = None
    vary_value = combined(headers, b"vary")
    if vary_value is not None:
        names = tuple(dict.fromkeys(p.strip().lower() for p in vary_value.split(b",") if p.strip()))
        a.vary = names or None
    # -- freshness inputs
    date = parse_http_date(_first(headers, b"date"))
    a.date = date if date is not None else response_time
    age_value = strict_age(header_values(headers, b"age"))
    a.bad_age = age_value is None
    apparent_age = max(0.0, response_time - a.date)
    response_delay = max(0.0, response_time - request_time)
    a.initial_age = max(apparent_age, (age_value or 0) + response_delay)
    a.etag = _first(headers, b"etag")
    a.last_modified = _first(headers, b"last-modified")

    s_maxage = delta_seconds(cc.get("s-maxage")) if "s-maxage" in cc else None
    max_age = delta_seconds(cc.get("max-age")) if "max-age" in cc else None
    # A targeted field replaces Cache-Control *and* Expires for this cache (RFC 9213 2.2).
    expires_raw = _first(headers, b"expires") if a.targeted is None else None
    explicit = True
    if s_maxage is not None:
        lifetime = float(s_maxage)
    elif max_age is not None:
        lifetime = float(max_age)
    elif "max-age" in cc or "s-maxage" in cc:
        lifetime = 0.0  # an invalid max-age makes the response stale (RFC 9111 4.2.1)
    elif expires_raw is not None:
        expires = parse_http_date(expires_raw)
        # An invalid Expires (e.g. "0") means already expired (RFC 9111 5.3).
        lifetime = max(0.0, expires - a.date) if expires is not None else 0.0
    else:
        explicit = False
        lifetime = 0.0
    heuristic_ok = status in HEURISTIC_STATUSES or "public" in cc
    if not explicit and heuristic_ok:
        last_modified = parse_http_date(a.last_modified)
        if last_modified is not None and last_modified < a.date:
            lifetime = min((a.date - last_modified) * HEURISTIC_FRACTION, HEURISTIC_MAX)
        elif default_ttl > 0 and last_modified is None:
            lifetime = default_ttl
    if a.bad_age:
        # An Age that is not one non-negative integer: how old the response is cannot be known,
        # so it is stale on arrival (stored for revalidation; no upstream can stretch freshness).
        lifetime = 0.0
    a.lifetime = lifetime
    a.explicit = explicit

    # -- stale and validation rules
    a.must_validate = "no-cache" in cc and cc["no-cache"] is None
    a.no_stale = (
        a.must_validate or "must-revalidate" in cc or "proxy-revalidate" in cc or s_maxage is not None
    )
    # (No stale-while-revalidate for a response of unknown age: it would be served unvalidated.)
    a.swr = 0.0 if a.bad_age else float(delta_seconds(cc.get("stale-while-revalidate")) or 0)
    a.sie = float(delta_seconds(cc.get("stale-if-error")) or 0)

    # 5.2.2.7 private="f": f is never stored; 5.2.2.4 no-cache="f": f is stored but only sent
    # after a successful revalidation (held back from responses served without one).
    private_fields = field_names(cc.get("private"))
    no_cache_fields = field_names(cc.get("no-cache")) - private_fields
    # A Set-Cookie is one client's: by default its response is not stored at all, unless the
    # upstream itself said private="Set-Cookie" (then the rest is stored without it, 5.2.2.7).
    cookie_blocks = False
    if not store_set_cookie:
        for name, _ in headers:
            if name in SET_COOKIE and name not in private_fields:
                cookie_blocks = True
                break

    # -- may a shared cache store it? (RFC 9111 3, 3.5)
    understood = status in UNDERSTOOD_STATUSES
    if status < 200 or status in (206, 304):
        a.why_not = "status"
    elif "must-understand" in cc and not understood:
        a.why_not = "must-understand"
    elif "no-store" in cc and not ("must-understand" in cc and understood):
        a.why_not = "no-store"
    elif request_no_store:
        a.why_not = "request no-store"
    elif "private" in cc and cc["private"] is None:
        a.why_not = "private"
    elif request_authorized and not ("public" in cc or "must-revalidate" in cc or s_maxage is not None):
        a.why_not = "authorization"
    elif a.vary is not None and b"*" in a.vary:
        a.why_not = "vary"
    elif cookie_blocks:
        a.why_not = "set-cookie"
    elif not (explicit or heuristic_ok or "public" in cc):
        a.why_not = "no freshness"
    else:
        a.storable = True

    # -- the headers kept (RFC 9111 3.1 hop-by-hop and Connection-named; the fields meant for
    # Fender alone; qualified private and no-cache above)
    drop = _NOT_STORED | FOR_FENDER_ONLY.intersection(targets)
    connection = combined(headers, b"connection")
    if connection:
        drop = drop | {t.strip().lower() for t in connection.split(b",")}
    if private_fields:
        drop = drop | private_fields
    kept = [(n, v) for n, v in headers if n not in drop]
    if no_cache_fields:
        a.held = [(n, v) for n, v in kept if n in no_cache_fields]
        kept = [(n, v) for n, v in kept if n not in no_cache_fields]
    else:
        a.held = []
    a.headers = kept
    return a


def worth_storing(a: Analysis, route_sie: float, route_swr: float) -> bool:
    """A storable response that can never be reused (no freshness, no validators, no stale window) is skipped."""
    # (Explicit freshness already used up by Age is still kept: a client's max-stale may accept it.)
    if a.lifetime > 0 or a.etag is not None or a.last_modified is not None:
        return True
    return not a.no_stale and max(a.sie, route_sie, a.swr, route_swr) > 0


def merge_304(
    stored: list[tuple[bytes, bytes]], fresh: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """RFC 9111 3.2: every header field of the 304 (or HEAD 200) replaces the stored ones of its name.

    Excepted: what 3.1 never stores (hop-by-hop and Connection-named fields), Content-Length
    (framing), Content-Range, and the fields Fender re-creates (Age, Via, ...).
    """
    skip = _NOT_UPDATED
    connection = combined(fresh, b"connection")
    if connection:
        skip = skip | {t.strip().lower() for t in connection.split(b",")}
    update = {n for n, _ in fresh if n not in skip}
    if not update:
        return list(stored)
    kept = [(n, v) for n, v in stored if n not in update]
    kept.extend((n, v) for n, v in fresh if n in update)
    return kept


def _is_strong(tag: bytes | None) -> TypeGuard[bytes]:
    return tag is not None and not tag.strip().startswith(b"W/")


def select_for_update(
    stored: list[tuple[bytes | None, bytes | None]], etag: bytes | None, last_modified: bytes | None
) -> list[int]:
    """Which stored responses (their (ETag, Last-Modified), newest first) a 304 updates (RFC 9111 4.3.4).

    A strong ETag in the 304 selects every stored response with that same strong ETag; else a weak
    ETag or a Last-Modified selects the most recent stored response it matches; a 304 without any
    validator selects the only stored response when that one has none either. No match: none.
    """
    if _is_strong(etag):
        tag = etag.strip()
        return [i for i, (e, _) in enumerate(stored) if _is_strong(e) and e.strip() == tag]
    if etag is not None:
        weak = _strong_or_weak(etag)
        for i, (e, _) in enumerate(stored):
            if e is not None and _strong_or_weak(e) == weak:
                return [i]
        return []
    if last_modified is not None:
        for i, (_, lm) in enumerate(stored):
            if lm is not None and lm.strip() == last_modified.strip():
                return [i]
        return []
    if len(stored) == 1 and stored[0] == (None, None):
        return [0]
    return []


def head_matches(
    etag: bytes | None, last_modified: bytes | None, body_length: int, head: list[tuple[bytes, bytes]]
) -> bool:
    """Whether a HEAD 200 may update a stored GET response (RFC 9111 4.3.5), rather than stale it.

    Every validator the HEAD response carries must match the stored one, it must carry at least
    one, and its Content-Length (if any) must equal the stored body's length.
    """
    head_etag = _first(head, b"etag")
    head_lm = _first(head, b"last-modified")
    if head_etag is None and head_lm is None:
        return False
    if head_etag is not None and (etag is None or head_etag.strip() != etag.strip()):
        return False
    if head_lm is not None and (last_modified is None or head_lm.strip() != last_modified.strip()):
        return False
    length = combined(head, b"content-length")
    return length is None or length == b"%d" % body_length


# --------------------------------------------------------------------------- conditional requests


def _strong_or_weak(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag.startswith(b"W/") else tag


def none_match(if_none_match: bytes, etag: bytes | None) -> bool:
    """True when If-None-Match matches the stored ETag (weak comparison, RFC 9110 13.1.2)."""
    if etag is None:
        return if_none_match.strip() == b"*"
    if if_none_match.strip() == b"*":
        return True
    mine = _strong_or_weak(etag)
    return any(_strong_or_weak(t) == mine for t in if_none_match.split(b",") if t.strip())


def not_modified(
    if_none_match: bytes | None,
    if_modified_since: bytes | None,
    etag: bytes | None,
    last_modified: bytes | None,
    date: float,
) -> bool:
    """Whether the client's conditional GET/HEAD is answered with 304 (RFC 9110 13.2.2 order)."""
    if if_none_match is not None:
        return none_match(if_none_match, etag)
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        if since is None:
            return False
        modified = parse_http_date(last_modified) if last_modified is not None else date
        return modified is not None and modified <= since
    return False


# 304 carries the fields a 200 would have for caches downstream (RFC 9110 15.4.5), without the content ones.
_304_DROP = frozenset({b"content-length", b"content-type", b"content-encoding", b"content-range"})


def not_modified_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n not in _304_DROP]


# --------------------------------------------------------------------------- keys and URIs


def normalise_query(target: bytes, mode: str) -> bytes:
    """The target with its query as the route's key.query wants it."""
    if mode == "as-is":
        return target
    path, sep, query = target.partition(b"?")
    if not sep:
        return target
    if mode == "ignore":
        return path
    parts = sorted(p for p in query.split(b"&") if p)
    return path + b"?" + b"&".join(parts) if parts else path


def same_origin_target(value: bytes, host: bytes | None, base: bytes) -> bytes | None:
    """The path+query a Location / Content-Location names, when it is on this host (RFC 9111 4.4)."""
    text = value.strip().decode("latin-1")
    if not text:
        return None
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if parts.scheme or parts.netloc:
        if host is None or parts.netloc.encode("latin-1").lower() != host.lower():
            return None
    path = parts.path
    if not path.startswith("/"):
        # A relative reference: resolve against the request's directory.
        directory = base.partition(b"?")[0].rsplit(b"/", 1)[0].decode("latin-1")
        path = directory + "/" + path
    target = path + ("?" + parts.query if parts.query else "")
    return target.encode("latin-1")


def _first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1").strip() if value is not None else None
