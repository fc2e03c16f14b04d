"""Purges of this sidecar's cache (L1): by URL prefix and by tag; and the tags of a response.

The admin API (proxy/admin/cache.py) runs these for a purge it receives; in
fleet mode the Redis client (proxy/state/redis.py) calls the store's ``purge`` (which
runs them) for a purge another sidecar published. Both scan the store once: a purge is rare, a
per-tag index in memory would cost on every store.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from proxy.state.keys import target_of

# Bounds on what one response can tag itself with (more are ignored), so a response cannot make
# Fender or Redis hold an unbounded tag set.
MAX_TAGS = 32
MAX_TAG_LENGTH = 128
_SEPARATORS = re.compile(rb"[,\s]+")


class _Tagged(Protocol):
    tags: tuple[bytes, ...]


class _Stored(Protocol):
    @property
    def entries(self) -> Sequence[_Tagged]: ...


class Purgeable(Protocol):
    """What a purge needs of a store (the in-memory store, store.py)."""

    def keys(self) -> Iterator[bytes]: ...
    def peek(self, key: bytes) -> _Stored | None: ...
    def delete(self, key: bytes) -> bool: ...


def tags_of(values: list[bytes]) -> tuple[bytes, ...]:
    """The tags in the tag header's field lines: comma- or space-separated, duplicates once."""
    tags: dict[bytes, None] = {}
    for value in values:
        for tag in _SEPARATORS.split(value):
            if tag and len(tag) <= MAX_TAG_LENGTH and len(tags) < MAX_TAGS:
                tags[tag] = None
    return tuple(tags)


def drop_prefix(store: Purgeable, host: bytes | None, prefix: bytes) -> list[bytes]:
    """Delete every key whose target starts with ``prefix`` (on ``host``, or any host): the keys."""
    dropped = []
    for key in store.keys():
        key_host, key_target = target_of(key)
        if key_target.startswith(prefix) and (host is None or key_host == host) and store.delete(key):
            dropped.append(key)
    return dropped


def drop_tags(store: Purgeable, tags: Iterable[bytes]) -> list[bytes]:
    """Delete every key one of whose stored variants carries one of ``tags``: the keys."""
    wanted = set(tags)
    dropped = []
    for key in store.keys():
        variants = store.peek(key)
        if variants is not None and any(not wanted.isdisjoint(e.tags) for e in variants.entries):
            if store.delete(key):
                dropped.append(key)
    return dropped
