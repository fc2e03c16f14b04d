"""Soak: Fender (a subprocess) under mixed traffic for a long time, with upstream faults switching.

    python tests/soak/run.py              # 15 minutes (make soak)
    python tests/soak/run.py --minutes 2  # shorter

Traffic, at a fixed total rate: small GETs, POSTs with bodies (buffered and streamed),
large streamed downloads, pipelined keep-alive reuse, a stream of malformed requests and
slowloris heads, all on healthy routes; cache hits (a small set of cacheable URLs on a
route with a cache); many rate-limit keys (5000 X-Client values against a per-client limit
holding at most 2000 keys, plus a tight limit on /limited/ that answers 429); plus
requests to a route whose upstream sits behind a FaultProxy that switches fault every 10 s
(clean, latency, reset_peer, down, timeout, limit_data), and to a "resilient" route whose
upstream has that faulty replica and a healthy one, with retries, outlier detection,
health checks and a circuit breaker. Every 10 s it samples Fender's RSS and open fds
from /proc.

At the end it prints (and writes to tests/soak/last.json): RSS at start (after warm-up)
and end, the RSS slope over the second half in KiB/minute, fds at start and end (after
the load stopped and idle connections settled), client-visible errors on the healthy
routes (must be 0), and the status counts on the faulty route. Exit status 1 when a
healthy request failed, fds did not come back, or RSS kept growing (> 1 MiB/minute).

Response-cache hits and many rate-limit keys join the mix once those policies are merged
(their YAML knobs are not on this branch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.conftest import FenderProcess, free_port  # noqa: E402
from tests.support.fault_proxy import FaultProxy  # noqa: E402
from tests.support.procs import open_fds, rss_kib, wait_until  # noqa: E402
from tests.support.raw_client import RawClient  # noqa: E402
from tests.support.raw_upstream import RawUpstream  # noqa: E402

BIG = bytes(range(256)) * 1024  # 256 KiB


async def handler(req, conn):
    target = req.target
    if target.startswith(b"/cached/"):
        await conn.send(200, [(b"cache-control", b"max-age=30")], b"cached " + target)
    elif target.startswith(b"/big"):
        await conn.send(200, [(b"content-type", b"application/octet-stream")], BIG, chunked=True)
    elif req.method == b"POST":
        await conn.send(200, [], b"%d" % len(req.body))
    else:
        await conn.send(200, [(b"cache-control", b"max-age=1")], b"ok " + target)


POLICY = """
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
server:
  header_timeout: 2s
  keepalive_timeout: 5s
drain: {{delay: 0s, timeout: 5s}}
cache: {{max_size: 4MiB, max_object_size: 512KiB}}
upstreams:
  app:
    replicas: [{{url: http://127.0.0.1:{app}}}]
  flaky:
    replicas: [{{url: http://127.0.0.1:{flaky}}}]
    pool: {{connect_timeout: 500ms}}
  resilient:
    replicas: [{{url: http://127.0.0.1:{flaky}}}, {{url: http://127.0.0.1:{app2}}}]
    pool: {{connect_timeout: 300ms}}
    outlier_detection: {{consecutive_failures: 3, ejection_time: 5s}}
    health_check: {{interval: 500ms, timeout: 300ms, unhealthy_threshold: 2}}
routes:
  - name: flaky
    match: {{path_prefix: /flaky/}}
    upstream: flaky
    timeout: 1s
    idle_timeout: 1s
  - name: resilient
    match: {{path_prefix: /resilient/}}
    upstream: resilient
    timeout: 3s
    idle_timeout: 1s
    retry:
      attempts: 3
      per_try_timeout: 500ms
      backoff: {{initial: 5ms, max: 50ms}}
      retry_on: [connect_failure, connect_timeout, reset, timeout, bad_response, gateway_error]
    circuit_breaker: {{failure_rate: 90%, minimum_calls: 50, window: 100, open_for: 2s}}
  - name: cached
    match: {{path_prefix: /cached/}}
    upstream: app
    cache: {{}}
  - name: limited
    match: {{path_prefix: /limited/}}
    upstream: app
    rate_limit: {{rate: 2/s, burst: 2, key: "header:x-client"}}
  - name: app
    upstream: app
    idle_timeout: 2s
    rate_limit:
      - {{rate: 1/m, burst: 50, key: "header:x-client", max_keys: 2000}}  # buckets refill slowly: many held keys
      - {{rate: 5000/s, key: route}}
    bulkhead: {{max_concurrent: 200, max_queued: 200}}
    circuit_breaker: {{consecutive_failures: 50}}
"""

FAULTS = [
    {},
    {"latency": 0.05, "jitter": 0.03},
    {"reset_peer": 0},
    {"down": True},
    {"timeout": 0},
    {"limit_data": 300},
    {"bandwidth": 200_000},
]


class Stats:
    def __init__(self) -> None:
        self.healthy: dict[str, int] = {}
        self.healthy_errors: list[str] = []
        self.flaky: dict[str, int] = {}
        self.resilient: dict[str, int] = {}
        self.cached: dict[str, int] = {}
        self.limited: dict[str, int] = {}
        self.hostile = 0

    def add(self, table: dict[str, int], key) -> None:
        table[str(key)] = table.get(str(key), 0) + 1


async def healthy_request(client: httpx.AsyncClient, stats: Stats, rng: random.Random) -> None:
    kind = rng.random()
    who = {"X-Client": f"c{rng.randrange(5000)}"}  # 5000 rate-limit keys (the table holds 2000)
    try:
        if kind < 0.6:
            r = await client.get(f"/item/{rng.randrange(10_000)}", headers=who)
            ok = r.status_code == 200 and r.content.startswith(b"ok /item/")
        elif kind < 0.8:
            body = rng.randbytes(rng.choice([10, 2000, 100_000]))
            r = await client.post("/upload", content=body, headers=who)
            ok = r.status_code == 200 and r.content == b"%d" % len(body)
        else:
            r = await client.get("/big", headers=who)
            ok = r.status_code == 200 and r.content == BIG
        stats.add(stats.healthy, r.status_code)
        if not ok and len(stats.healthy_errors) < 50:
            stats.healthy_errors.append(f"{r.request.method} {r.request.url.path}: {r.status_code}")
    except httpx.HTTPError as exc:
        stats.add(stats.healthy, type(exc).__name__)
        if len(stats.healthy_errors) < 50:
            stats.healthy_errors.append(f"{type(exc).__name__}: {exc}")


async def flaky_request(client: httpx.AsyncClient, stats: Stats, rng: random.Random) -> None:
    resilient = rng.random() < 0.5
    table = stats.resilient if resilient else stats.flaky
    try:
        r = await client.get("/resilient/x" if resilient else "/flaky/x")
        stats.add(table, r.status_code)
    except httpx.HTTPError as exc:
        stats.add(table, type(exc).__name__)


async def cached_request(client: httpx.AsyncClient, stats: Stats, rng: random.Random) -> None:
    """A small URL set on the caching route (mostly hits), or a tightly limited route (some 429s)."""
    try:
        if rng.random() < 0.8:
            path = f"/cached/{rng.randrange(100)}"
            r = await client.get(path)
            ok = r.status_code == 200 and r.content == b"cached " + path.encode()
            stats.add(stats.cached, r.status_code if ok else f"bad {r.status_code}")
            if not ok and len(stats.healthy_errors) < 50:
                stats.healthy_errors.append(f"GET {path}: {r.status_code} {r.content[:40]!r}")
        else:
            r = await client.get("/limited/x", headers={"X-Client": f"l{rng.randrange(3)}"})
            stats.add(stats.limited, r.status_code)
    except httpx.HTTPError as exc:
        stats.add(stats.cached, type(exc).__name__)
        if len(stats.healthy_errors) < 50:
            stats.healthy_errors.append(f"{type(exc).__name__}: {exc}")


async def hostile_request(port: int, rng: random.Random, stats: Stats) -> None:
    stats.hostile += 1
    choice = rng.randrange(3)
    try:
        async with RawClient(port) as c:
            if choice == 0:
                await c.send(
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                )
            elif choice == 1:
                await c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x00\r\n\r\n")
            else:
                await c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")  # slowloris: cut by header_timeout
            await c.response(timeout=5)
    except (OSError, TimeoutError):
        pass


async def main(minutes: float, rate: float, seed: int) -> int:
    rng = random.Random(seed)
    stats = Stats()
    async with (
        RawUpstream(handler) as app,
        RawUpstream(handler) as app2,
        RawUpstream(handler) as flaky_up,
        FaultProxy(flaky_up.port) as fp,
    ):
        port, admin = free_port(), free_port()
        policy = Path("/tmp") / f"fender-soak-{port}.yaml"
        policy.write_text(POLICY.format(port=port, admin=admin, app=app.port, app2=app2.port, flaky=fp.port))
        proc = FenderProcess(policy)
        proc.start(port)
        pid = proc.proc.pid
        samples: list[tuple[float, int, int]] = []
        try:
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10
            ) as client:
                # warm-up (imports, pools), then the baseline
                await asyncio.gather(*(healthy_request(client, Stats(), rng) for _ in range(50)))
                start = time.monotonic()
                end = start + minutes * 60
                base_fds = open_fds(pid)
                samples.append((0.0, rss_kib(pid), base_fds))
                next_sample = start + 10
                next_fault = start + 10
                tasks: set[asyncio.Task] = set()
                i = 0
                while True:
                    now = time.monotonic()
                    if now >= end:
                        break
                    if now >= next_fault:
                        fp.clear()
                        fault = FAULTS[rng.randrange(len(FAULTS))]
                        if fault:
                            fp.set(**fault)
                        next_fault += 10
                    if now >= next_sample:
                        samples.append((now - start, rss_kib(pid), open_fds(pid)))
                        next_sample += 10
                        print(f"[{(now - start) / 60:5.1f} min] rss {samples[-1][1]} KiB fds {samples[-1][2]} "
                              f"healthy {stats.healthy} flaky {stats.flaky}", flush=True)  # fmt: skip
                    r = rng.random()
                    if r < 0.6:
                        coro = healthy_request(client, stats, rng)
                    elif r < 0.85:
                        coro = cached_request(client, stats, rng)
                    elif r < 0.97:
                        coro = flaky_request(client, stats, rng)
                    else:
                        coro = hostile_request(port, rng, stats)
                    if len(tasks) < 200:  # bounded in-flight: the load never piles up without limit
                        task = asyncio.ensure_future(coro)
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    else:
                        coro.close()
                        stats.add(stats.healthy, "client_backlog_skip")
                    i += 1
                    await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                if tasks:
                    await asyncio.wait(tasks, timeout=30)
            fp.clear()
            # let idle client and upstream connections close (keepalive_timeout 5s; pool idle); when
            # they do not, the soak reports the fd count below rather than stopping here
            with contextlib.suppress(AssertionError):
                await wait_until(
                    lambda: (
                        open_fds(pid) - app.open_connections - app2.open_connections - fp.open_connections
                        <= base_fds
                    ),
                    within=20,
                    step=0.5,
                )
            end_fds = open_fds(pid)
            upstream_conns = app.open_connections + app2.open_connections + fp.open_connections
            alive = proc.proc.poll() is None
            samples.append((time.monotonic() - start, rss_kib(pid), end_fds))
            # after the last RSS sample: rendering /metrics allocates (and starts a worker thread)
            async with httpx.AsyncClient(timeout=10) as admin_client:
                metrics_text = (await admin_client.get(f"http://127.0.0.1:{admin}/metrics")).text
        finally:
            proc.stop()
            policy.unlink(missing_ok=True)
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    slope = _slope([(t / 60, rss) for t, rss, _ in half]) if len(half) >= 2 else 0.0
    report = {
        "minutes": minutes,
        "rate_per_second": rate,
        "rss_kib_start": samples[0][1],
        "rss_kib_end": samples[-1][1],
        "rss_slope_kib_per_minute_second_half": round(slope, 1),
        "fds_start": samples[0][2],
        "fds_end": end_fds,
        "fds_end_held_by_pooled_upstream_connections": upstream_conns,
        "healthy_statuses": stats.healthy,
        "healthy_errors": len(stats.healthy_errors),
        "healthy_error_samples": stats.healthy_errors[:10],
        "flaky_statuses": stats.flaky,
        "resilient_statuses": stats.resilient,
        "cached_statuses": stats.cached,
        "cache_results": _samples(metrics_text, "fender_cache_requests_total", "result", route="cached"),
        "limited_statuses": stats.limited,
        "ratelimit_keys_app": _samples(metrics_text, "fender_ratelimit_keys", "route").get("app"),
        "ratelimit_decisions_app": _samples(
            metrics_text, "fender_ratelimit_requests_total", "decision", route="app"
        ),
        "hostile_connections": stats.hostile,
        "alive": alive,
    }
    print(json.dumps(report, indent=2))
    (Path(__file__).parent / "last.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = not alive or stats.healthy_errors or end_fds - upstream_conns > samples[0][2] or slope > 1024
    return 1 if failed else 0


def _samples(text: str, name: str, by: str, **labels: str) -> dict[str, float]:
    """Values of metric ``name`` by label ``by``, among the samples having ``labels``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()) and f'{by}="' in series:
            key = series.split(f'{by}="', 1)[1].split('"', 1)[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="how long to run (default 15)")
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second in total (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main(args.minutes, args.rate, args.seed)))
