"""Pool defaults that fit real concurrency (issue 17): what a burst opened stays idle for reuse."""

from __future__ import annotations

import asyncio

import httpx

from proxy.config import parse_policy
from tests.conftest import policy_text
from tests.support.raw_upstream import RawUpstream, Request, Responder

CONCURRENCY = 50
IDLE = 'fender_upstream_pool_connections{replica="127.0.0.1:%d",state="idle",upstream="echo"}'


def held_until(count: int):
    """A handler answering once ``count`` requests of the current wave are in flight at once.

    Each wave therefore needs ``count`` upstream connections open at the same time."""
    state = {"arrived": 0, "gate": asyncio.Event()}

    async def handler(req: Request, conn: Responder) -> None:
        state["arrived"] += 1
        gate = state["gate"]
        if state["arrived"] % count == 0:
            state["gate"] = asyncio.Event()  # the next wave waits on its own gate
            gate.set()
        async with asyncio.timeout(10):
            await gate.wait()
        await conn.send(200, [], req.target)

    return handler


async def test_default_pool_keeps_what_a_burst_opened(start_fender) -> None:
    async with RawUpstream(held_until(CONCURRENCY)) as up:
        fender = await start_fender(policy_text(up.port))
        assert fender.policy.upstreams["echo"].pool.max_keepalive == 100
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=fender.url, limits=limits, timeout=15) as client:
            for wave in range(2):
                paths = [f"/w{wave}/{i}" for i in range(CONCURRENCY)]
                responses = await asyncio.gather(*(client.get(p) for p in paths))
                assert [(r.status_code, r.text) for r in responses] == [(200, p) for p in paths]
                # Every connection of the wave went back to the pool (released before its response
                # reached the client), none was closed, and the second wave opened none.
                metrics = (await client.get(f"{fender.admin_url}/metrics")).text
                assert f"{IDLE % up.port} {CONCURRENCY:.1f}" in metrics, f"wave {wave}"
                assert (up.connections, up.disconnects) == (CONCURRENCY, 0), f"wave {wave}"
        assert up.errors == []


def test_keepalive_follows_max_connections() -> None:
    def pool(text: str):
        policy = "upstreams:\n  echo:\n    replicas: [{url: http://127.0.0.1:9001}]\n    pool: " + text + "\n"
        return parse_policy(policy + "routes: [{name: all, upstream: echo}]\n").upstreams["echo"].pool

    assert (pool("{}").max_connections, pool("{}").max_keepalive) == (100, 100)
    assert pool("{max_connections: 300}").max_keepalive == 300
    assert pool("{max_connections: 5}").max_keepalive == 5
    # What the user wrote stays.
    assert pool("{max_connections: 300, max_keepalive: 20}").max_keepalive == 20
    assert pool("{max_keepalive: 0}").max_keepalive == 0
