"""The error log of upstream faults: one WARNING line per fault, rate-limited per replica and reason.

Like nginx's ``connect() failed (111: Connection refused) while connecting to
upstream``, each line says what failed and where::

    upstream fault connect_failure: connection refused (upstream=api replica=10.0.0.7:8080 route=orders rid=...)

A dead replica fails every request sent to it, so lines are limited to one per
(replica, reason) per 10 s; the next line after a quiet spell counts what was
held back (``... and 41 more since 10.2s ago``). Only the failure path calls
this module: a successful try never touches it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.upstream import UpstreamError

log = logging.getLogger("fender.upstream")

FAULT_LOG_INTERVAL = 10.0
# Keys are (replica, reason) of one upstream, so a policy bounds them already; the cap keeps the
# map bounded whatever happens (a dropped key only means its next fault is logged at once).
FAULT_LOG_MAX_KEYS = 1024


class LineLimiter:
    """At most one line per key per ``interval`` seconds, counting the ones held back.

    Remembers at most ``max_keys`` keys; past that the one logged longest ago is forgotten.
    """

    __slots__ = ("interval", "max_keys", "_clock", "_keys")

    def __init__(
        self,
        interval: float = FAULT_LOG_INTERVAL,
        max_keys: int = FAULT_LOG_MAX_KEYS,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> [last line at, lines held back since]
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def admit(self, key: Hashable) -> tuple[int, float] | None:
        """None: hold this line back (it is counted). Else write it, with (held back, seconds since the last line)."""
        now = self._clock.now()
        keys = self._keys
        entry = keys.get(key)
        if entry is None:
            keys[key] = [now, 0]
            if len(keys) > self.max_keys:
                keys.popitem(last=False)
            return 0, 0.0
        since = now - entry[0]
        if since < self.interval:
            entry[1] += 1
            return None
        held = int(entry[1])
        entry[0] = now
        entry[1] = 0
        keys.move_to_end(key)
        return held, since


class FaultLog:
    """The fault lines of one upstream (lives with its UpstreamRuntime, so a reload keeps the limits)."""

    __slots__ = ("upstream", "limiter")

    def __init__(
        self, upstream: str, clock: Clock = SYSTEM_CLOCK, interval: float = FAULT_LOG_INTERVAL
    ) -> None:
        self.upstream = upstream
        self.limiter = LineLimiter(interval, FAULT_LOG_MAX_KEYS, clock)

    def report(self, replica: str, route: str, error: UpstreamError, request_id: bytes) -> None:
        admitted = self.limiter.admit((replica, error.reason))
        if admitted is None or not log.isEnabledFor(logging.WARNING):
            return
        held, since = admitted
        words = error.cause or str(error)
        more = f" and {held} more since {since:.1f}s ago" if held else ""
        log.warning(
            "upstream fault %s: %s (upstream=%s replica=%s route=%s rid=%s)%s",
            error.reason,
            words,
            self.upstream,
            replica,
            route,
            request_id.decode("latin-1"),
            more,
            extra={
                "upstream": self.upstream,
                "replica": replica,
                "route": route,
                "reason": error.reason,
                "cause": words,
                "held_back": held,
            },
        )
