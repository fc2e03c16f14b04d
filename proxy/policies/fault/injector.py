"""The fault injector of one route: which tries get a delay or an abort, knowing nothing of HTTP.

Each eligible try (a request matching ``only_if_header``, while the injector is enabled) draws
from the injector's own random generator: first for the delay (when configured), then for the
abort (when configured), in that order, so a seeded generator gives the same choices for the
same sequence of tries. A draw ``u`` in [0, 1) faults the try when ``u < percent``: 100% always,
0% never. ``max_active`` bounds the tries faulted at once (a delay is active while it waits);
a try that would exceed it goes through unfaulted and is counted as skipped.

The running settings start as the policy file's and may be replaced through the admin API
(:meth:`FaultInjector.change`); the object is kept across a reload that leaves the route's
``fault:`` section as it was, so a drill switched on by an operator survives such a reload.
"""

from __future__ import annotations

import random
from typing import Any

from proxy.options.units import format_duration, format_percent
from proxy.policies.fault.options import FaultOptions

__all__ = ["FaultInjector", "Choice"]

# What one try gets: (delay in seconds or None, abort status or None).
Choice = tuple[float | None, int | None]
NOTHING: Choice = (None, None)


class FaultInjector:
    """One route's fault settings (as running), its random generator and its counts."""

    __slots__ = (
        "route",
        "file_options",
        "options",
        "changed_by",
        "enabled",
        "match",
        "max_active",
        "active",
        "injected",
        "skipped",
        "_delay",
        "_delay_share",
        "_abort",
        "_abort_share",
        "_rng",
    )

    def __init__(self, route: str, options: FaultOptions, rng: random.Random | None = None) -> None:
        self.route = route
        self.file_options = options
        self.changed_by: str | None = None
        self.active = 0
        self.injected = {"delay": 0, "abort": 0}
        self.skipped = 0
        self._rng = rng if rng is not None else random.Random(options.seed)
        self._apply(options)

    def _apply(self, options: FaultOptions) -> None:
        self.options = options
        self.enabled = options.enabled
        delay, abort = options.delay, options.abort
        self._delay = delay.fixed if delay is not None else None
        self._delay_share = delay.percent if delay is not None else 0.0
        self._abort = abort.status if abort is not None else None
        self._abort_share = abort.percent if abort is not None else 0.0
        header = options.only_if_header
        # (name, value) pairs as bytes, compared with the request's header pairs (names lowercased).
        self.match = (
            tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in header.items()) if header else ()
        )
        self.max_active = options.max_active

    def change(self, options: FaultOptions, by: str) -> None:
        """Run with ``options`` from now on (an operator's drill); a seed in them restarts the generator."""
        if options.seed is not None and options.seed != self.options.seed:
            self._rng.seed(options.seed)
        self._apply(options)
        self.changed_by = by

    def reset(self) -> None:
        """Back to the policy file's settings."""
        self.change(self.file_options, "")
        self.changed_by = None

    def eligible(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Does a request with these header pairs (names lowercased) meet ``only_if_header``?"""
        for wanted in self.match:
            if wanted not in headers:
                return False
        return True

    def choose(self) -> Choice:
        """The fault for one eligible try: draws for the delay, then the abort; NOTHING when neither."""
        random_ = self._rng.random
        delay = self._delay
        if delay is not None and not random_() < self._delay_share:
            delay = None
        status = self._abort
        if status is not None and not random_() < self._abort_share:
            status = None
        if delay is None and status is None:
            return NOTHING
        if self.max_active is not None and self.active >= self.max_active:
            self.skipped += 1
            return NOTHING
        return delay, status

    def snapshot(self) -> dict[str, Any]:
        """The running state, for the admin API and the status page."""
        options = self.options
        return {
            "route": self.route,
            "enabled": self.enabled,
            "delay": (
                {
                    "fixed": format_duration(options.delay.fixed),
                    "percent": format_percent(options.delay.percent),
                }
                if options.delay is not None
                else None
            ),
            "abort": (
                {"status": options.abort.status, "percent": format_percent(options.abort.percent)}
                if options.abort is not None
                else None
            ),
            # Header names only: a value marking drill traffic is not for every reader of the status page.
            "only_if_header": sorted(options.only_if_header) if options.only_if_header else [],
            "max_active": self.max_active,
            "active": self.active,
            "injected": dict(self.injected),
            "skipped_max_active": self.skipped,
            "changed_by_admin": self.changed_by is not None,
            "as_in_file": options == self.file_options,
        }
