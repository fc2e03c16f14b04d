"""A small keep-alive HTTP/1.1 load client for the benchmark.

usage: load.py URL SECONDS CONNECTIONS [RATE]
  without RATE: closed loop, each connection sends its next request when the previous answer is in
                (used when wrk is not installed);
  with RATE:    fixed rate (requests per second over all connections); latency is measured from each
                request's scheduled start, so a stall is not hidden (no coordinated omission).
prints JSON {rps, requests, errors, p50_ms, p99_ms}. Bounded: it stops after SECONDS.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def _exchange(reader, writer, request: bytes) -> bool:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 2")


async def closed_loop_worker(host, port, request, deadline, latencies, counters):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            ok = await _exchange(reader, writer, request)
            latencies.append(time.perf_counter() - started)
            if not ok:
                counters["errors"] += 1
    except (OSError, asyncio.IncompleteReadError):
        counters["errors"] += 1
    finally:
        writer.close()


async def fixed_rate_worker(host, port, request, start, interval, offset, deadline, latencies, counters):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        n = 0
        while True:
            scheduled = start + offset + n * interval
            if scheduled >= deadline:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            ok = await _exchange(reader, writer, request)
            latencies.append(time.perf_counter() - scheduled)
            if not ok:
                counters["errors"] += 1
            n += 1
    except (OSError, asyncio.IncompleteReadError):
        counters["errors"] += 1
    finally:
        writer.close()


async def main(url: str, seconds: float, connections: int, rate: float | None = None) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    counters = {"errors": 0}
    started = time.perf_counter()
    deadline = started + seconds
    if rate:
        interval = connections / rate  # each connection's own period
        start = started + 0.05
        workers = [
            fixed_rate_worker(
                host,
                port,
                request,
                start,
                interval,
                i * interval / connections,
                deadline,
                latencies,
                counters,
            )
            for i in range(connections)
        ]
    else:
        workers = [
            closed_loop_worker(host, port, request, deadline, latencies, counters) for _ in range(connections)
        ]
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000 if latencies else 0.0

    return {
        "rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "errors": counters["errors"],
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
    }


if __name__ == "__main__":
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), rate))))
