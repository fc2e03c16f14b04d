"""`make bench-instructions`: user-space instructions per request, a deterministic companion to `make bench`.

Requests/s on a shared 2-core machine move by 5-10% from run to run, more
than most single changes to the data path. Instructions per request do not:
each variant runs in its own Fender under valgrind's callgrind, which counts
the instructions Fender executes for a fixed number of requests (counters
zeroed after a warm-up, read with callgrind_control). Repeats agree to about
1k instructions in ~230k.

Variants, one route each (so none pays for matching routes before it):
`pass` (one upstream replica), `policies` (the bench's every-policy route:
rate limit, bulkhead, retry, breaker, failover over two replicas, cache on a
non-cacheable URL) and `cache_hit`. The ratios correspond to `make bench`'s
(policies_vs_fender as pass/policies: the share of pass-through throughput
left at equal CPU). Kernel time is not counted: this measures Fender's own
work, not system calls.

Needs valgrind (callgrind_control comes with it). Upstream: nginx when
installed, else the bench's bundled asyncio origin. Everything listens on
127.0.0.1; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    ALL_POLICIES,
    RAW_UPSTREAM,
    ROOT,
    Procs,
    free_port,
    nginx_conf,
    nginx_origin,
    policy_head,
    taskset,
    wait_port,
)

ROUTES = {
    "pass": "{name: x, match: {path_prefix: /x}, upstream: origin}",
    "policies": f"{{name: x, match: {{path_prefix: /x}}, upstream: pair, {ALL_POLICIES}}}",
    "cache_hit": "{name: x, match: {path_prefix: /cached}, upstream: origin, cache: {}}",
}
PATHS = {"pass": "/x", "policies": "/x", "cache_hit": "/cached"}


def policy(workdir: Path, name: str, port: int, admin: int, up1: int, up2: int) -> Path:
    path = workdir / f"policy-{name}.yaml"
    # Health checks every 5 minutes: none falls inside the counted requests to add noise.
    head = policy_head(port, admin, (up1, up2), health_interval="300s")
    path.write_text(head + f"routes:\n  - {ROUTES[name]}\n")
    return path


def send(port: int, path: str, count: int, connections: int = 4) -> int:
    """``count`` GETs over ``connections`` keep-alive connections in turn; returns the 200s."""
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    buffers = [b""] * connections
    ok = 0
    try:
        for i in range(count):
            k = i % connections
            socks[k].sendall(request)
            buf = buffers[k]
            while True:  # bounded: each pass reads more of one response, or the socket times out
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[:end].lower()
                    length = int(re.search(rb"content-length: *(\d+)", head).group(1))
                    if len(buf) >= end + 4 + length:
                        ok += head.startswith(b"http/1.1 200")
                        buf = buf[end + 4 + length :]
                        break
                chunk = socks[k].recv(65536)
                if not chunk:
                    raise RuntimeError("Fender closed a connection during the count")
                buf += chunk
            buffers[k] = buf
    finally:
        for sock in socks:
            sock.close()
    return ok


def measure(workdir: Path, name: str, up1: int, up2: int, requests: int, procs: Procs) -> float:
    port, admin = free_port(), free_port()
    out = workdir / f"callgrind-{name}"
    out.mkdir()
    cmd = [
        *taskset(0),
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}/cg.%p.out",
        sys.executable,
        "-m",
        "proxy",
        "run",
        str(policy(workdir, name, port, admin, up1, up2)),
        "--log-level",
        "warning",
    ]
    fender = procs.start(cmd, cwd=ROOT)  # from the tree's root: this checkout's proxy package
    wait_port(port, timeout=900)  # valgrind starts Python ~50x slower, more on a loaded machine
    send(port, PATHS[name], 200)  # warm-up: connections, caches, hit-for-miss marks
    subprocess.run(["callgrind_control", "-z", str(fender.pid)], check=True, capture_output=True)
    ok = send(port, PATHS[name], requests)
    subprocess.run(["callgrind_control", "-d", str(fender.pid)], check=True, capture_output=True)
    if ok != requests:
        raise RuntimeError(f"{name}: {requests - ok} of {requests} requests did not get 200")
    dump = max(out.glob("cg.*.out.*"), key=lambda p: p.stat().st_mtime)
    match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(errors="replace"), re.M)
    if not match:
        raise RuntimeError(f"no instruction total in {dump.name}")
    fender.terminate()
    try:
        fender.wait(timeout=60)
    except subprocess.TimeoutExpired:
        fender.kill()
        fender.wait()
    return int(match.group(1)) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per variant")
    parser.add_argument(
        "--json",
        default=str(ROOT / "tests" / "bench" / "last-instructions.json"),
        help="where to write results",
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(ROUTES), help="measure only these variants (ratios need all)"
    )
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: install valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-instructions-"))
    up1, up2 = free_port(), free_port()
    per_request: dict[str, float] = {}
    try:
        if shutil.which("nginx"):
            origin = nginx_conf(workdir, "origin", nginx_origin(up1) + nginx_origin(up2))
            procs.start([*taskset(1), "nginx", "-c", str(origin), "-p", str(workdir)])
        else:
            procs.start([*taskset(1), sys.executable, "-c", RAW_UPSTREAM, str(up1), str(up2)])
        wait_port(up1)
        wait_port(up2)
        for name in args.only or ROUTES:
            started = time.monotonic()
            per_request[name] = measure(workdir, name, up1, up2, args.requests, procs)
            print(
                f"{name:10s} {per_request[name]:10.0f} instructions/request ({time.monotonic() - started:.0f}s)",
                file=sys.stderr,
            )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {}
    if "pass" in per_request:
        if "policies" in per_request:
            ratios["policies_vs_fender"] = per_request["pass"] / per_request["policies"]
        if "cache_hit" in per_request:
            ratios["cache_hit_vs_fender"] = per_request["pass"] / per_request["cache_hit"]
    report = {
        "requests": args.requests,
        "instructions_per_request": {k: round(v) for k, v in per_request.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for name, value in report["instructions_per_request"].items():
        print(f"{name:10s} {value:10d} instructions/request")
    for name, value in ratios.items():
        print(f"{name}: {value:.1%} (pass-through's instructions / this variant's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
