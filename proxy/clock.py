"""The clock every state machine takes, so tests move time instead of sleeping.

Breakers, buckets, backoff and health checks read ``clock.now()`` (monotonic
seconds) and wait with ``await clock.sleep(seconds)``. Production uses
:class:`SystemClock` (the event loop's monotonic time); tests use
:class:`ManualClock` and call ``advance()``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Monotonic time (the same clock asyncio's timers use)."""

    __slots__ = ()

    # The builtin itself, not a method wrapping it: read several times per request,
    # and a Python-level frame per read cost more than the read.
    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def call_later(self, seconds: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        """Run ``callback()`` after ``seconds`` (a timer without a task); ``.cancel()`` stops it."""
        return asyncio.get_running_loop().call_later(max(seconds, 0.0), callback)


class ManualClock:
    """A clock that moves only when a test calls :meth:`advance`.

    ``sleep`` returns when the clock has been advanced past its wake-up time,
    so a test can step a background task (a health checker, a backoff) through
    time deterministically.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    def call_later(self, seconds: float, callback: Callable[[], object]) -> asyncio.Future:
        """Run ``callback()`` once the clock has been advanced ``seconds``; ``.cancel()`` stops it."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: None if f.cancelled() else callback())
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        return future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())


SYSTEM_CLOCK = SystemClock()
