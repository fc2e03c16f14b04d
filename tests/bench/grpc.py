"""`make bench` rows for HTTP/2 to replicas and gRPC (issue 21), with h2load.

Fender (h2c listener, ``protocol: h2`` upstream) and nginx (``listen ... http2`` with ``grpc_pass``,
nginx's HTTP/2 upstream client) on core 0; the origins and h2load on core 1. Rows, each the
median of interleaved rounds:

- ``h2_to_h2``: HTTP/2 GET, 10 connections x 10 streams, to an h2c origin (nginx ``http2``
  answering ``return 200``; without nginx the row is skipped);
- ``grpc_unary``: gRPC unary calls (POST application/grpc with one message, ``te: trailers``),
  10 connections x 10 streams, to a grpcio server (generic handler, bytes echo);
- ``h2_to_h2_tls``: as ``h2_to_h2`` to the same nginx answering over TLS (``listen ... ssl http2``,
  a certificate from trustme): Fender with an ``https://`` replica and ``protocol: h2`` (ALPN h2),
  nginx with ``grpc_pass grpcs://``; reported against the cleartext row (needs nginx and trustme);
- ``direct`` rows: the same load straight to the origin, for scale.

Reported: requests/s per row for Fender, nginx and direct, and Fender against nginx.
Usage: python tests/bench/grpc.py [--seconds 5] [--rounds 3]
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

from tests.bench.run import ROOT, Procs, free_port, nginx_conf, taskset, wait_port  # noqa: E402

LAST = ROOT / "tests" / "bench" / "last-grpc.json"
LOAD = ["-c", "10", "-m", "10"]

# A grpcio server echoing unary calls (generic handler, bytes in and out): argv[1] is the port.
GRPC_ORIGIN = """
import sys, threading
from concurrent import futures
import grpc
ident = lambda b: b
handler = grpc.method_handlers_generic_handler(
    "bench.Echo",
    {"Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req, request_deserializer=ident,
                                                  response_serializer=ident)},
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
threading.Event().wait()
"""


def nginx_servers(
    port: int, h2_origin: int, grpc_origin: int, tls: tuple[int, str, str] | None = None
) -> str:
    tls_origin = (
        f"""
    server {{
        listen 127.0.0.1:{tls[0]} ssl http2;
        ssl_certificate {tls[1]};
        ssl_certificate_key {tls[2]};
        location / {{ return 200 "ok\\n"; }}
    }}
    upstream h2tlsorigin {{ server 127.0.0.1:{tls[0]}; keepalive 32; }}"""
        if tls
        else ""
    )
    tls_location = "location /tls/ { grpc_pass grpcs://h2tlsorigin; }" if tls else ""
    return f"""
    server {{
        listen 127.0.0.1:{h2_origin} http2;
        location / {{ return 200 "ok\\n"; }}
    }}{tls_origin}
    upstream h2origin {{ server 127.0.0.1:{h2_origin}; keepalive 32; }}
    upstream grpcorigin {{ server 127.0.0.1:{grpc_origin}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port} http2;
        http2_max_concurrent_streams 128;
        location /bench.Echo/ {{ grpc_pass grpc://grpcorigin; }}
        {tls_location}
        location / {{ grpc_pass grpc://h2origin; }}
    }}"""


def fender_policy(
    workdir: Path,
    port: int,
    admin: int,
    h2_origin: int | None,
    grpc_origin: int,
    tls: tuple[int, str] | None = None,
) -> Path:
    h2 = (
        f"  h2origin: {{replicas: [{{url: http://127.0.0.1:{h2_origin}}}], protocol: h2}}\n"
        if h2_origin
        else ""
    )
    if tls:
        h2 += (
            f'  h2tlsorigin: {{replicas: [{{url: "https://127.0.0.1:{tls[0]}"}}], protocol: h2,'
            f" tls: {{ca_file: {tls[1]}}}}}\n"
        )
    path = workdir / "policy-grpc.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            listen: 127.0.0.1:{port}
            admin: 127.0.0.1:{admin}
            upstreams:
              grpcorigin: {{replicas: [{{url: http://127.0.0.1:{grpc_origin}}}], protocol: h2}}
            """
        )
        + h2
        + textwrap.dedent(
            f"""
            server:
              max_requests_per_connection: 100000000
              http2: {{max_concurrent_streams: 128}}
            routes:
              - {{name: grpc, match: {{path_prefix: /bench.Echo/}}, upstream: grpcorigin}}
            {"  - {name: h2tls, match: {path_prefix: /tls/}, upstream: h2tlsorigin}" if tls else ""}
            {"  - {name: h2, match: {path_prefix: /}, upstream: h2origin}" if h2_origin else ""}
            """
        )
    )
    return path


def h2load(url: str, seconds: float, grpc_body: Path | None) -> dict:
    cmd = [*taskset(1), "h2load", *LOAD, "-D", str(max(1, round(seconds))), "--warm-up-time=1"]
    if grpc_body is not None:
        cmd += ["-d", str(grpc_body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    if not rate or not done:
        raise RuntimeError(f"h2load failed against {url}: {out[-600:]}")
    return {"rps": float(rate.group(1)), "errors": int(done.group(3)) + int(done.group(4))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(LAST))
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("grpc bench: h2load not installed (apt-get install nghttp2-client); skipped")
        return 0
    try:
        import grpc  # noqa: F401
    except ImportError:
        print("grpc bench: grpcio not installed (pip install 'fender[test]'); skipped")
        return 0
    have_nginx = shutil.which("nginx") is not None
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-grpc-"))
    body = workdir / "unary.bin"
    body.write_bytes(b"\x00\x00\x00\x00\x05hello")  # one gRPC message, not compressed
    fender_port, admin_port, nginx_port = free_port(), free_port(), free_port()
    h2_origin = free_port() if have_nginx else None
    grpc_origin = free_port()
    tls = None
    if have_nginx:
        try:
            import trustme
        except ImportError:
            print("grpc bench: trustme not installed: the TLS row is skipped")
        else:
            ca = trustme.CA()
            leaf = ca.issue_cert("127.0.0.1", "localhost")
            cert, key, ca_file = workdir / "origin.crt", workdir / "origin.key", workdir / "ca.pem"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            ca.cert_pem.write_to_path(str(ca_file))
            tls = (free_port(), str(cert), str(key), str(ca_file))
    results: dict[str, list[dict]] = {}
    try:
        procs.start([*taskset(1), sys.executable, "-c", GRPC_ORIGIN, str(grpc_origin)])
        wait_port(grpc_origin)
        if have_nginx:
            servers = nginx_servers(nginx_port, h2_origin, grpc_origin, tls[:3] if tls else None)
            conf = nginx_conf(workdir, "grpc", servers)
            procs.start([*taskset(0), "nginx", "-c", str(conf), "-p", str(workdir)])
            wait_port(nginx_port)
        policy = fender_policy(
            workdir, fender_port, admin_port, h2_origin, grpc_origin, (tls[0], tls[3]) if tls else None
        )
        procs.start(
            [*taskset(0), sys.executable, "-m", "proxy", "run", str(policy), "--log-level", "warning"],
            cwd=ROOT,
        )
        wait_port(fender_port)
        rows: dict[str, tuple[str, Path | None]] = {
            "fender_grpc_unary": (f"http://127.0.0.1:{fender_port}/bench.Echo/Unary", body),
            "direct_grpc_unary": (f"http://127.0.0.1:{grpc_origin}/bench.Echo/Unary", body),
        }
        if have_nginx:
            rows["nginx_grpc_unary"] = (f"http://127.0.0.1:{nginx_port}/bench.Echo/Unary", body)
            rows["fender_h2_to_h2"] = (f"http://127.0.0.1:{fender_port}/x", None)
            rows["nginx_h2_to_h2"] = (f"http://127.0.0.1:{nginx_port}/x", None)
            rows["direct_h2_to_h2"] = (f"http://127.0.0.1:{h2_origin}/x", None)
        if tls:
            rows["fender_h2_to_h2_tls"] = (f"http://127.0.0.1:{fender_port}/tls/x", None)
            rows["nginx_h2_to_h2_tls"] = (f"http://127.0.0.1:{nginx_port}/tls/x", None)
        for _ in range(args.rounds):
            for key, (url, data) in rows.items():
                results.setdefault(key, []).append(h2load(url, args.seconds, data))
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        key: {"rps": statistics.median(r["rps"] for r in runs), "errors": sum(r["errors"] for r in runs)}
        for key, runs in results.items()
    }
    ratios = {}
    for row in ("grpc_unary", "h2_to_h2", "h2_to_h2_tls"):
        if f"nginx_{row}" in report:
            ratios[f"{row}_vs_nginx"] = report[f"fender_{row}"]["rps"] / report[f"nginx_{row}"]["rps"]
    for who in ("fender", "nginx"):
        if f"{who}_h2_to_h2_tls" in report:
            ratios[f"{who}_tls_vs_cleartext"] = (
                report[f"{who}_h2_to_h2_tls"]["rps"] / report[f"{who}_h2_to_h2"]["rps"]
            )
    out = {"rows": report, "ratios": ratios, "rounds": args.rounds, "seconds": args.seconds}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"HTTP/2 to replicas and gRPC unary (h2load {' '.join(LOAD)}), median of {args.rounds} rounds")
    for key, value in report.items():
        print(f"  {key:<22} {value['rps']:>10.0f} req/s   errors {value['errors']}")
    for key, value in ratios.items():
        print(f"  {key:<22} {value:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
