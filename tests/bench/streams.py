"""`make bench`, second part: streamed responses and WebSocket tunnels (issue 16).

Two rows, each Fender vs direct vs nginx in one run:

- **SSE**: an upstream sends one server-sent event every 10 ms (100 events/s),
  each carrying the time it was written (CLOCK_MONOTONIC, shared by every
  process of the machine); the client notes when each event arrives. Reported:
  p50/p99 of write-to-read time, and Fender's and nginx's (``proxy_buffering
  off``) added p99 over direct. Target: Fender adds under 1 ms at p99.
- **WebSocket echo**: a minimal WebSocket echo server (handshake, then frames
  unmasked and echoed) and a client that keeps one 64-byte message in flight
  per tunnel: messages/s through one tunnel and through 50. Target: Fender
  through 50 tunnels at least 30% of nginx's messages/s.

Layout as in run.py: the proxy under test on core 0, upstream and client on
core 1. Everything on 127.0.0.1; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench import run as _run  # noqa: E402
from tests.bench.run import Procs, free_port, nginx_conf, wait_port  # noqa: E402


def taskset(core: int) -> list[str]:
    return [] if os.environ.get("FENDER_BENCH_NO_PIN") else _run.taskset(core)


ROOT = Path(__file__).resolve().parents[2]
LAST = ROOT / "tests" / "bench" / "last-streams.json"
TARGETS = {"sse_added_p99_ms": 1.0, "ws_50_vs_nginx": 0.30}
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Upstream for both rows: /sse streams events at a fixed interval; anything with Upgrade: websocket is
# answered 101 and echoed frame by frame.
UPSTREAM = r"""
import asyncio, base64, hashlib, struct, sys, time
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
INTERVAL = float(sys.argv[2])
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.buf = b""; self.ws = False; self.task = None
    def connection_lost(self, exc):
        if self.task: self.task.cancel()
    def data_received(self, d):
        self.buf += d
        if self.ws:
            self.frames(); return
        if b"\r\n\r\n" not in self.buf: return
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        fields = {l.split(b":", 1)[0].strip().lower(): l.split(b":", 1)[1].strip() for l in lines[1:] if b":" in l}
        if fields.get(b"upgrade", b"").lower() == b"websocket":
            accept = base64.b64encode(hashlib.sha1(fields[b"sec-websocket-key"] + GUID).digest())
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.ws = True; self.frames()
        else:
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            self.task = asyncio.ensure_future(self.events())
    async def events(self):
        while not self.t.is_closing():
            data = b"data: %d\n\n" % time.monotonic_ns()
            self.t.write(b"%x\r\n%s\r\n" % (len(data), data))
            await asyncio.sleep(INTERVAL)
    def frames(self):
        buf = self.buf
        while len(buf) >= 6:
            n = buf[1] & 0x7F; off = 2
            if n == 126: n = struct.unpack("!H", buf[2:4])[0]; off = 4
            elif n == 127: n = struct.unpack("!Q", buf[2:10])[0]; off = 10
            if len(buf) < off + 4 + n: break
            mask = buf[off:off + 4]; payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buf[off + 4:off + 4 + n]))
            buf = buf[off + 4 + n:]
            self.t.write(bytes([0x82, n]) + payload if n < 126 else bytes([0x82, 126]) + struct.pack("!H", n) + payload)
        self.buf = buf
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()
try:
    import uvloop; uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def nginx_stream_proxy(port: int, upstream_port: int) -> str:
    return f"""
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
        }}
    }}"""


def fender_policy(path: Path, port: int, admin: int, upstream_port: int) -> None:
    path.write_text(
        textwrap.dedent(
            f"""
            listen: 127.0.0.1:{port}
            admin: 127.0.0.1:{admin}
            server: {{max_connections: 10000}}
            upstreams:
              app:
                replicas: [{{url: http://127.0.0.1:{upstream_port}}}]
                pool: {{max_connections: 512, max_keepalive: 128}}
            routes:
              - {{name: app, upstream: app, idle_timeout: 1h, timeout: 1h}}
            """
        )
    )


# -- SSE ---------------------------------------------------------------------------------------


async def sse_latencies(port: int, events: int) -> list[float]:
    """Write-to-read time of ``events`` events (ms), after a few to settle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /sse HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    out: list[float] = []
    buf = b""
    skip = 10
    async with asyncio.timeout(events * 0.05 + 30):
        while len(out) < events:
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError("event stream closed")
            now = time.monotonic_ns()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                stamp = event.rsplit(b"data: ", 1)[-1]
                if skip:
                    skip -= 1
                    continue
                out.append((now - int(stamp)) / 1e6)
    writer.close()
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- WebSocket -----------------------------------------------------------------------------------


async def _ws_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    if not head.startswith(b"HTTP/1.1 101") or accept not in head:
        raise RuntimeError(f"no websocket handshake: {head[:200]!r}")
    return reader, writer


_PAYLOAD = b"m" * 64
_MASK = b"\x01\x02\x03\x04"
_FRAME = bytes([0x82, 0x80 | len(_PAYLOAD)]) + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(_PAYLOAD))
_ECHO = bytes([0x82, len(_PAYLOAD)]) + _PAYLOAD


async def ws_echo_rate(port: int, tunnels: int, seconds: float) -> float:
    """Messages/s with one 64-byte message in flight per tunnel."""
    conns = [await _ws_open(port) for _ in range(tunnels)]
    count = 0
    stop = time.monotonic() + seconds

    async def one(reader, writer) -> None:
        nonlocal count
        while time.monotonic() < stop:
            writer.write(_FRAME)
            await reader.readexactly(len(_ECHO))
            count += 1

    async with asyncio.timeout(seconds + 30):
        await asyncio.gather(*(one(r, w) for r, w in conns))
    for _, writer in conns:
        writer.close()
    return count / seconds


def _client(code: str, *args) -> dict:
    """Run one measurement in a client process pinned to core 1 (beside the upstream)."""
    cmd = [*taskset(1), sys.executable, __file__, "--client", code, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout)


def client_main(argv: list[str]) -> int:
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    kind, port = argv[0], int(argv[1])
    if kind == "sse":
        print(json.dumps({"latencies_ms": run(sse_latencies(port, int(argv[2])))}))
    else:
        print(json.dumps({"rate": run(ws_echo_rate(port, int(argv[2]), float(argv[3])))}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1000, help="SSE events measured per target and round")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each WebSocket measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sse-only", action="store_true", help="skip the WebSocket row")
    args = parser.parse_args(argv)
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-streams-"))
    up, fender_port, admin, nginx_port = (free_port() for _ in range(4))
    targets = {"direct": up, "fender": fender_port}
    sse: dict[str, list[float]] = {}
    ws: dict[str, dict[int, list[float]]] = {}
    try:
        procs.start([*taskset(1), sys.executable, "-c", UPSTREAM, str(up), "0.01"])
        wait_port(up)
        policy = workdir / "policy.yaml"
        fender_policy(policy, fender_port, admin, up)
        procs.start(
            [*taskset(0), sys.executable, "-m", "proxy", "run", str(policy), "--log-level", "warning"],
            cwd=ROOT,
        )
        wait_port(fender_port)
        if shutil.which("nginx"):
            conf = nginx_conf(workdir, "streams", nginx_stream_proxy(nginx_port, up))
            procs.start([*taskset(0), "nginx", "-c", str(conf), "-p", str(workdir)])
            wait_port(nginx_port)
            targets["nginx_proxy"] = nginx_port
        for round_no in range(args.rounds):
            for name, port in targets.items():
                sse.setdefault(name, []).extend(_client("sse", port, args.events)["latencies_ms"])
                for tunnels in () if args.sse_only else (1, 50):
                    rate = _client("ws", port, tunnels, args.seconds)["rate"]
                    ws.setdefault(name, {}).setdefault(tunnels, []).append(rate)
                print(f"round {round_no + 1}: {name} done", file=sys.stderr)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    report: dict = {"sse_events_per_second": 100, "sse": {}, "ws_messages_per_second": {}, "ratios": {}}
    for name, values in sse.items():
        report["sse"][name] = {"p50_ms": round(_pct(values, 0.5), 3), "p99_ms": round(_pct(values, 0.99), 3)}
    for name, by_count in ws.items():
        report["ws_messages_per_second"][name] = {
            str(n): round(statistics.median(rates)) for n, rates in by_count.items()
        }
    direct = report["sse"]["direct"]
    for name in ("fender", "nginx_proxy"):
        if name in report["sse"]:
            report["sse"][name]["added_p99_ms"] = round(report["sse"][name]["p99_ms"] - direct["p99_ms"], 3)
    ratios = report["ratios"]
    ratios["sse_added_p99_ms"] = report["sse"]["fender"]["added_p99_ms"]
    rates = report["ws_messages_per_second"]
    for n in () if args.sse_only else ("1", "50"):
        ratios[f"ws_{n}_vs_direct"] = round(rates["fender"][n] / rates["direct"][n], 3)
        if "nginx_proxy" in rates:
            ratios[f"ws_{n}_vs_nginx"] = round(rates["fender"][n] / rates["nginx_proxy"][n], 3)
    LAST.write_text(json.dumps(report, indent=2) + "\n")
    print(f"SSE at 100 events/s, write-to-read ms ({args.rounds} rounds of {args.events} events):")
    for name, row in report["sse"].items():
        extra = f"  added p99 {row['added_p99_ms']:+.3f} ms" if "added_p99_ms" in row else ""
        print(f"  {name:12s} p50 {row['p50_ms']:.3f}  p99 {row['p99_ms']:.3f}{extra}")
    print(f"WebSocket echo, 64-byte messages, one in flight per tunnel ({args.seconds}s, median of rounds):")
    for name, row in rates.items():
        print(f"  {name:12s} 1 tunnel {row['1']:8d} msg/s   50 tunnels {row['50']:8d} msg/s")
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = ""
        if name == "sse_added_p99_ms":
            verdict = f"  (target < {target} ms: {'met' if value < target else 'NOT met'})"
        elif target:
            verdict = f"  (target >= {target:.0%}: {'met' if value >= target else 'NOT met'})"
        print(f"{name}: {value}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
