"""`make bench`: Fender's data path against direct, nginx and the Python server's ceiling, in one run.

Layout on 2 cores: the server under test (Fender, nginx as a proxy, or the
hello-world ceiling) is pinned to core 0; the upstream and the load generator
share core 1. Each round measures every target once, in turn, so noise from a
shared machine hits them alike; the report gives the median of the rounds and
ratios between targets of the same run (absolute numbers from these machines
do not compare across runs).

Targets: `direct` (the upstream itself), `nginx_proxy` (when nginx is
installed), `fender` (pass-through route), `fender_300_routes` (the same
route, last of a 300-route policy), `fender_policies` (rate limit,
bulkhead, retry, breaker, failover over two replicas with health checks, cache
on a non-cacheable response), `fender_cache_hit`, and `hello_world` (uvicorn
raw ASGI answering directly: the ceiling of the Python server). With
redis-server installed, a second Fender in fleet mode (a private redis-server
on core 1) gives `fender_local_limit` and `fender_global_limit`: the same
route with a rate limit of scope local and of scope global (leased), never
refusing. `--only NAME,...` measures only those targets.

Upstream: nginx when installed, else a bundled raw asyncio server. Load: wrk
when installed, else the bundled client (tests/bench/load.py). Everything
listens on 127.0.0.1 and every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "tests" / "bench" / "baseline.json"
BODY = "x" * 128

# Ratios the data path is held to (issue 3). Printed with the results, never asserted in tests.
TARGETS = {
    "fender_vs_nginx_proxy": 0.25,
    "policies_vs_fender": 0.80,
    "routes_300_vs_fender": 0.95,
    "cache_hit_vs_hello_world": 0.50,
    "global_limit_vs_local_limit": 0.85,
}
# The fleet rows' limit: high enough never to refuse, so the rows compare admission cost alone.
FLEET_LIMIT = "{rate: 10000000/s, burst: 1000000, key: route%s}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def taskset(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int, field: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def nginx_conf(workdir: Path, name: str, servers: str) -> Path:
    conf = workdir / f"nginx-{name}.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            daemon off;
            master_process off;
            worker_processes 1;
            pid {workdir}/nginx-{name}.pid;
            error_log {workdir}/nginx-{name}-error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {workdir}/body;
                proxy_temp_path {workdir}/proxy;
                fastcgi_temp_path {workdir}/fastcgi;
                uwsgi_temp_path {workdir}/uwsgi;
                scgi_temp_path {workdir}/scgi;
                keepalive_requests 1000000;
            """
        )
        + servers
        + "\n}\n"
    )
    return conf


def nginx_origin(port: int) -> str:
    return f"""
    server {{
        listen 127.0.0.1:{port};
        location /cached {{ add_header Cache-Control "max-age=3600"; return 200 "{BODY}"; }}
        location / {{ return 200 "{BODY}"; }}
    }}"""


def nginx_proxy(port: int, upstream_port: int) -> str:
    return f"""
    upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}"""


# A bundled origin for machines without nginx: answers every request, /cached with max-age.
RAW_UPSTREAM = """
import asyncio, sys
BODY = b"x" * 128
PLAIN = b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\ncontent-type: text/plain\\r\\n\\r\\n%s" % (len(BODY), BODY)
CACHED = PLAIN.replace(b"\\r\\n\\r\\n", b"\\r\\ncache-control: max-age=3600\\r\\n\\r\\n", 1)
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while b"\\r\\n\\r\\n" in self.buf:
            head, self.buf = self.buf.split(b"\\r\\n\\r\\n", 1)
            self.t.write(CACHED if head.split(b" ", 2)[1].startswith(b"/cached") else PLAIN)
async def main():
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(P, "127.0.0.1", int(p), backlog=1024) for p in sys.argv[1:]]
    await asyncio.gather(*(s.serve_forever() for s in servers))
try:
    import uvloop; uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""

# The Python server's own ceiling: uvicorn (uvloop + httptools) raw ASGI answering directly.
HELLO_WORLD = """
import sys, uvicorn
BODY = b"x" * 128
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
            lifespan="off", access_log=False, log_level="warning", ws="none")
"""


# The "every policy" route's policies (issue 3): a rate limit high enough not to limit, a bulkhead,
# retries, a breaker, a cache on a URL whose responses are not storable; its upstream is "pair".
ALL_POLICIES = (
    "rate_limit: {rate: 10000000/s, burst: 10000000, key: client_ip}, "
    "bulkhead: {max_concurrent: 1000, max_queued: 1000}, retry: {attempts: 2}, "
    "circuit_breaker: {consecutive_failures: 50}, cache: {}"
)


def policy_head(port: int, admin: int, upstream_ports: tuple[int, int], health_interval: str = "2s") -> str:
    """Listeners and the two upstreams: "origin" (one replica) and "pair" (failover over two)."""
    one, two = upstream_ports
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:{port}
        admin: 127.0.0.1:{admin}
        upstreams:
          origin:
            replicas: [{{url: http://127.0.0.1:{one}}}]
          pair:
            replicas: [{{url: http://127.0.0.1:{one}}}, {{url: http://127.0.0.1:{two}}}]
            pool: {{max_connections: 256, max_keepalive: 128}}
            balance: round_robin
            health_check: {{path: /, interval: {health_interval}}}
            outlier_detection: {{consecutive_failures: 5}}
        """
    )


def fender_policy(
    workdir: Path, port: int, admin: int, upstream_ports: tuple[int, int], name: str = "uvicorn"
) -> Path:
    path = workdir / f"bench-policy-{name}.yaml"
    path.write_text(
        policy_head(port, admin, upstream_ports)
        + "routes:\n"
        + "  - {name: pass, match: {path_prefix: /pass}, upstream: origin}\n"
        + "  - {name: cached, match: {path_prefix: /cached}, upstream: origin, cache: {}}\n"
        + f"  - {{name: all, match: {{path_prefix: /all}}, upstream: pair, {ALL_POLICIES}}}\n"
    )
    return path


def many_routes_policy(
    workdir: Path, port: int, admin: int, upstream_ports: tuple[int, int], count: int = 300
) -> Path:
    """`count` routes, the pass-through route last: prefixes, exact paths (some for one method only),
    regexes and a host-bound prefix in turn, none of which takes /pass."""
    kinds = (
        "{{path_prefix: /svc{i}/}}",
        "{{path: /svc{i}/health, methods: [POST]}}",
        "{{path_regex: '/svc{i}/items/[0-9]+'}}",
        "{{path_prefix: /api{i}, host: '*.example.com'}}",
    )
    routes = [
        f"  - {{name: r{i}, match: {kinds[i % len(kinds)].format(i=i)}, upstream: origin}}\n"
        for i in range(count - 1)
    ]
    path = workdir / "bench-policy-routes.yaml"
    path.write_text(
        policy_head(port, admin, upstream_ports)
        + "routes:\n"
        + "".join(routes)
        + "  - {name: pass, match: {path_prefix: /pass}, upstream: origin}\n"
    )
    return path


def fleet_policy(
    workdir: Path, port: int, admin: int, upstream_ports: tuple[int, int], redis_port: int
) -> Path:
    """Fleet mode on a private Redis: one route with a local limit, one with a global (leased) limit."""
    path = workdir / "bench-policy-fleet.yaml"
    path.write_text(
        policy_head(port, admin, upstream_ports)
        + "routes:\n"
        + f"  - {{name: local, match: {{path_prefix: /local}}, upstream: origin, rate_limit: {FLEET_LIMIT % ''}}}\n"
        + f"  - {{name: global, match: {{path_prefix: /global}}, upstream: origin, "
        f"rate_limit: {FLEET_LIMIT % ', scope: global'}}}\n"
        + f"state: {{backend: redis, redis: {{url: 'redis://127.0.0.1:{redis_port}/0'}}}}\n"
    )
    return path


def run_wrk(url: str, seconds: float, connections: int) -> dict:
    cmd = [*taskset(1), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"wrk failed against {url}: {out[-500:]}")
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result = {
        "rps": float(match.group(1)),
        "requests": total,
        "errors": (int(errors.group(1)) if errors else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if m:
            result[f"p{pct}_ms"] = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return result


def run_python_load(url: str, seconds: float, connections: int, rate: float | None = None) -> dict:
    script = ROOT / "tests" / "bench" / "load.py"
    cmd = [*taskset(1), sys.executable, str(script), url, str(seconds), str(connections)]
    if rate:
        cmd.append(str(rate))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    return json.loads(out)


def _median(rows: list[dict]) -> dict:
    keys = {k for row in rows for k in row if isinstance(row[k], int | float)}
    return {k: round(statistics.median(row[k] for row in rows if k in row), 2) for k in sorted(keys)}


# Ratios also computed round by round (the same round's two measurements): their spread shows how
# much of a change against the baseline this machine's noise alone can explain.
ROUND_RATIOS = {
    "policies_vs_fender": ("fender_policies", "fender", "rps"),
    "routes_300_vs_fender": ("fender_300_routes", "fender", "rps"),
    "routes_300_cpu_vs_fender_cpu": ("fender_300_routes", "fender", "cpu_us_per_request"),
    "fender_vs_nginx_proxy": ("fender", "nginx_proxy", "rps"),
    "cache_hit_vs_hello_world": ("fender_cache_hit", "hello_world", "rps"),
    "fender_cpu_vs_nginx_cpu": ("fender", "nginx_proxy", "cpu_us_per_request"),
    "granian_cpu_vs_nginx_cpu": ("fender_granian", "nginx_proxy", "cpu_us_per_request"),
    "global_limit_vs_local_limit": ("fender_global_limit", "fender_local_limit", "rps"),
}


def round_spread(results: dict[str, list[dict]]) -> dict[str, list[float]]:
    """[lowest, highest] of each ROUND_RATIOS ratio over the rounds."""
    spread = {}
    for name, (top, bottom, key) in ROUND_RATIOS.items():
        values = [
            a[key] / b[key]
            for a, b in zip(results.get(top, []), results.get(bottom, []), strict=False)
            if a.get(key) and b.get(key)
        ]
        if values:
            spread[name] = [round(min(values), 3), round(max(values), 3)]
    return spread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="fixed request rate for the latency measurement"
    )
    parser.add_argument(
        "--million", action="store_true", help="also send a million requests and report RSS after"
    )
    parser.add_argument("--only", default="", help="comma-separated targets to measure (default: all)")
    parser.add_argument(
        "--json", default=str(ROOT / "tests" / "bench" / "last.json"), help="where to write results"
    )
    parser.add_argument(
        "--save-baseline", action="store_true", help=f"also write the results to {BASELINE.name}"
    )
    args = parser.parse_args(argv)

    have_nginx = shutil.which("nginx") is not None
    have_wrk = shutil.which("wrk") is not None
    have_granian = importlib.util.find_spec("granian") is not None
    load = run_wrk if have_wrk else run_python_load
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-"))
    up1, up2, nginx_port, fender_port, admin_port, hello_port, granian_port, granian_admin = (
        free_port() for _ in range(8)
    )
    routes_port, routes_admin = free_port(), free_port()
    redis_port, fleet_port, fleet_admin = (free_port() for _ in range(3))
    have_redis = shutil.which("redis-server") is not None
    only = {name for name in args.only.split(",") if name}
    nginx_proxy_proc = None
    results: dict[str, list[dict]] = {}
    latency: dict[str, list[dict]] = {}
    memory: dict[str, float] = {}
    try:
        if have_nginx:
            origin = nginx_conf(workdir, "origin", nginx_origin(up1) + nginx_origin(up2))
            procs.start([*taskset(1), "nginx", "-c", str(origin), "-p", str(workdir)])
            proxy = nginx_conf(workdir, "proxy", nginx_proxy(nginx_port, up1))
            nginx_proxy_proc = procs.start([*taskset(0), "nginx", "-c", str(proxy), "-p", str(workdir)])
            wait_port(nginx_port)
        else:
            procs.start([*taskset(1), sys.executable, "-c", RAW_UPSTREAM, str(up1), str(up2)])
        wait_port(up1)
        wait_port(up2)
        hello = procs.start([*taskset(0), sys.executable, "-c", HELLO_WORLD, str(hello_port)])
        policy = fender_policy(workdir, fender_port, admin_port, (up1, up2))
        fender = procs.start(
            [*taskset(0), sys.executable, "-m", "proxy", "run", str(policy), "--log-level", "warning"],
            cwd=ROOT,
        )
        routes_policy = many_routes_policy(workdir, routes_port, routes_admin, (up1, up2))
        fender_routes = procs.start(
            [*taskset(0), sys.executable, "-m", "proxy", "run", str(routes_policy), "--log-level", "warning"],
            cwd=ROOT,
        )
        granian = None
        if have_granian:
            gpolicy = fender_policy(workdir, granian_port, granian_admin, (up1, up2), name="granian")
            granian = procs.start(
                [
                    *taskset(0),
                    sys.executable,
                    "-m",
                    "proxy",
                    "run",
                    str(gpolicy),
                    "--log-level",
                    "warning",
                    "--server",
                    "granian",
                ],
                cwd=ROOT,
            )
            wait_port(granian_port)
        fleet = None
        if have_redis:
            procs.start(
                [*taskset(1), "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
            )
            wait_port(redis_port)
            fpolicy = fleet_policy(workdir, fleet_port, fleet_admin, (up1, up2), redis_port)
            fleet = procs.start(
                [*taskset(0), sys.executable, "-m", "proxy", "run", str(fpolicy), "--log-level", "warning"],
                cwd=ROOT,
            )
            wait_port(fleet_port)
        wait_port(fender_port)
        wait_port(routes_port)
        wait_port(hello_port)
        for path in ("/pass", "/all", "/cached", "/cached"):
            urllib.request.urlopen(f"http://127.0.0.1:{fender_port}{path}", timeout=5).read()

        targets = {"direct": (f"http://127.0.0.1:{up1}/", None)}
        if have_nginx:
            targets["nginx_proxy"] = (f"http://127.0.0.1:{nginx_port}/", nginx_proxy_proc.pid)
        targets["fender"] = (f"http://127.0.0.1:{fender_port}/pass", fender.pid)
        targets["fender_300_routes"] = (f"http://127.0.0.1:{routes_port}/pass", fender_routes.pid)
        if granian is not None:
            targets["fender_granian"] = (f"http://127.0.0.1:{granian_port}/pass", granian.pid)
        targets["fender_policies"] = (f"http://127.0.0.1:{fender_port}/all", fender.pid)
        targets["fender_cache_hit"] = (f"http://127.0.0.1:{fender_port}/cached", fender.pid)
        targets["hello_world"] = (f"http://127.0.0.1:{hello_port}/", hello.pid)
        if fleet is not None:
            targets["fender_local_limit"] = (f"http://127.0.0.1:{fleet_port}/local", fleet.pid)
            targets["fender_global_limit"] = (f"http://127.0.0.1:{fleet_port}/global", fleet.pid)
        if only:
            targets = {name: target for name, target in targets.items() if name in only}
        for url, _ in targets.values():  # warm-up
            load(url, 1.0, args.connections)
        for round_no in range(args.rounds):
            for name, (url, pid) in targets.items():
                cpu_before = cpu_seconds(pid) if pid else None
                result = load(url, args.seconds, args.connections)
                if cpu_before is not None:
                    cpu = cpu_seconds(pid) - cpu_before
                    result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
                results.setdefault(name, []).append(result)
                print(f"round {round_no + 1}: {name:18s} {result['rps']:10.0f} req/s", file=sys.stderr)
        # Added latency at a moderate fixed rate (open loop, so stalls are not hidden).
        for _ in range(args.rounds if not only else 0):
            for name in ("direct", "fender", "fender_policies"):
                latency.setdefault(name, []).append(
                    run_python_load(targets[name][0], args.seconds, 10, args.rate)
                )
        memory["fender_rss_mib"] = rss_mib(fender.pid)
        memory["fender_peak_rss_mib"] = rss_mib(fender.pid, "VmHWM:")
        if args.million:
            # A million requests through one Fender, the three routes in turn; RSS after each
            # 10 s step shows whether memory is flat, not only where it ends.
            sent = 0
            started = time.monotonic()
            series = [rss_mib(fender.pid)]
            routes = ("fender", "fender_policies", "fender_cache_hit")
            step = 0
            while sent < 1_000_000 and time.monotonic() - started < 900:
                sent += load(targets[routes[step % 3]][0], 10, args.connections)["requests"]
                series.append(rss_mib(fender.pid))
                step += 1
            memory["million_requests_sent"] = sent
            memory["fender_rss_series_mib"] = series
            memory["fender_rss_after_million_mib"] = series[-1]
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {name: _median(rows) for name, rows in results.items()}
    fixed = {name: _median(rows) for name, rows in latency.items()}
    for name in ("fender", "fender_policies") if fixed else ():
        fixed[f"{name}_added_p50_ms"] = round(fixed[name]["p50_ms"] - fixed["direct"]["p50_ms"], 3)
        fixed[f"{name}_added_p99_ms"] = round(fixed[name]["p99_ms"] - fixed["direct"]["p99_ms"], 3)
    rps = {name: row["rps"] for name, row in summary.items()}
    ratios = {
        name: rps[top] / rps[bottom]
        for name, (top, bottom) in {
            "fender_vs_direct": ("fender", "direct"),
            "policies_vs_fender": ("fender_policies", "fender"),
            "cache_hit_vs_hello_world": ("fender_cache_hit", "hello_world"),
            "hello_world_vs_direct": ("hello_world", "direct"),
            "global_limit_vs_local_limit": ("fender_global_limit", "fender_local_limit"),
            "routes_300_vs_fender": ("fender_300_routes", "fender"),
        }.items()
        if top in rps and bottom in rps
    }
    if "nginx_proxy" in rps and "fender" in rps:
        ratios["fender_vs_nginx_proxy"] = rps["fender"] / rps["nginx_proxy"]
        ratios["nginx_proxy_vs_direct"] = rps["nginx_proxy"] / rps["direct"]
        nginx_cpu = summary["nginx_proxy"].get("cpu_us_per_request")
        if nginx_cpu:
            ratios["fender_cpu_vs_nginx_cpu"] = summary["fender"]["cpu_us_per_request"] / nginx_cpu
            if "fender_granian" in summary:
                ratios["granian_cpu_vs_nginx_cpu"] = (
                    summary["fender_granian"]["cpu_us_per_request"] / nginx_cpu
                )
    if "fender_granian" in rps:
        ratios["fender_granian_vs_fender"] = rps["fender_granian"] / rps["fender"]
    if "fender_300_routes" in summary and "fender" in summary:
        ratios["routes_300_cpu_vs_fender_cpu"] = (
            summary["fender_300_routes"]["cpu_us_per_request"] / summary["fender"]["cpu_us_per_request"]
        )
    report = {
        "load_tool": "wrk" if have_wrk else "bundled",
        "upstream": "nginx" if have_nginx else "bundled",
        "connections": args.connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "results": summary,
        "fixed_rate": {"rate": args.rate, **fixed},
        "memory": {
            k: [round(x, 1) for x in v] if isinstance(v, list) else round(v, 1) for k, v in memory.items()
        },
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "ratio_rounds": round_spread(results),
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else None
    print_report(report, baseline)
    if args.save_baseline:
        BASELINE.write_text(json.dumps(report, indent=2) + "\n")
        print(f"saved as {BASELINE.relative_to(ROOT)}")
    return 0


def print_report(report: dict, baseline: dict | None) -> None:
    print(
        f"load: {report['load_tool']}, upstream: {report['upstream']}, {report['connections']} connections, "
        f"median of {report['rounds']} interleaved rounds of {report['seconds']}s; server under test on core 0"
    )
    print(f"{'target':18s} {'req/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'cpu us/req':>11s}")
    for name, row in report["results"].items():
        cpu = row.get("cpu_us_per_request")
        cpu_text = f"{cpu:11.1f}" if cpu is not None else f"{'-':>11s}"
        print(
            f"{name:18s} {row['rps']:10.0f} {row.get('p50_ms', float('nan')):8.2f} "
            f"{row.get('p99_ms', float('nan')):8.2f} {row.get('errors', 0):7.0f} {cpu_text}"
        )
    fixed = report["fixed_rate"]
    print(f"at a fixed {fixed['rate']:.0f} req/s (10 connections, open loop):")
    for name in ("direct", "fender", "fender_policies") if "direct" in fixed else ():
        row = fixed[name]
        extra = ""
        if name != "direct":
            extra = f"  added p50 {fixed[name + '_added_p50_ms']:+.2f} ms, p99 {fixed[name + '_added_p99_ms']:+.2f} ms"
        print(f"  {name:18s} p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms{extra}")
    memory = report["memory"]
    for name, value in memory.items():
        if name == "fender_rss_after_million_mib":
            value = f"{value}  (target < 80 MiB: {'met' if value < 80 else 'NOT met'})"
        print(f"{name}: {value}")
    series = memory.get("fender_rss_series_mib")
    if series and len(series) >= 4:
        half = series[len(series) // 2 :]
        print(
            f"RSS over the million: first {series[0]} MiB, last {series[-1]} MiB, second half {min(half)}-{max(half)} MiB"
        )
    old = (baseline or {}).get("ratios", {})
    spread = report.get("ratio_rounds", {})
    for name, value in report["ratios"].items():
        target = TARGETS.get(name)
        verdict = f"  (target >= {target:.0%}: {'met' if value >= target else 'NOT met'})" if target else ""
        if name == "granian_cpu_vs_nginx_cpu":
            verdict = f"  (target <= 300%: {'met' if value <= 3 else 'NOT met'})"
        change = f"  [baseline {old[name]:.1%}, change {value - old[name]:+.1%}]" if name in old else ""
        rounds = f"  (rounds {spread[name][0]:.1%}-{spread[name][1]:.1%})" if name in spread else ""
        print(f"{name}: {value:.1%}{rounds}{verdict}{change}")


if __name__ == "__main__":
    raise SystemExit(main())
