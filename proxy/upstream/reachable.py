"""A bare TCP reachability probe (readiness, automatic rollback); never on the request path."""

from __future__ import annotations

import asyncio


async def tcp_reachable(host: str, port: int, timeout: float) -> bool:
    """True when host:port accepts a TCP connection within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
