"""The layout of a cache key, as the fleet tier indexes it: host, then the normalised target.

Here (not in the cache package) because the Redis tier's purge index is built from it; the cache
and the admin API use the same function, so the two sides cannot disagree.
"""

from __future__ import annotations


def target_of(key: bytes) -> tuple[bytes, bytes]:
    """A cache key (host + normalised target) split into (host, target)."""
    slash = key.find(b"/")
    return (key, b"") if slash < 0 else (key[:slash], key[slash:])
