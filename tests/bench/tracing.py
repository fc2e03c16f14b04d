"""`make bench` row for tracing: pass-through vs tracing at 1% and at 100% sampling, against a receiver.

Three Fenders on core 0 with the same pass-through route: one without
``tracing:``, one sampling 1% of new traces, one sampling all of them; each
exports to an OTLP/HTTP receiver (core 1, with the upstream and the load
generator) that reads and acknowledges every export request. Rounds are
interleaved; the report gives the median requests/s and CPU per request and
the ratios to pass-through (targets, issue 25: 1% within 3%, 100% at least
70%). Also reports the spans the receiver got and the spans Fender dropped.
Usage: python tests/bench/tracing.py [--seconds 5] [--rounds 3]

Requests/s on a shared machine move by more than the 1% variant's cost;
``--instructions`` instead counts instructions per request of each variant
under callgrind (tests/bench/instructions.py's method; needs valgrind). The
export's work counts where it falls inside the counted requests (all but the
last second's batch).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.run import (  # noqa: E402
    RAW_UPSTREAM,
    ROOT,
    Procs,
    cpu_seconds,
    free_port,
    run_python_load,
    run_wrk,
    taskset,
    wait_port,
)

TARGETS = {"tracing_1pct_vs_fender": 0.97, "tracing_100pct_vs_fender": 0.70}

# Acknowledges each OTLP/HTTP export (HTTP/1.1 keep-alive) and counts the bytes it received.
RECEIVER = """
import asyncio, sys
received = [0, 0]
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            if head.startswith(b"GET"):
                body = ("%d %d" % tuple(received)).encode()
                writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(body), body))
                await writer.drain()
                continue
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\\r\\n", 1)[0])
            await reader.readexactly(length)
            received[0] += 1
            received[1] += length
            writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-type: application/x-protobuf\\r\\ncontent-length: 0\\r\\n\\r\\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def policy(workdir: Path, name: str, port: int, admin: int, upstream: int, tracing: str) -> Path:
    path = workdir / f"tracing-{name}.yaml"
    path.write_text(
        tracing
        + f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\n"
        + f"upstreams:\n  origin:\n    replicas: [{{url: http://127.0.0.1:{upstream}}}]\n"
        + "routes:\n  - {name: pass, upstream: origin}\n"
    )
    return path


def metric(admin: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--json", default=str(ROOT / "tests" / "bench" / "last-tracing.json"))
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--requests", type=int, default=2000, help="with --instructions: requests counted")
    parser.add_argument("--only", nargs="+", help="measure only these variants (fender is always measured)")
    args = parser.parse_args(argv)
    if args.instructions:
        return count_instructions(args)
    load = run_wrk if shutil.which("wrk") else run_python_load
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-tracing-"))
    upstream, receiver = free_port(), free_port()
    results: dict[str, list[dict]] = {}
    fenders = {}
    try:
        procs.start([*taskset(1), sys.executable, "-c", RAW_UPSTREAM, str(upstream)])
        procs.start([*taskset(1), sys.executable, "-c", RECEIVER, str(receiver)])
        wait_port(upstream)
        wait_port(receiver)
        endpoint = f"http://127.0.0.1:{receiver}"
        for name, tracing in variants(endpoint).items():
            if name == "tracing_0pct":
                continue  # a row of --instructions only: below the noise of requests/s
            port, admin = free_port(), free_port()
            path = policy(workdir, name, port, admin, upstream, tracing)
            cmd = [*taskset(0), sys.executable, "-m", "proxy", "run", str(path), "--log-level", "warning"]
            fenders[name] = (port, admin, procs.start(cmd, cwd=ROOT))
        for port, _, _ in fenders.values():
            wait_port(port)
            load(f"http://127.0.0.1:{port}/", 1.0, args.connections)  # warm-up
        for round_no in range(args.rounds):
            for name, (port, _, proc) in fenders.items():
                before = cpu_seconds(proc.pid)
                result = load(f"http://127.0.0.1:{port}/", args.seconds, args.connections)
                result["cpu_us_per_request"] = (
                    (cpu_seconds(proc.pid) - before) / max(result["requests"], 1) * 1e6
                )
                results.setdefault(name, []).append(result)
                print(f"round {round_no + 1}: {name:16s} {result['rps']:10.0f} req/s", file=sys.stderr)
        spans = {
            name: {
                "exported": metric(admin, "fender_trace_spans_exported_total"),
                "dropped": metric(admin, "fender_trace_spans_dropped_total"),
            }
            for name, (_, admin, _) in fenders.items()
            if name != "fender"
        }
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        name: {
            key: round(statistics.median(r[key] for r in rows), 2) for key in ("rps", "cpu_us_per_request")
        }
        for name, rows in results.items()
    }
    base = summary["fender"]
    ratios = {
        f"{name}_vs_fender": round(summary[name]["rps"] / base["rps"], 3)
        for name in ("tracing_1pct", "tracing_100pct")
    }
    cpu = {
        f"{name}_cpu_vs_fender_cpu": round(
            summary[name]["cpu_us_per_request"] / base["cpu_us_per_request"], 3
        )
        for name in ("tracing_1pct", "tracing_100pct")
    }
    report = {"summary": summary, "ratios": ratios, "cpu_ratios": cpu, "targets": TARGETS, "spans": spans}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def variants(endpoint: str) -> dict[str, str]:
    return {
        "fender": "",
        # 0%: the request path's own cost with tracing on (context read, traceparent written, no spans)
        "tracing_0pct": f"tracing: {{otlp_endpoint: '{endpoint}', sample: 0%}}\n",
        "tracing_1pct": f"tracing: {{otlp_endpoint: '{endpoint}', sample: 1%}}\n",
        "tracing_100pct": f"tracing: {{otlp_endpoint: '{endpoint}', sample: 100%}}\n",
    }


def count_instructions(args) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import instructions  # the callgrind measurement of make bench-instructions

    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-tracing-"))
    upstream, receiver = free_port(), free_port()
    per_request = {}
    try:
        procs.start([*taskset(1), sys.executable, "-c", RAW_UPSTREAM, str(upstream)])
        procs.start([*taskset(1), sys.executable, "-c", RECEIVER, str(receiver)])
        wait_port(upstream)
        wait_port(receiver)
        for name, tracing in variants(f"http://127.0.0.1:{receiver}").items():
            if args.only and name != "fender" and name not in args.only:
                continue
            instructions.policy = lambda wd, n, port, admin, *_, t=tracing: policy(
                wd, n, port, admin, upstream, t
            )
            instructions.PATHS[name] = "/"
            per_request[name] = instructions.measure(workdir, name, upstream, upstream, args.requests, procs)
            print(f"{name:16s} {per_request[name]:10.0f} instructions/request", file=sys.stderr)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    base = per_request["fender"]
    report = {
        "instructions_per_request": {k: round(v) for k, v in per_request.items()},
        # As throughput at equal CPU: pass-through's instructions / this variant's.
        "ratios": {f"{k}_vs_fender": round(base / v, 3) for k, v in per_request.items() if k != "fender"},
        "targets": TARGETS,
    }
    Path(args.json).with_name("last-tracing-instructions.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
