"""Where cached responses live: a small interface and the in-memory LRU store.

The cache layer only calls ``get``, ``put``, ``delete`` and ``keys``; the
fleet tier (fleet.py) keeps a copy of what is put in Redis, under it.
A key is the primary cache key (host + normalised target, bytes); the value
is a :class:`Variants` holding one stored response per Vary selection.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.purge import drop_prefix, drop_tags

# Python's own memory per stored response beyond header and body bytes, so max_size tracks
# the real footprint: the Entry and Variants objects, the dict slot and key, the body object.
ENTRY_OVERHEAD = 512
# ... and per header field: the (name, value) tuple, two bytes objects, two list slots.
HEADER_OVERHEAD = 128
# Variants kept per URL (per Vary selection); the oldest is dropped beyond this.
MAX_VARIANTS = 16


class Entry:
    """One stored response, with everything the hit path needs precomputed."""

    __slots__ = (
        "status",
        "headers",
        "body",
        "served_headers",
        "etag",
        "last_modified",
        "date",
        "vary",
        "selection",
        "response_time",
        "initial_age",
        "fresh_until",
        "stale_while_revalidate_until",
        "stale_if_error_until",
        "must_validate",
        "no_stale",
        "held",
        "tags",
        "size",
    )

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        etag: bytes | None,
        last_modified: bytes | None,
        date: float,
        vary: tuple[bytes, ...],
        selection: tuple[bytes | None, ...],
        response_time: float,
        initial_age: float,
        lifetime: float,
        swr: float,
        sie: float,
        must_validate: bool,
        no_stale: bool = False,
        held: list[tuple[bytes, bytes]] | None = None,
        tags: tuple[bytes, ...] = (),
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        # What a hit sends (Age and Cache-Status go with the exchange's extra headers).
        self.served_headers = headers + [(b"content-length", b"%d" % len(body))]
        self.etag = etag
        self.last_modified = last_modified
        self.date = date  # wall clock, for If-Modified-Since without Last-Modified
        self.vary = vary  # lower-case header names selecting this variant
        self.selection = selection  # the request's values of those headers when stored
        self.response_time = response_time  # injected-clock time the response arrived
        self.initial_age = initial_age  # corrected_initial_age (RFC 9111 4.2.3)
        # Times on the injected clock; a hit is one comparison.
        base = response_time - initial_age
        self.fresh_until = -1.0 if must_validate else base + lifetime
        if no_stale or must_validate:
            # must-revalidate, no-cache and friends: never served stale (RFC 9111 4.2.4).
            self.stale_while_revalidate_until = self.stale_if_error_until = self.fresh_until
        else:
            self.stale_while_revalidate_until = base + lifetime + swr
            self.stale_if_error_until = base + lifetime + sie
        self.must_validate = must_validate
        self.no_stale = no_stale  # must-revalidate and friends: never served stale (RFC 9111 4.2.4)
        # Fields named by no-cache="..." (RFC 9111 5.2.2.4): sent only after a successful revalidation.
        self.held = held or []
        self.tags = tags  # the upstream's cache tags (cache.tag_header), for purge by tag
        self.size = (
            len(body)
            + sum(len(t) for t in tags)
            + sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in self.served_headers)
            + sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in self.held)
            + ENTRY_OVERHEAD
        )

    def validated_headers(self) -> list[tuple[bytes, bytes]]:
        """What a response just revalidated with the upstream sends: the held fields too."""
        if not self.held:
            return self.served_headers
        return self.headers + self.held + [(b"content-length", b"%d" % len(self.body))]

    def age(self, now: float) -> int:
        """current_age (RFC 9111 4.2.3) in whole seconds."""
        return int(self.initial_age + now - self.response_time)

    def usable(self, d: rfc.RequestDirectives, now: float) -> str | None:
        """'fresh' or 'max_stale' when the client's directives let this be used without the upstream."""
        remaining = self.fresh_until - now
        if d.max_age is not None and self.age(now) > d.max_age:
            if d.max_stale is None or self.must_validate:
                return None
        if remaining > 0:
            return "fresh" if remaining >= d.min_fresh else None
        if d.max_stale is not None and not self.no_stale and -remaining <= d.max_stale:
            return "max_stale"
        return None


class Variants:
    """The stored responses of one URL, newest first."""

    __slots__ = ("entries", "size")

    def __init__(self, entries: list[Entry] | None = None) -> None:
        self.entries: list[Entry] = entries or []
        self.size = sum(e.size for e in self.entries)

    def select(self, headers: list[tuple[bytes, bytes]]) -> Entry | None:
        """The newest stored variant whose Vary selection matches this request (RFC 9111 4.1)."""
        for entry in self.entries:
            if not entry.vary:
                return entry
            if all(
                rfc.selecting_value(headers, n) == v for n, v in zip(entry.vary, entry.selection, strict=True)
            ):
                return entry
        return None

    def with_entry(self, entry: Entry) -> Variants:
        """A new Variants with ``entry`` replacing the variant of the same selection."""
        kept = [e for e in self.entries if not (e.vary == entry.vary and e.selection == entry.selection)]
        return Variants([entry, *kept][:MAX_VARIANTS])


class Store(Protocol):
    """The store interface the cache layer uses (memory now, Redis later)."""

    def get(self, key: bytes) -> Variants | None: ...
    def put(self, key: bytes, value: Variants) -> bool: ...
    def delete(self, key: bytes) -> bool: ...
    def keys(self) -> Iterator[bytes]: ...


class MemoryStore:
    """LRU dictionary bounded by bytes (headers + bodies + a fixed overhead per entry)."""

    def __init__(self, max_size: int, on_evict: Callable[[int], None] | None = None) -> None:
        self.max_size = max_size
        self.bytes = 0
        self._data: OrderedDict[bytes, Variants] = OrderedDict()
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._data)

    @property
    def entries(self) -> int:
        return sum(len(v.entries) for v in self._data.values())

    def get(self, key: bytes) -> Variants | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def peek(self, key: bytes) -> Variants | None:
        """The value without counting it as a use (purges scan the store)."""
        return self._data.get(key)

    def put(self, key: bytes, value: Variants) -> bool:
        size = value.size + len(key)
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old.size + len(key)
        if size > self.max_size:
            return False
        self._data[key] = value
        self.bytes += size
        evicted = 0
        data = self._data
        while self.bytes > self.max_size:
            old_key, old_value = data.popitem(last=False)
            self.bytes -= old_value.size + len(old_key)
            evicted += 1
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
        return True

    def delete(self, key: bytes) -> bool:
        old = self._data.pop(key, None)
        if old is None:
            return False
        self.bytes -= old.size + len(key)
        return True

    def keys(self) -> Iterator[bytes]:
        # A snapshot: callers may delete while iterating.
        return iter(list(self._data))

    def purge(self, kind: str, value: bytes) -> int:
        """A purge another sidecar published (proxy/state/redis.py): by tag, or by
        ``host + b" " + prefix`` (host empty: any host); the number of keys dropped."""
        if kind == "tag":
            return len(drop_tags(self, (value,)))
        host, _, prefix = value.partition(b" ")
        return len(drop_prefix(self, host or None, prefix))

    def resize(self, max_size: int) -> None:
        self.max_size = max_size
        evicted = 0
        while self.bytes > self.max_size and self._data:
            old_key, old_value = self._data.popitem(last=False)
            self.bytes -= old_value.size + len(old_key)
            evicted += 1
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
