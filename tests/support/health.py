"""Health-check tests' helpers: a clock stepped by the test and a settle loop."""

from __future__ import annotations

import asyncio

from proxy.clock import ManualClock


class SteppingClock(ManualClock):
    """A ManualClock that signals whenever a task starts sleeping on it."""

    def __init__(self) -> None:
        super().__init__()
        self.slept = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.slept.set()
        await super().sleep(seconds)


async def settle(up, clock: SteppingClock) -> None:
    """Wait until every probe task sleeps on the clock again (its probe is recorded)."""
    async with asyncio.timeout(5):
        while clock.sleepers < len(up.picker.states):
            clock.slept.clear()
            await clock.slept.wait()


async def step(up, clock: SteppingClock, seconds: float = 1.0) -> None:
    clock.advance(seconds)
    await settle(up, clock)
