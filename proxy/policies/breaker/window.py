"""Sliding windows of call outcomes: the last N calls, or the calls of the last T seconds."""

from __future__ import annotations

TIME_SLOTS = 10


class CountWindow:
    """The outcomes of the last N calls in a ring, with running totals."""

    __slots__ = ("_ring", "_next", "size", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._ring = bytearray(size)  # bit 0 failure, bit 1 slow, bit 2 occupied
        self._next = 0
        self.size = size
        self.calls = self.failures = self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        # Written for the usual case (a success replacing a success: two stores); bools never
        # meet integer arithmetic, which CPython takes a slow path for.
        ring = self._ring
        index = self._next
        old = ring[index]
        if old == 0:
            self.calls += 1  # the ring is still filling; once full, one call leaves as one enters
        elif old != 4:
            if old & 1:
                self.failures -= 1
            if old & 2:
                self.slow -= 1
        if failed or slow:
            ring[index] = 4 | (1 if failed else 0) | (2 if slow else 0)
            if failed:
                self.failures += 1
            if slow:
                self.slow += 1
        else:
            ring[index] = 4
        index += 1
        self._next = index if index < self.size else 0

    def expire(self, now: float) -> None:
        pass

    def reset(self) -> None:
        self._ring = bytearray(self.size)
        self._next = 0
        self.calls = self.failures = self.slow = 0


class TimeWindow:
    """The outcomes of the last T seconds, in TIME_SLOTS slices (fixed memory)."""

    __slots__ = ("_width", "_slots", "_epoch", "calls", "failures", "slow")

    def __init__(self, seconds: float, now: float) -> None:
        self._width = seconds / TIME_SLOTS
        self._slots = [[0, 0, 0] for _ in range(TIME_SLOTS)]
        self._epoch = int(now // self._width)
        self.calls = self.failures = self.slow = 0

    def expire(self, now: float) -> None:
        epoch = int(now // self._width)
        if epoch == self._epoch:
            return
        for step in range(1, min(epoch - self._epoch, TIME_SLOTS) + 1):
            slot = self._slots[(self._epoch + step) % TIME_SLOTS]
            self.calls -= slot[0]
            self.failures -= slot[1]
            self.slow -= slot[2]
            slot[0] = slot[1] = slot[2] = 0
        self._epoch = epoch

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self.expire(now)
        slot = self._slots[self._epoch % TIME_SLOTS]
        slot[0] += 1
        slot[1] += failed
        slot[2] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def reset(self) -> None:
        for slot in self._slots:
            slot[0] = slot[1] = slot[2] = 0
        self.calls = self.failures = self.slow = 0
