"""A bare reachability probe (readiness, automatic rollback); never on the request path."""

from __future__ import annotations

import asyncio


async def tcp_reachable(host: str, port: int, timeout: float, unix_path: str | None = None) -> bool:
    """True when host:port (or the unix socket ``unix_path``) accepts a connection within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            if unix_path is None:
                _, writer = await asyncio.open_connection(host, port)
            else:
                _, writer = await asyncio.open_unix_connection(unix_path)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def replica_reachable(replica, timeout: float) -> bool:
    """:func:`tcp_reachable` for a replica of the runtime: a host name's addresses come from the DNS
    name cache (``replica.resolve``), each tried with its share of ``timeout``."""
    resolve = getattr(replica, "resolve", None)
    if resolve is None:
        return await tcp_reachable(replica.host, replica.port, timeout, replica.unix_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout(timeout):
            addresses = await resolve()
    except (OSError, TimeoutError):
        return False
    for tried, address in enumerate(addresses):
        left = deadline - loop.time()
        if left <= 0:
            return False
        if await tcp_reachable(address, replica.port, left / (len(addresses) - tried)):
            return True
    return False
