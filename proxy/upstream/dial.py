"""Opening a TCP connection to one of several addresses within one connect timeout.

A replica given by a host name may have several addresses. They are tried in
order, each with its own share of what is left of the budget (the remaining
time divided by the addresses not tried yet), so one blackholed address never
eats the whole connect timeout: with 1s and two addresses, a dead first one
costs 0.5s and the second still has 0.5s. A refused connection moves on at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

__all__ = ["dial"]


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
