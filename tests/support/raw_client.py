"""Clients for the hardening tests: hand-written bytes, and a bounded fixed-rate load.

:class:`RawClient` sends exactly the bytes a test writes (split across writes,
with delays) and parses what comes back with httptools, so a test sees the
status, headers and body of each response and whether the server closed::

    async with RawClient(port) as c:
        await c.send([b"GET / HTTP/1.1\\r\\nHo", b"st: a\\r\\n\\r\\n"], delay=0.05)
        r = await c.response()
        assert r.status == 200 and not r.closed

:func:`run_load` drives a fixed request rate for a bounded time over a small
pool of keep-alive connections and counts every client-visible error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools
import httpx


@dataclass
class Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)  # lowercased names, last value wins
    body: bytes = b""
    complete: bool = False  # the body ended as its framing said
    closed: bool = False  # the server closed the connection after (or during) it


class _Parser:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.parser = httptools.HttpResponseParser(self)
        self._current: Response | None = None
        self._name = b""

    def on_message_begin(self) -> None:
        self._current = Response()
        self.responses.append(self._current)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self._current.complete = True


class RawClient:
    """One client connection writing hand-made request bytes."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.address = (host, port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False  # the server closed (EOF or reset)
        self.received = b""
        self._parser = _Parser()
        self._taken = 0

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(*self.address)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()

    async def send(self, data: bytes | list[bytes], delay: float = 0.0) -> None:
        """Write ``data`` (a list is written part by part, ``delay`` seconds apart)."""
        parts = [data] if isinstance(data, bytes) else data
        for index, part in enumerate(parts):
            if index and delay:
                await asyncio.sleep(delay)  # pacing the client, as the test scripted it
            if self.writer.transport.is_closing():
                return  # the server already closed: the rest is never sent
            self.writer.write(part)
            try:
                await self.writer.drain()
            except ConnectionError:
                return

    async def _feed(self, timeout: float) -> bool:
        """Read once; False at EOF/reset or when nothing came within ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            try:
                self._parser.parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            for r in self._parser.responses:
                r.closed = True
            return False
        self.received += data
        try:
            self._parser.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        return True

    async def response(self, timeout: float = 5.0, learn_close: bool = True) -> Response:
        """The next complete response; raises TimeoutError, or returns an incomplete one if the server closed.

        With ``learn_close`` (the default) a last response waits up to 50 ms to learn whether the
        server closes right after it (``closed``); a loop of keep-alive requests that never looks
        at ``closed`` passes False and does not pay that wait per request."""
        deadline = time.monotonic() + timeout
        while True:
            responses = self._parser.responses
            if len(responses) > self._taken and (responses[self._taken].complete or self.closed):
                r = responses[self._taken]
                self._taken += 1
                if learn_close and self._taken == len(responses) and not self.closed:
                    # Learn whether the server closes right after it (bounded, short).
                    await self._feed(0.05)
                    r.closed = self.closed
                return r
            if self.closed:
                raise ConnectionError("server closed without a response")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no response in time")
            await self._feed(left)

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bool:
        """Read until ``marker`` is among the received bytes (True) or ``timeout``/close (False)."""
        deadline = time.monotonic() + timeout
        while marker not in self.received:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return False
            await self._feed(left)
        return True

    async def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._feed(left)
        return True


async def exchange(
    port: int, data: bytes | list[bytes], delay: float = 0.0, timeout: float = 5.0
) -> Response:
    """Send ``data`` on a fresh connection and return the first response (with ``closed`` filled in)."""
    async with RawClient(port) as client:
        await client.send(data, delay)
        response = await client.response(timeout)
        if not response.closed:
            response.closed = await client.wait_closed(0.3)
        return response


@dataclass
class LoadResult:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # transport errors, as text (first 20 kept)
    error_count: int = 0

    def count(self, *codes: int) -> int:
        return sum(self.statuses.get(c, 0) for c in codes)

    def client_visible_errors(self, ok: tuple[int, ...] = (200,)) -> int:
        """Transport errors plus responses with a status not in ``ok``."""
        return self.error_count + sum(n for code, n in self.statuses.items() if code not in ok)


async def run_load(
    url: str,
    *,
    rate: float,
    seconds: float,
    connections: int = 4,
    timeout: float = 5.0,
    method: str = "GET",
    paths: list[str] | None = None,
    headers: Callable[[int], dict[str, str]] | None = None,
) -> LoadResult:
    """Send ``rate`` requests per second for ``seconds`` (bounded: at most rate*seconds requests).

    Request ``i`` goes to ``paths[i % len(paths)]`` with ``headers(i)`` when given."""
    total = max(1, int(rate * seconds))
    result = LoadResult()
    interval = 1.0 / rate
    paths = paths or ["/"]
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def one(i: int) -> None:
            try:
                extra = headers(i) if headers is not None else None
                r = await client.request(method, paths[i % len(paths)], headers=extra)
                result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
            except httpx.HTTPError as exc:
                result.error_count += 1
                if len(result.errors) < 20:
                    result.errors.append(f"{type(exc).__name__}: {exc}")

        start = time.monotonic()
        tasks = []
        for i in range(total):
            pause = start + i * interval - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)  # pacing the load, not synchronisation
            tasks.append(asyncio.ensure_future(one(i)))
            result.sent += 1
        await asyncio.gather(*tasks)
    return result
