"""A TCP fault proxy for tests, with toxiproxy's fault names and meanings.

Put it between Fender and an upstream and switch faults while a test runs::

    async with FaultProxy(upstream_port) as fp:
        ...  # point Fender at 127.0.0.1:fp.port
        fp.set(latency=0.2, jitter=0.05)        # every chunk delayed 150..250 ms
        fp.set(timeout=0)                       # black hole: data stops, held forever
        fp.clear()                              # back to a clean pipe

Faults (toxiproxy semantics; times in seconds, sizes in bytes):

- ``latency`` (+ ``jitter``): each chunk waits ``latency ± jitter`` before it is passed on.
- ``bandwidth``: at most this many bytes per second.
- ``slicer``: ``(average_size, size_variation, delay)``; chunks are cut into slices of
  about ``average_size`` bytes, ``delay`` apart.
- ``timeout``: no data passes; the connection is closed after ``timeout`` seconds,
  or held forever when it is 0.
- ``reset_peer``: on the next data, the connection is reset (TCP RST) after this many
  seconds (0 = at once).
- ``limit_data``: the connection is closed once this many bytes passed in the stream.
- ``slow_close``: closing is delayed by this many seconds.
- ``down``: the listener is closed (new connections are refused) and open connections
  are cut; ``set(down=False)`` listens again on the same port.

Faults apply to one ``stream``: ``"downstream"`` (upstream -> client, the default,
as in toxiproxy) or ``"upstream"`` (client -> upstream); ``set(..., stream=...)``.
Settings are plain attributes read for every chunk, so switching takes effect on
the next chunk of every open connection. Every connection and task is closed by
:meth:`close`; ``open_connections`` counts client connections still open.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field

_CHUNK = 32 * 1024


@dataclass
class Toxics:
    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: int = 0  # bytes per second, 0 = unlimited
    slicer: tuple[int, int, float] | None = None
    timeout: float | None = None  # None = off, 0 = hold forever
    reset_peer: float | None = None
    limit_data: int = 0  # 0 = off
    slow_close: float = 0.0

    def active(self) -> bool:
        return self != Toxics()


@dataclass(eq=False)
class _Conn:
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and not writer.transport.is_closing():
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, seed: int = 1) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.streams = {"downstream": Toxics(), "upstream": Toxics()}
        self.down = False
        self.connections = 0  # accepted so far
        self.bytes = {"downstream": 0, "upstream": 0}
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._relisten: asyncio.Task | None = None  # set(down=False) listening again
        self._random = random.Random(seed)

    # -- control

    def set(self, *, stream: str = "downstream", down: bool | None = None, **toxics) -> None:
        """Add or change faults on ``stream`` (see the module docstring); ``down`` switches the listener."""
        current = self.streams[stream]
        for name, value in toxics.items():
            if not hasattr(current, name):
                raise TypeError(f"unknown toxic {name!r}")
            setattr(current, name, value)
        if down is not None and down != self.down:
            self.down = down
            if down:
                # An "up" not yet carried out must not reopen the port: _listen sees self.down (it is
                # not cancelled: that could leave its half-opened listening socket behind).
                self._stop_listening()
                for conn in list(self._conns):
                    self._kill(conn)
            elif self._relisten is None or self._relisten.done():
                self._relisten = asyncio.get_running_loop().create_task(self._listen())

    def clear(self) -> None:
        """Remove every fault (the listener comes back if it was down)."""
        self.streams = {"downstream": Toxics(), "upstream": Toxics()}
        if self.down:
            self.set(down=False)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- lifecycle

    async def __aenter__(self) -> FaultProxy:
        await self._listen()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        # Bound but not listening until down is known to be still off: switching down -> up -> down
        # within a loop tick never lets a connection in, and leaves no socket behind.
        server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True, start_serving=False
        )
        self.port = server.sockets[0].getsockname()[1]
        if self.down:
            server.close()
            return
        self._server = server
        await server.start_serving()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self) -> None:
        if self._relisten is not None:
            # else it would open a listener after close
            await asyncio.gather(self._relisten, return_exceptions=True)
        self._stop_listening()
        conns = list(self._conns)
        for conn in conns:
            self._kill(conn)
        tasks = [t for c in conns for t in c.tasks if not t.done()]
        writers = [c.client[1] for c in conns] + [c.upstream[1] for c in conns if c.upstream is not None]
        async with asyncio.timeout(5):
            if tasks:
                await asyncio.wait(tasks)
            # aborted transports close their sockets in connection_lost, a loop turn later
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)

    def _kill(self, conn: _Conn) -> None:
        conn.client[1].transport.abort()
        if conn.upstream is not None:
            conn.upstream[1].transport.abort()
        for task in conn.tasks:
            task.cancel()
        self._conns.discard(conn)

    # -- data path

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = _Conn((reader, writer))
        conn.tasks.append(asyncio.current_task())  # killing the connection ends this handler too
        self._conns.add(conn)
        try:
            try:
                conn.upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                _rst(writer)  # like a refused upstream, seen through the proxy
                return
            up = asyncio.ensure_future(self._pipe(conn, reader, conn.upstream[1], "upstream"))
            down = asyncio.ensure_future(self._pipe(conn, conn.upstream[0], writer, "downstream"))
            conn.tasks += [up, down]
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            # One side ended: finish the other after slow_close, then drop both.
            delay = max(self.streams["downstream"].slow_close, self.streams["upstream"].slow_close)
            if delay:
                await asyncio.sleep(delay)
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            writer.close()
            if conn.upstream is not None:
                conn.upstream[1].close()
            self._conns.discard(conn)

    async def _pipe(self, conn: _Conn, reader, writer, stream: str) -> None:
        passed = 0
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            t = self.streams[stream]
            if t.timeout is not None:
                # Data stops here; the connection is held (forever with 0) then closed.
                if t.timeout == 0:
                    await asyncio.Event().wait()
                await asyncio.sleep(t.timeout)
                return
            if t.reset_peer is not None:
                if t.reset_peer:
                    await asyncio.sleep(t.reset_peer)
                # The peer receiving this stream sees a reset; the other side is closed.
                peer = conn.client[1] if stream == "downstream" else conn.upstream[1]
                other = conn.upstream[1] if stream == "downstream" else conn.client[1]
                _rst(peer)
                _rst(other)
                return
            if t.limit_data:
                room = t.limit_data - passed
                if room <= 0:
                    return
                data = data[:room]
            if t.latency or t.jitter:
                await asyncio.sleep(max(0.0, t.latency + self._random.uniform(-t.jitter, t.jitter)))
            slices = [data]
            if t.slicer is not None:
                size, variation, _ = t.slicer
                slices = []
                i = 0
                while i < len(data):
                    n = max(1, size + self._random.randint(-variation, variation))
                    slices.append(data[i : i + n])
                    i += n
            for index, piece in enumerate(slices):
                if t.bandwidth:
                    await asyncio.sleep(len(piece) / t.bandwidth)
                if t.slicer is not None and index:
                    await asyncio.sleep(t.slicer[2])
                writer.write(piece)
                await writer.drain()
            passed += len(data)
            self.bytes[stream] += len(data)
            if t.limit_data and passed >= t.limit_data:
                return
