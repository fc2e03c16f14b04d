"""How a reload hands state over, and how state is saved across restarts: one mechanism each.

Hand-over: a reload builds a new runtime beside the running one. Every object that owns state
(a breaker, a bucket table, a cache store, an upstream with its pools) is obtained through
:meth:`Handover.keep` under a key naming it and the settings it is built from: when the
previous runtime holds an object under that key built from equal settings, that very object is
reused (its state, pools and background tasks carry on); otherwise ``build()`` makes a new
one, and if the new object has ``carry_over(old)`` it is called with the previous object of
that key, so it can take over what still applies (a cache keeping entries when only its size
changed). ``carry_over`` runs during the build and must only change the new object (the build
may still fail); a fresh object's ``take_over()`` (sync or async) runs once the whole runtime
started, just before it goes live, for hand-overs that touch the old object (a bulkhead's
slots, connection pools, stopping old health checks). Asking again for a key within one build
returns the object already built: that is how routes share one object (a breaker per upstream).

Checkpoints: :class:`CheckpointProviders` collects ``(name, snapshot, restore)`` providers while
a runtime is built; :mod:`proxy.ops.checkpoint` writes and reads the file (its docstring has
the provider contract). See docs/architecture.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

log = logging.getLogger("fender")

T = TypeVar("T")


class Handover:
    """The stateful objects of one runtime, by key, with the settings each was built from."""

    def __init__(self, previous: Handover | None = None) -> None:
        self.previous = previous
        self.objects: dict[Hashable, tuple[Any, Any]] = {}
        self.kept = 0
        self.fresh: list[Any] = []

    def keep(self, key: Hashable, settings: Any, build: Callable[[], T]) -> T:
        entry = self.objects.get(key)
        if entry is not None:
            return cast(T, entry[1])  # asked again within the same build (an object shared by routes)
        old = self.previous.objects.get(key) if self.previous is not None else None
        if old is not None and old[0] == settings:
            obj = old[1]
            self.kept += 1
        else:
            obj = build()
            if old is not None:
                carry = getattr(obj, "carry_over", None)
                if carry is not None:
                    carry(old[1])
            self.fresh.append(obj)
        self.objects[key] = (settings, obj)
        return cast(T, obj)

    def reusable(self, key: Hashable, settings: Any) -> Any | None:
        """The previous runtime's object that :meth:`keep` would reuse for ``key`` and ``settings``, or None.

        For an object whose identity depends on its neighbours' (a breaker choosing a name no
        kept breaker carries) before those neighbours were asked for.
        """
        old = self.previous.objects.get(key) if self.previous is not None else None
        return old[1] if old is not None and old[0] == settings else None

    def owned_ids(self) -> set[int]:
        return {id(obj) for _, obj in self.objects.values()}


# A checkpoint provider's data: JSON (see proxy.ops.checkpoint).
Snapshot = Callable[[], dict[str, Any]]
Restore = Callable[[dict[str, Any]], None]


class CheckpointProviders:
    """The providers registered by one runtime's policy modules."""

    def __init__(self) -> None:
        self._providers: dict[str, tuple[Snapshot, Restore]] = {}

    def register(self, name: str, snapshot: Snapshot, restore: Restore) -> None:
        if name in self._providers:
            if self._providers[name] == (snapshot, restore):
                return  # the same object registered again (e.g. a breaker shared by routes)
            raise ValueError(f"checkpoint provider {name!r} is registered twice")
        self._providers[name] = (snapshot, restore)

    def names(self) -> list[str]:
        return list(self._providers)

    def snapshot_all(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, (snapshot, _) in self._providers.items():
            try:
                out[name] = snapshot()
            except Exception:
                log.exception("checkpoint provider %s failed to snapshot; left out", name)
        return out

    def restore_all(self, data: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Hand each provider its data; returns (restored, failed) provider names."""
        restored: list[str] = []
        failed: list[str] = []
        for name, (_, restore) in self._providers.items():
            if name not in data:
                continue
            entry = data[name]
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not a mapping")
                restore(entry)
            except Exception as exc:
                failed.append(f"{name} ({exc})")
                continue
            restored.append(name)
        return restored, failed
