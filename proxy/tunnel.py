"""Byte tunnels for upgraded connections (WebSocket and other ``Upgrade`` protocols).

Once the upstream answers ``101 Switching Protocols``, the client connection
and the upstream connection stop speaking HTTP: each transport gets a
:class:`TunnelEnd` as its protocol (``transport.set_protocol``), and bytes
read on one end are written to the other, in the event loop's callbacks,
with no task or queue per chunk.

Flow control: when one end's transport has more than its write buffer's
high-water mark queued (the peer reads slower than the other side writes),
asyncio calls that end's ``pause_writing`` and the *other* end stops
reading until it drains. So each direction holds at most a write buffer and
one read, whatever the message size.

Half-close is passed on (``write_eof``); the tunnel ends when both sides
have closed their sending half, when either connection is lost, when
nothing moved either way for ``idle_timeout`` (see :class:`TunnelSet`), or
when it is closed (drain, shutdown).

Until the tunnel starts, an end buffers what arrives (bounded: reading
pauses above ``_PRE_START_LIMIT``) and passes flow-control and loss to the
HTTP protocol it replaced, so an answer other than 101 is still written and
accounted by that protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from proxy.clock import Clock

_PRE_START_LIMIT = 64 * 1024  # bytes an end buffers before its tunnel starts; reading pauses beyond
SWEEP_INTERVAL = 1.0  # seconds between idle checks of the open tunnels


class UpgradeOffer:
    """What a client's ``Upgrade`` request offers (in the ASGI scope as ``fender.upgrade``)."""

    __slots__ = ("protocols", "value", "client_end")

    def __init__(self, protocols: tuple[str, ...], value: bytes) -> None:
        self.protocols = protocols  # lowercased names without versions, e.g. ("websocket",)
        self.value = value  # the Upgrade field to send upstream (h2c left out)
        # Set by the server protocol once the request head is parsed: the client's side of a tunnel.
        self.client_end: TunnelEnd | None = None


def upgrade_offer(headers: list[tuple[bytes, bytes]]) -> UpgradeOffer | None:
    """The protocols a request's Upgrade field offers, h2c left out (RFC 9110 7.8 lets a server
    ignore an upgrade; curl's --http2 on cleartext is then served as HTTP/1.1). None if none is left."""
    offered: list[bytes] = []
    for name, value in headers:
        if name == b"upgrade":
            offered += (item.strip() for item in value.split(b","))
    kept = [item for item in offered if item and item.split(b"/")[0].strip().lower() != b"h2c"]
    if not kept:
        return None
    names = tuple(item.split(b"/")[0].strip().lower().decode("latin-1") for item in kept)
    return UpgradeOffer(names, b", ".join(kept))


class TunnelEnd(asyncio.Protocol):
    """The protocol of one side's transport once that side leaves HTTP."""

    def __init__(self, transport: asyncio.Transport, early: bytes, fallback=None, on_lost=None) -> None:
        self.transport = transport
        self.tunnel: Tunnel | None = None
        self.peer: TunnelEnd | None = None
        self.early = [early] if early else []  # read before the tunnel started
        self.early_size = len(early)
        self.eof = False  # this side closed its sending half
        self.lost = False
        self.reading_paused = False
        # The HTTP protocol this end replaced: gets write flow control until the tunnel starts.
        self.fallback = fallback
        # Told when the connection is gone, tunnel or not (the protocol's own cleanup, the pool slot).
        self.on_lost: Callable[[Exception | None], None] | None = on_lost
        self.bytes_in = 0  # read from this side (and written to the peer)

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.lost:
            self.reading_paused = True
            try:
                self.transport.pause_reading()
            except (AttributeError, RuntimeError):
                pass

    def resume_reading(self) -> None:
        if self.reading_paused and not self.lost:
            self.reading_paused = False
            try:
                self.transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass

    def abort(self) -> None:
        if not self.lost:
            self.transport.abort()

    # -- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            self.early.append(data)
            self.early_size += len(data)
            if self.early_size > _PRE_START_LIMIT:
                self.pause_reading()
            return
        self.bytes_in += len(data)
        tunnel.last_activity = tunnel.clock.now()
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.half_closed(self)
        return True  # keep the transport open: the other direction may still carry bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.close()
        self.fallback = None
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(exc)

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.peer.pause_reading()  # type: ignore[union-attr]
        elif self.fallback is not None:
            self.fallback.pause_writing()

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.peer.resume_reading()  # type: ignore[union-attr]
        elif self.fallback is not None:
            self.fallback.resume_writing()


class ByteCounts(Protocol):
    """Where a tunnel reports the bytes it relayed (proxy.metrics.TunnelMetrics)."""

    def add_bytes(self, upstream: int, downstream: int) -> None: ...


class Tunnel:
    """Two ends spliced together; ``done`` resolves when it has ended."""

    def __init__(
        self,
        client: TunnelEnd,
        upstream: TunnelEnd,
        clock: Clock,
        idle_timeout: float,
        on_close: Callable[[Tunnel], None] | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.started = self.last_activity = clock.now()
        self.closed = False
        self.reason = ""  # why it ended: client_closed, upstream_closed, idle_timeout, shutdown
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._on_close = on_close
        self.metrics: ByteCounts | None = None  # bytes are reported to it by report()
        self.route_name = ""
        self._reported = (0, 0)

    def start(self) -> None:
        """Splice the ends: pass on what each buffered, then relay in the transports' callbacks."""
        client, upstream = self.client, self.upstream
        client.peer, upstream.peer = upstream, client
        for end in (client, upstream):
            end.fallback = None  # from now on this end's flow control and loss belong to the tunnel
            end.tunnel = self
        for end in (client, upstream):
            early, end.early = end.early, []
            end.early_size = 0
            if early and not end.peer.lost:  # type: ignore[union-attr]
                data = b"".join(early)
                end.bytes_in += len(data)
                end.peer.transport.write(data)  # type: ignore[union-attr]
            end.resume_reading()
        if client.lost or upstream.lost:
            self.close("client_closed" if client.lost else "upstream_closed")
            return
        for end in (client, upstream):
            if end.eof:
                self.half_closed(end)

    def half_closed(self, end: TunnelEnd) -> None:
        """``end`` will send nothing more: tell its peer, and end the tunnel once both are done."""
        peer = end.peer
        if peer is None or self.closed:
            return
        if peer.eof:
            self.close("client_closed" if end is self.client else "upstream_closed")
            return
        try:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
                return
        except (OSError, RuntimeError):
            pass
        self.close("client_closed" if end is self.client else "upstream_closed")

    def report(self) -> None:
        """Add the bytes relayed since the last report to the metrics."""
        if self.metrics is not None:
            up, down = self.client.bytes_in, self.upstream.bytes_in
            self.metrics.add_bytes(up - self._reported[0], down - self._reported[1])
            self._reported = (up, down)

    def idle_for(self, now: float) -> float:
        return now - self.last_activity

    def close(self, reason: str = "") -> None:
        """End the tunnel: both connections are closed (flushing what is queued) and never reused."""
        if self.closed:
            return
        self.closed = True
        if not self.reason:
            if reason:
                self.reason = reason
            elif self.client.lost:
                self.reason = "client_closed"
            else:
                self.reason = "upstream_closed"
        for end in (self.client, self.upstream):
            if not end.lost:
                end.transport.close()  # after what is queued: the last bytes either way still leave
        if not self.done.done():
            self.done.set_result(self.reason)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)


class TunnelSet:
    """The open tunnels of a listener, idle-checked on one shared timer (shutdown closes each tunnel
    through its data-plane task, which the server cancels once the drain grace has passed)."""

    def __init__(self, clock: Clock, interval: float = SWEEP_INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self.open: set[Tunnel] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.on_sweep: Callable[[], None] | None = None  # e.g. move byte counts into metrics

    def add(self, tunnel: Tunnel) -> None:
        self.open.add(tunnel)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def discard(self, tunnel: Tunnel) -> None:
        self.open.discard(tunnel)

    def _tick(self) -> None:
        self._timer = None
        self.sweep()
        if self.open:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def sweep(self) -> int:
        """Close the tunnels idle for longer than their timeout (by the injected clock); how many."""
        now = self.clock.now()
        idle = [t for t in self.open if t.idle_for(now) >= t.idle_timeout]
        for tunnel in idle:
            tunnel.close("idle_timeout")
        if self.on_sweep is not None:
            self.on_sweep()
        return len(idle)
