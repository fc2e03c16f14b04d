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
