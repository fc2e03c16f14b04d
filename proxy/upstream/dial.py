"""Opening a TCP connection to one of several addresses within one connect timeout.

A replica given by a host name may have several addresses. They are tried in
order, each with its own share of what is left of the budget (the remaining
time divided by the addresses not tried yet), so one blackholed address never
eats the whole connect timeout: with 1s and two addresses, a dead first one
costs 0.5s and the second still has 0.5s. A refused connection moves on at once.

:func:`tcp_connect` is the TCP step of a TLS connection (both pools of an ``https://`` replica,
HTTP/1.1 and HTTP/2): a connected socket that the TLS handshake then runs over.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence

__all__ = ["dial", "tcp_connect"]


async def dial(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    addresses: Sequence[str],
    port: int,
    timeout: float,
):
    """The protocol of the first address that accepts within its share; raises the last failure
    (TimeoutError when the last try ran out of time, else its OSError)."""
    deadline = loop.time() + timeout
    last: BaseException = TimeoutError()
    count = len(addresses)
    for tried, address in enumerate(addresses):
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            async with asyncio.timeout(left / (count - tried)):
                _, protocol = await loop.create_connection(factory, address, port)
            return protocol
        except TimeoutError as exc:
            last = exc
        except OSError as exc:
            last = exc
    raise last


async def tcp_connect(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    resolve: Callable[[], Awaitable[Sequence[str]]] | None = None,
):
    """A connected non-blocking TCP socket (the first address that answers), before any TLS.

    A host name with a resolver takes its addresses from the DNS name cache (proxy.cluster.dns)."""
    if resolve is not None:
        infos = []
        for ip in await resolve():  # addresses, so getaddrinfo does no lookup
            infos.extend(await loop.getaddrinfo(ip, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"{host} has no address")
