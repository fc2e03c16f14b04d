"""Fleet tests' helpers: several Fenders sharing one Redis server started by the test."""

from __future__ import annotations

import asyncio
import uuid

from tests.conftest import policy_text
from tests.support.redis_server import redis_server_fixture  # noqa: F401  (the redis_server fixture)

# Sidecars of one fleet see the same Host (the service's name); the cache key includes it.
HOST = {"Host": "catalog.svc"}


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


async def start_fleet(start_fender, text: str, n: int = 3):
    fenders = [await start_fender(text) for _ in range(n)]
    for fender in fenders:
        await wait_subscribed(fender)
    return fenders


async def drain_writes(fender) -> None:
    async with asyncio.timeout(5):
        await fender.runtime.exposed["state"]["redis"].flush()


def limit_policy(upstream_port: int, redis_url: str, limit: str, state_extra: str = "", cache: bool = False):
    routes = f"""
      - name: all
        upstream: echo
        rate_limit: {limit}
"""
    if cache:
        routes += "        cache: {default_ttl: 60s}\n"
    return policy_text(upstream_port, routes=routes) + (
        f"state:\n  backend: redis\n  redis:\n    url: {redis_url}\n    key_prefix: '{prefix()}'\n"
        f"    timeout: 200ms\n{state_extra}"
    )


def redis_time(server) -> float:
    reply = server.command("TIME").split(b"\r\n")
    return int(reply[2]) + int(reply[4]) / 1e6


async def wait_subscribed(fender, timeout: float = 10.0) -> None:
    state = fender.runtime.exposed["state"]["redis"]
    async with asyncio.timeout(timeout):
        await state.subscribed.wait()
