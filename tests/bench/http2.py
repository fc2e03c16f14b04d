"""`make bench` rows for HTTP/2 (issue 21): h2c pass-through to an HTTP/1.1 upstream, with h2load.

One Fender and one nginx (``listen ... http2``, h2c with prior knowledge, ``proxy_pass`` with
keep-alive to the same origin) on core 0; the origin (nginx, else the bench's bundled asyncio
origin) and h2load on core 1. Rows, each the median of interleaved rounds:

- ``h1``: HTTP/1.1 pass-through, 50 connections one request at a time (h2load --h1);
- ``h2_1x100``: HTTP/2, 1 connection x 100 concurrent streams;
- ``h2_50x10``: HTTP/2, 50 connections x 10 concurrent streams.

Reported: requests/s per row for Fender and nginx, Fender's HTTP/2 rows against its own
HTTP/1.1 row (target: at least 50%) and against nginx's same row.
Usage: python tests/bench/http2.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.run import (  # noqa: E402
    RAW_UPSTREAM,
    ROOT,
    Procs,
    free_port,
    nginx_conf,
    nginx_origin,
    taskset,
    wait_port,
)

LAST = ROOT / "tests" / "bench" / "last-http2.json"
TARGET = 0.50  # HTTP/2 pass-through requests/s over Fender's HTTP/1.1 pass-through
ROWS = {
    "h1": ["--h1", "-c", "50", "-m", "1"],
    "h2_1x100": ["-c", "1", "-m", "100"],
    "h2_50x10": ["-c", "50", "-m", "10"],
}


def nginx_h2_proxy(port: int, upstream_port: int) -> str:
    return f"""
    upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} http2;
        http2_max_concurrent_streams 128;
        location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
    server {{
        listen 127.0.0.1:{port + 1};
        location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}"""


def fender_policy(workdir: Path, port: int, admin: int, upstream: int) -> Path:
    path = workdir / "policy-http2.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            listen: 127.0.0.1:{port}
            admin: 127.0.0.1:{admin}
            upstreams:
              origin:
                replicas: [{{url: http://127.0.0.1:{upstream}}}]
                pool: {{max_connections: 256, max_keepalive: 128}}
            server:
              max_requests_per_connection: 100000000
              http2: {{max_concurrent_streams: 128}}
            routes:
              - {{name: pass, match: {{path_prefix: /pass}}, upstream: origin}}
            """
        )
    )
    return path


def h2load(url: str, row: str, seconds: float) -> dict:
    cmd = [*taskset(1), "h2load", *ROWS[row], "-D", str(max(1, round(seconds))), "--warm-up-time=1", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    if not rate or not done:
        raise RuntimeError(f"h2load failed against {url}: {out[-600:]}")
    succeeded, failed, errored = int(done.group(2)), int(done.group(3)), int(done.group(4))
    return {"rps": float(rate.group(1)), "succeeded": succeeded, "errors": failed + errored}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(LAST))
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("http2 bench: h2load not installed (apt-get install nghttp2-client); skipped")
        return 0
    have_nginx = shutil.which("nginx") is not None
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-h2-"))
    origin_port, fender_port, admin_port = free_port(), free_port(), free_port()
    nginx_port = free_port()
    results: dict[str, list[dict]] = {}
    try:
        if have_nginx:
            origin = nginx_conf(workdir, "origin", nginx_origin(origin_port))
            procs.start([*taskset(1), "nginx", "-c", str(origin), "-p", str(workdir)])
            proxy = nginx_conf(workdir, "proxy", nginx_h2_proxy(nginx_port, origin_port))
            procs.start([*taskset(0), "nginx", "-c", str(proxy), "-p", str(workdir)])
            wait_port(nginx_port)
        else:
            procs.start([*taskset(1), sys.executable, "-c", RAW_UPSTREAM, str(origin_port), str(free_port())])
        wait_port(origin_port)
        policy = fender_policy(workdir, fender_port, admin_port, origin_port)
        procs.start(
            [*taskset(0), sys.executable, "-m", "proxy", "run", str(policy), "--log-level", "warning"],
            cwd=ROOT,
        )
        wait_port(fender_port, timeout=120)
        targets = {"fender": f"http://127.0.0.1:{fender_port}/pass"}
        if have_nginx:
            targets["nginx"] = f"http://127.0.0.1:{nginx_port}/pass"
        for _ in range(args.rounds):
            for name, url in targets.items():
                for row in ROWS:
                    if name == "nginx" and row == "h1":
                        url_row = url.replace(f":{nginx_port}/", f":{nginx_port + 1}/")
                    else:
                        url_row = url
                    results.setdefault(f"{name}_{row}", []).append(h2load(url_row, row, args.seconds))
    finally:
        procs.stop_all()
    report = {
        key: {"rps": statistics.median(r["rps"] for r in rows), "errors": sum(r["errors"] for r in rows)}
        for key, rows in results.items()
    }
    ratios = {}
    for row in ("h2_1x100", "h2_50x10"):
        ratios[f"{row}_vs_fender_h1"] = report[f"fender_{row}"]["rps"] / report["fender_h1"]["rps"]
        if f"nginx_{row}" in report:
            ratios[f"{row}_vs_nginx"] = report[f"fender_{row}"]["rps"] / report[f"nginx_{row}"]["rps"]
    out = {
        "rows": report,
        "ratios": ratios,
        "target_vs_h1": TARGET,
        "rounds": args.rounds,
        "seconds": args.seconds,
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"HTTP/2 pass-through (h2c to an HTTP/1.1 origin), median of {args.rounds} rounds of {args.seconds:g}s"
    )
    for key, value in report.items():
        print(f"  {key:<20} {value['rps']:>10.0f} req/s   errors {value['errors']}")
    for key, value in ratios.items():
        mark = ""
        if key.endswith("_vs_fender_h1"):
            mark = "  ok" if value >= TARGET else f"  BELOW target {TARGET:.0%}"
        print(f"  {key:<26} {value:6.2f}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
