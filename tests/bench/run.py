"""`make bench`: Fender's data-path throughput against direct and nginx, in one interleaved run.

Layout (2 cores): the proxy under test (Fender or nginx-as-proxy) is pinned to
core 0; the upstream and the load generator share core 1. Each round measures
every target once, in turn, so noise from a shared machine hits them alike;
the report gives the median of the rounds and ratios between targets of the
same run (absolute numbers from these machines are not comparable across runs).

Upstream: nginx when installed (else a bundled raw asyncio server). Load: wrk
when installed (else a bundled asyncio load client; slower, so ratios only).
Everything listens on 127.0.0.1 and every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
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
BODY = b"x" * 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
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
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def nginx_conf(workdir: Path, upstream_port: int, proxy_port: int | None) -> Path:
    proxy = ""
    if proxy_port:
        proxy = f"""
        upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{proxy_port};
            location / {{
                proxy_pass http://origin;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}"""
    conf = workdir / f"nginx-{proxy_port or upstream_port}.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            daemon off;
            master_process off;
            worker_processes 1;
            pid {workdir}/nginx-{proxy_port or upstream_port}.pid;
            error_log {workdir}/nginx-error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {workdir}/body;
                proxy_temp_path {workdir}/proxy;
                fastcgi_temp_path {workdir}/fastcgi;
                uwsgi_temp_path {workdir}/uwsgi;
                scgi_temp_path {workdir}/scgi;
                keepalive_requests 100000;
                {"" if proxy_port else f'server {{ listen 127.0.0.1:{upstream_port}; location / {{ return 200 "{BODY.decode()}"; }} }}'}
                {proxy}
            }}
            """
        )
    )
    return conf


RAW_UPSTREAM = """
import asyncio, sys
BODY = b"x" * 128
RESP = b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\ncontent-type: text/plain\\r\\n\\r\\n%s" % (len(BODY), BODY)
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while b"\\r\\n\\r\\n" in self.buf:
            _, self.buf = self.buf.split(b"\\r\\n\\r\\n", 1)
            self.t.write(RESP)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await srv.serve_forever()
try:
    import uvloop; uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def fender_policy(workdir: Path, port: int, admin: int, upstream_port: int) -> Path:
    path = workdir / "bench-policy.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            listen: 127.0.0.1:{port}
            admin: 127.0.0.1:{admin}
            upstreams:
              origin:
                replicas: [{{url: http://127.0.0.1:{upstream_port}}}]
                pool: {{max_connections: 256, max_keepalive: 128}}
            routes:
              - name: passthrough
                upstream: origin
            """
        )
    )
    return path


def run_wrk(url: str, seconds: float, connections: int) -> dict:
    cmd = [*taskset(1), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if m:
            value = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            lat[f"p{pct}_ms"] = value
    return {
        "rps": rps,
        "requests": total,
        "errors": (int(errors.group(1)) if errors else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
        **lat,
    }


def run_python_load(url: str, seconds: float, connections: int, rate: float | None = None) -> dict:
    script = ROOT / "tests" / "bench" / "load.py"
    cmd = [*taskset(1), sys.executable, str(script), url, str(seconds), str(connections)]
    if rate:
        cmd.append(str(rate))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    return json.loads(out)


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
        "--json", default=str(ROOT / "tests" / "bench" / "last.json"), help="where to write results"
    )
    args = parser.parse_args(argv)

    have_nginx = shutil.which("nginx") is not None
    have_wrk = shutil.which("wrk") is not None
    load = run_wrk if have_wrk else run_python_load
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-"))
    upstream_port, nginx_proxy_port, fender_port, admin_port = (free_port() for _ in range(4))
    results: dict[str, list[dict]] = {}
    latency: dict[str, list[dict]] = {}
    try:
        if have_nginx:
            procs.start(
                [
                    *taskset(1),
                    "nginx",
                    "-c",
                    str(nginx_conf(workdir, upstream_port, None)),
                    "-p",
                    str(workdir),
                ]
            )
            procs.start(
                [
                    *taskset(0),
                    "nginx",
                    "-c",
                    str(nginx_conf(workdir, upstream_port, nginx_proxy_port)),
                    "-p",
                    str(workdir),
                ]
            )
            wait_port(nginx_proxy_port)
        else:
            procs.start([*taskset(1), sys.executable, "-c", RAW_UPSTREAM, str(upstream_port)])
        wait_port(upstream_port)
        policy = fender_policy(workdir, fender_port, admin_port, upstream_port)
        fender = procs.start(
            [*taskset(0), sys.executable, "-m", "proxy", "run", str(policy), "--log-level", "warning"],
            cwd=ROOT,
        )
        wait_port(fender_port)
        urllib.request.urlopen(f"http://127.0.0.1:{fender_port}/", timeout=5).read()

        targets = {"direct": upstream_port, "fender": fender_port}
        if have_nginx:
            targets["nginx_proxy"] = nginx_proxy_port
        # warm-up
        for port in targets.values():
            load(f"http://127.0.0.1:{port}/", 1.0, args.connections)
        for round_no in range(args.rounds):
            for name, port in targets.items():
                cpu_before = cpu_seconds(fender.pid) if name == "fender" else None
                result = load(f"http://127.0.0.1:{port}/", args.seconds, args.connections)
                if cpu_before is not None:
                    result["cpu_us_per_request"] = (
                        (cpu_seconds(fender.pid) - cpu_before) / max(result["requests"], 1) * 1e6
                    )
                results.setdefault(name, []).append(result)
                print(f"round {round_no + 1}: {name:12s} {result['rps']:10.0f} req/s", file=sys.stderr)
        # Added latency at a moderate fixed rate (open loop, so stalls are not hidden).
        for _ in range(args.rounds):
            for name in ("direct", "fender"):
                result = run_python_load(f"http://127.0.0.1:{targets[name]}/", args.seconds, 10, args.rate)
                latency.setdefault(name, []).append(result)
        fender_rss = rss_mib(fender.pid)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {name: _median(rows) for name, rows in results.items()}
    summary["fender"]["peak_rss_mib"] = round(fender_rss, 1)
    ratios = {"fender_vs_direct": summary["fender"]["rps"] / summary["direct"]["rps"]}
    if "nginx_proxy" in summary:
        ratios["fender_vs_nginx_proxy"] = summary["fender"]["rps"] / summary["nginx_proxy"]["rps"]
        ratios["nginx_proxy_vs_direct"] = summary["nginx_proxy"]["rps"] / summary["direct"]["rps"]
    fixed = {name: _median(rows) for name, rows in latency.items()}
    if fixed:
        fixed["added_p50_ms"] = round(fixed["fender"]["p50_ms"] - fixed["direct"]["p50_ms"], 3)
        fixed["added_p99_ms"] = round(fixed["fender"]["p99_ms"] - fixed["direct"]["p99_ms"], 3)
    report = {
        "load_tool": "wrk" if have_wrk else "bundled",
        "upstream": "nginx" if have_nginx else "bundled",
        "connections": args.connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "results": summary,
        "fixed_rate": {"rate": args.rate, **fixed},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    return 0


def _median(rows: list[dict]) -> dict:
    keys = {k for row in rows for k in row if isinstance(row[k], int | float)}
    return {k: round(statistics.median(row[k] for row in rows if k in row), 2) for k in sorted(keys)}


def _print_table(report: dict) -> None:
    print(
        f"load: {report['load_tool']}, upstream: {report['upstream']}, {report['connections']} connections, "
        f"median of {report['rounds']} rounds of {report['seconds']}s"
    )
    print(f"{'target':14s} {'req/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'cpu us/req':>11s}")
    for name, row in report["results"].items():
        cpu = row.get("cpu_us_per_request")
        print(
            f"{name:14s} {row['rps']:10.0f} {row.get('p50_ms', float('nan')):8.2f} {row.get('p99_ms', float('nan')):8.2f} "
            f"{row.get('errors', 0):7.0f} {cpu if cpu is not None else float('nan'):11.1f}"
        )
    fixed = report.get("fixed_rate") or {}
    if "fender" in fixed:
        print(
            f"at {fixed['rate']:.0f} req/s: direct p50 {fixed['direct']['p50_ms']:.2f} ms p99 {fixed['direct']['p99_ms']:.2f} ms; "
            f"fender p50 {fixed['fender']['p50_ms']:.2f} ms p99 {fixed['fender']['p99_ms']:.2f} ms "
            f"(added p50 {fixed['added_p50_ms']:.2f} ms, p99 {fixed['added_p99_ms']:.2f} ms)"
        )
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
