"""Write flow control shared by the HTTP/1.1 and HTTP/2 listener protocols.

The transport calls ``pause_writing`` when its buffer passes the high-water mark (the client
reads slower than we write) and ``resume_writing`` when it drained. Writers ``await drain()``
while paused; a client that reads nothing for ``send_timeout`` is cut by ``_send_timed_out``,
which each protocol defines (HTTP/1.1 aborts, HTTP/2 counts a GOAWAY reason first).
"""

from __future__ import annotations

import asyncio


class WriteFlow:
    loop: asyncio.AbstractEventLoop
    send_timeout: float
    write_paused: bool
    _send_timer: asyncio.TimerHandle | None
    _drain_waiters: list[asyncio.Future[None]]

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._wake_drain()

    async def drain(self) -> None:
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _send_timed_out(self) -> None:
        raise NotImplementedError
