"""Per-route bulkheads: a cap on requests in flight upstream, with a bounded FIFO queue.

A request takes a slot before it goes upstream and gives it back when the
response body has been read to the end or abandoned: the upstream is busy
until then. Without a free slot it waits in a FIFO queue of at most
``max_queued`` entries for at most ``queue_timeout``; a full queue rejects at
once (503 ``bulkhead_full``), an expired wait rejects with 503
``bulkhead_timeout``. Neither reaches the upstream.

The queue is cancellation-safe: a waiter that is cancelled (or whose client
disconnects, which the layer watches while queued) leaves the queue and never
holds a slot; a slot handed to a waiter at the moment it was cancelled is
passed on to the next one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.clock import Clock
from proxy.kernel.exchange import Reply

__all__ = ["Bulkhead", "Rejected", "SlotReply"]


class ClientLeft(Exception):
    """The client disconnected while its request was queued."""


class Rejected(Exception):
    """No slot: ``reason`` is bulkhead_full or bulkhead_timeout."""

    def __init__(self, reason: str, waited: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.waited = waited


class Bulkhead:
    """A counting semaphore with a bounded FIFO queue, a queue timeout and an injected clock."""

    __slots__ = (
        "max_concurrent",
        "max_queued",
        "queue_timeout",
        "clock",
        "in_flight",
        "_waiters",
        "_previous",
        "_successor",
        "__weakref__",
    )

    def __init__(self, max_concurrent: int, max_queued: int, queue_timeout: float, clock: Clock) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.clock = clock
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Reload hand-over (see carry_over): the bulkhead this one replaces, and the one replacing it.
        self._previous: Bulkhead | None = None
        self._successor: Bulkhead | None = None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self._successor is not None:
            return self._successor.try_acquire()
        if self.in_flight < self.max_concurrent and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(
        self, timeout: float | None = None, disconnect: Callable[[], Awaitable[None]] | None = None
    ) -> float:
        """Wait for a slot (FIFO); returns the seconds spent queued. Raises :class:`Rejected`.

        ``disconnect``, when given, is an awaitable factory that returns when
        the client has gone; the waiter then leaves the queue and
        :class:`ClientLeft` is raised. A cancelled waiter leaves the queue the
        same way and never holds a slot.
        """
        if self._successor is not None:
            return await self._successor.acquire(timeout, disconnect)
        if self.try_acquire():
            return 0.0
        if len(self._waiters) >= self.max_queued:
            raise Rejected("bulkhead_full")
        clock = self.clock
        started = clock.now()
        wait = self.queue_timeout if timeout is None else min(self.queue_timeout, timeout)
        loop = asyncio.get_running_loop()
        slot: asyncio.Future[None] = loop.create_future()
        self._waiters.append(slot)
        helpers: list[asyncio.Future[None]] = [asyncio.ensure_future(clock.sleep(wait))]
        if disconnect is not None:
            helpers.append(asyncio.ensure_future(disconnect()))
        for helper in helpers:
            helper.add_done_callback(lambda _: slot.done() or slot.cancel())
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self.release()
            self._forget(slot)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # cancelled from outside: that wins over a timer firing at the same moment
            if helpers[0].done() and not helpers[0].cancelled():
                raise Rejected("bulkhead_timeout", clock.now() - started) from None
            if len(helpers) > 1 and helpers[1].done() and not helpers[1].cancelled():
                raise ClientLeft from None
            raise
        finally:
            for helper in helpers:
                if helper.done() and not helper.cancelled():
                    helper.exception()  # retrieved, so a failed receive() is not logged as lost
                helper.cancel()
        return clock.now() - started

    def _forget(self, slot: asyncio.Future[None]) -> None:
        if self._successor is not None:
            self._successor._forget(slot)
            return
        try:
            self._waiters.remove(slot)
        except ValueError:
            pass

    def release(self) -> None:
        """Give a slot back: straight to the longest waiter still waiting, else free it."""
        if self._successor is not None:
            self._successor.release()
            return
        if self.in_flight > self.max_concurrent:
            self.in_flight -= 1  # over a limit lowered by a reload: shrink before handing slots on
            return
        waiters = self._waiters
        while waiters:
            slot = waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot moves to this waiter; in_flight is unchanged
                return
        self.in_flight -= 1

    # -- reload hand-over -------------------------------------------------------------------
    # A route whose bulkhead settings did not change keeps its Bulkhead object (runtime.keep).
    # When they changed, the new Bulkhead takes over the old one's count and queue, so requests of
    # the old and new runtime together never exceed the (new) limit during the swap.

    def carry_over(self, old: Bulkhead) -> None:
        """Called while the new runtime is built: remember the bulkhead this one replaces."""
        self._previous = old

    def take_over(self) -> None:
        """Called when the new runtime goes live: adopt the old bulkhead's slots and waiters.

        From then on the old object forwards every call to this one, so a request of the old
        runtime releasing its slot frees it here, and its queued requests wait here in FIFO order.
        """
        old, self._previous = self._previous, None
        if old is None:
            return
        while old._successor is not None:
            old = old._successor
        if old is self:
            return
        self.in_flight += old.in_flight
        self._waiters.extend(old._waiters)
        old._waiters.clear()
        old.in_flight = 0
        old._successor = self


class SlotReply:
    """The upstream reply, holding its bulkhead slot until the body is finished or closed."""

    __slots__ = ("_reply", "_bulkhead", "status", "headers")

    def __init__(self, reply: Reply, bulkhead: Bulkhead) -> None:
        self._reply = reply
        self._bulkhead: Bulkhead | None = bulkhead
        self.status = reply.status
        self.headers = reply.headers

    def _release(self) -> None:
        bulkhead, self._bulkhead = self._bulkhead, None
        if bulkhead is not None:
            bulkhead.release()

    def has_body(self) -> bool:
        return self._reply.has_body()

    @property
    def trailers(self) -> list[tuple[bytes, bytes]] | None:
        return self._reply.trailers

    @property
    def complete(self) -> bool:
        return self._reply.complete

    async def read(self) -> bytes:
        try:
            chunk = await self._reply.read()
        except BaseException:
            self._release()
            raise
        if not chunk:
            self._release()
        return chunk

    def close(self) -> None:
        try:
            self._reply.close()
        finally:
            self._release()

    def __getattr__(self, name: str) -> Any:
        # Anything else of the upstream response (http_version, keep_alive, ...).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._reply, name)

    def __del__(self) -> None:
        # Safety net: a reply dropped without read-to-end or close still frees its slot.
        self._release()
