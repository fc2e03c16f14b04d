"""A small keep-alive HTTP/1.1 load client, used by the benchmark when wrk is not installed.

usage: load.py URL SECONDS CONNECTIONS  -> prints JSON {rps, requests, errors, p50_ms, p99_ms}
Bounded: it stops after SECONDS; each connection sends one request at a time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def worker(host, port, path, deadline, latencies, counters):
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 2"):
                counters["errors"] += 1
    except (OSError, asyncio.IncompleteReadError):
        counters["errors"] += 1
    finally:
        writer.close()


async def main(url: str, seconds: float, connections: int) -> dict:
    parts = urlsplit(url)
    latencies: list[float] = []
    counters = {"errors": 0}
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(
            worker(parts.hostname, parts.port, parts.path or "/", deadline, latencies, counters)
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000 if latencies else 0.0  # noqa: E731
    return {
        "rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "errors": counters["errors"],
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))))
