"""Built-in demo upstreams, so `make run` has something to proxy to at once.

One tiny raw-ASGI server per replica URL of the policy that points at this
machine. Each answers with its own name; paths containing "flaky" fail with
503 about a third of the time, `/slow?ms=N` waits, `/status/NNN` answers NNN.
"""

from __future__ import annotations

import asyncio
import json
import random
from urllib.parse import parse_qs

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class DemoUpstream:
    def __init__(self, name: str, flaky_ratio: float = 1 / 3, seed: int | None = None) -> None:
        self.name = name
        self.flaky_ratio = flaky_ratio
        self._random = random.Random(seed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        query = parse_qs(scope["query_string"].decode("latin-1"))
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        status = 200
        if path.startswith("/status/") and path[8:].isdigit():
            status = min(max(int(path[8:]), 200), 599)
        elif "flaky" in path and self._random.random() < self.flaky_ratio:
            status = 503
        if "ms" in query and query["ms"][0].isdigit():
            await asyncio.sleep(min(int(query["ms"][0]), 30_000) / 1000)
        body = json.dumps(
            {"replica": self.name, "method": scope["method"], "path": path, "status": status}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def demo_replicas(policy) -> list[tuple[str, str, int]]:
    """(name, host, port) of every replica in the policy that listens on this machine."""
    seen = set()
    out = []
    for upstream_name, upstream in policy.upstreams.items():
        for replica in upstream.replicas:
            key = (replica.host, replica.port)
            if replica.host in LOCAL_HOSTS and key not in seen:
                seen.add(key)
                role = "primary" if replica.priority == 0 else f"standby-p{replica.priority}"
                out.append((f"{upstream_name}/{role}@{replica.port}", replica.host, replica.port))
    return out
