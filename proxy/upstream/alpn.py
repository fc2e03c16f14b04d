"""``protocol: auto`` to an ``https://`` replica: HTTP/2 or HTTP/1.1, as the replica chooses by ALPN.

:class:`AutoPool` keeps the pool contract (``request``, the gauges' counts, ``close``) over two
pools of the same replica sharing one :class:`~proxy.upstream.tls.ClientTLS` (its context offers
``h2`` then ``http/1.1``, and a session one pool made is resumed by the other): an
:class:`~proxy.upstream.http2.H2Pool` and an :class:`~proxy.upstream.pool.UpstreamPool`. Requests
go to the pool of the protocol the replica chose at its latest connect, HTTP/2 until a replica
said otherwise. When a new connection's handshake picks the other protocol, that connection is
closed before a byte of HTTP went over it (the pool raises
:class:`~proxy.upstream.errors.ALPNMismatch`), the choice flips, and the request goes to the other
pool at once: nothing was sent, so this is no retry. A switch costs one more handshake (resumed
when the replica keeps sessions); connections already open in the previous protocol finish their
requests and expire as idle connections do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .errors import ALPNMismatch
from .http2 import H2Pool
from .pool import UpstreamPool
from .tls import ClientTLS

__all__ = ["AutoPool"]

# Switches within one request before it fails (a replica whose ALPN answer flips on every connect).
_MAX_SWITCHES = 2


class AutoPool:
    """The pool of one ``https://`` replica with ``protocol: auto``; see the module docstring."""

    protocol = "auto"

    def __init__(self, http1: UpstreamPool, h2: H2Pool) -> None:
        self.http1 = http1
        self.h2 = h2
        http1.alpn_switch = True
        self.current: UpstreamPool | H2Pool = h2
        self.switches = 0  # times the replica's ALPN choice changed (tests, admin)

    # -- the attributes the cluster reads -------------------------------------------------------

    @property
    def host(self) -> str:
        return self.http1.host

    @property
    def port(self) -> int:
        return self.http1.port

    @property
    def address(self) -> str:
        return self.http1.address

    @property
    def unix_path(self) -> str | None:
        return None

    @property
    def tls(self) -> ClientTLS | None:
        return self.http1.tls

    @property
    def connect_timeout(self) -> float:
        return self.http1.connect_timeout

    @property
    def max_connections(self) -> int:
        return self.http1.max_connections

    @property
    def max_pending(self) -> int:
        return self.http1.max_pending

    @property
    def chosen(self) -> str:
        """The protocol requests go in now: ``h2`` or ``http1``."""
        return "h2" if self.current is self.h2 else "http1"

    @property
    def in_use(self) -> int:
        return self.http1.in_use + self.h2.in_use

    @property
    def idle(self) -> int:
        return self.http1.idle + self.h2.idle

    @property
    def pending(self) -> int:
        return self.http1.pending + self.h2.pending

    @property
    def streams(self) -> int:
        return self.h2.streams

    @property
    def connections_opened(self) -> int:
        return self.http1.connections_opened + self.h2.connections_opened

    @property
    def tls_handshakes(self) -> int:
        return self.http1.tls_handshakes + self.h2.tls_handshakes

    @property
    def tls_resumed(self) -> int:
        return self.http1.tls_resumed + self.h2.tls_resumed

    @property
    def on_tls_handshake(self) -> Callable[[bool], None] | None:
        return self.http1.on_tls_handshake

    @on_tls_handshake.setter
    def on_tls_handshake(self, hook: Callable[[bool], None] | None) -> None:
        self.http1.on_tls_handshake = hook
        self.h2.on_tls_handshake = hook

    def __repr__(self) -> str:
        return f"<AutoPool {self.address} speaking {self.chosen}>"

    # -- requests -------------------------------------------------------------------------------

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        **kwargs,
    ):
        """The request on the pool of the protocol the replica chose (see UpstreamPool.request)."""
        for switched in range(_MAX_SWITCHES + 1):
            pool = self.current
            try:
                return await pool.request(method, target, headers, **kwargs)
            except ALPNMismatch as exc:
                if switched == _MAX_SWITCHES:
                    raise
                wanted: UpstreamPool | H2Pool = self.h2 if exc.selected == "h2" else self.http1
                if wanted is pool:
                    raise
                if self.current is pool:
                    self.current = wanted
                    self.switches += 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        await self.http1.close()
        await self.h2.close()


def auto_pools(
    host: str,
    port: int,
    tls: ClientTLS,
    resolve: Callable[[], Awaitable[Sequence[str]]] | None = None,
    pool_class: type[UpstreamPool] = UpstreamPool,
    **options,
) -> AutoPool:
    """The two pools of one replica with ``protocol: auto``; ``options`` are the pool settings both take
    (``max_concurrent_streams`` goes to the HTTP/2 pool only)."""
    streams = options.pop("max_concurrent_streams", 100)
    extra: dict[str, Any] = {} if resolve is None else {"resolve": resolve}
    http1 = pool_class(host, port, tls=tls, **extra, **options)
    h2 = H2Pool(host, port, tls=tls, resolve=resolve, max_concurrent_streams=streams, **options)
    return AutoPool(http1, h2)
