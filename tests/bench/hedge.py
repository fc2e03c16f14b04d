"""`make bench` row for hedged requests: p99 with and without hedging against a slow-tail replica.

Two upstream replicas behind round robin: one answers at once, the other holds a seeded 10% of
its requests for 500 ms (so 5% of first tries are slow). Two Fenders on core 0 with the same
route, one plain, one with ``hedge: {after: p90, budget: 15%}`` (``p90``: the slow share is 5%
of tries, so p95 would sit on the edge of the tail). A client (core 1, with the
upstreams) sends the same number of requests through each over a few keep-alive connections
and records each request's time; the report gives p50/p99/max of both and the p99 ratio,
plus the hedges Fender sent and how many won. One run, not rounds: the tail is made by the
seeded replica, not by the machine. Usage: python tests/bench/hedge.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.run import RAW_UPSTREAM, ROOT, Procs, free_port, taskset, wait_port  # noqa: E402

# The slow-tail replica: HTTP/1.1 keep-alive; a seeded 10% of requests wait 500 ms first.
SLOW_TAIL = """
import asyncio, random, sys
rng = random.Random(int(sys.argv[2]))
async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\\r\\n\\r\\n")
            if rng.random() < 0.10:
                await asyncio.sleep(0.5)
            writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

VARIANTS = {"plain": "", "hedged": ", hedge: {after: p90, budget: 15%}"}


def policy(workdir: Path, name: str, port: int, admin: int, upstreams: tuple[int, int]) -> Path:
    path = workdir / f"hedge-{name}.yaml"
    replicas = ", ".join(f"{{url: http://127.0.0.1:{p}}}" for p in upstreams)
    path.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\n"
        f"upstreams:\n  pair:\n    replicas: [{replicas}]\n    balance: round_robin\n"
        f"routes:\n  - {{name: r, upstream: pair, timeout: 5s{VARIANTS[name]}}}\n"
    )
    return path


async def _client(port: int, count: int, interval: float, times: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /h HTTP/1.1\r\nhost: bench\r\n\r\n"
    loop = asyncio.get_running_loop()
    due = loop.time()
    try:
        for _ in range(count):
            due += interval
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await reader.readexactly(length)
            # From when the request was due, not when it went: a request held up behind a slow
            # one on its connection counts the wait (no coordinated omission).
            times.append(loop.time() - due)
    finally:
        writer.close()


def measure(port: int, requests: int, connections: int, rate: float) -> dict:
    times: list[float] = []

    async def run() -> None:
        per = requests // connections
        await asyncio.gather(*(_client(port, per, connections / rate, times) for _ in range(connections)))

    asyncio.run(run())
    times.sort()

    def at(q: float) -> float:
        return round(times[min(int(q * len(times)), len(times) - 1)] * 1000, 2)

    return {"requests": len(times), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0)}


def metric(admin: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    total = 0.0
    for m in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second, both variants")
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--json", default=str(ROOT / "tests" / "bench" / "last-hedge.json"))
    args = parser.parse_args(argv)
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-hedge-"))
    fast, slow = free_port(), free_port()
    results: dict[str, dict] = {}
    try:
        procs.start([*taskset(1), sys.executable, "-c", RAW_UPSTREAM, str(fast)])
        procs.start([*taskset(1), sys.executable, "-c", SLOW_TAIL, str(slow), str(args.seed)])
        wait_port(fast)
        wait_port(slow)
        for name in VARIANTS:
            port, admin = free_port(), free_port()
            path = policy(workdir, name, port, admin, (slow, fast))
            cmd = [*taskset(0), sys.executable, "-m", "proxy", "run", str(path), "--log-level", "warning"]
            proc = procs.start(cmd, cwd=ROOT)
            wait_port(port, timeout=60)
            results[name] = measure(port, args.requests, args.connections, args.rate)
            results[name]["hedges_sent"] = metric(admin, "fender_hedges_sent_total")
            results[name]["hedges_won"] = metric(admin, "fender_hedge_winners_total", winner="hedge")
            print(
                f"{name:7s} p50 {results[name]['p50_ms']:8.2f}ms  p99 {results[name]['p99_ms']:8.2f}ms",
                file=sys.stderr,
            )
            proc.terminate()
            proc.wait(timeout=15)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "results": results,
        "ratios": {
            "hedged_p99_vs_plain_p99": round(results["hedged"]["p99_ms"] / results["plain"]["p99_ms"], 3)
        },
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
