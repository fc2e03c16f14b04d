"""`make bench` rows for TLS (issue 19): Fender and nginx with the same certificates, one run.

* keep-alive TLS pass-through: wrk -> Fender over TLS -> origin over TLS, against Fender's own
  cleartext pass-through (wrk -> Fender -> origin, plain) and nginx doing the same TLS on both
  sides (proxy_ssl with keepalive and session reuse). Target: Fender TLS >= 60% of Fender cleartext.
* new TLS connections: one request per connection (wrk with Connection: close) to Fender's and
  nginx's HTTPS listeners; reports connections/s and CPU per connection of the proxy process.
  Target: Fender's CPU per new connection within 1.5x nginx's (the handshake is OpenSSL's work
  in both).
* handshakes with the upstream per 1,000 requests during the keep-alive rows (Fender's
  fender_upstream_tls_handshakes_total over fender_upstream_requests_total).

Like for like: both proxies serve the same ECDSA certificate with their OpenSSL defaults and both
offer TLS 1.2 and 1.3 (nginx 1.22's default ssl_protocols stop at 1.2, which made its rows TLS 1.2
abbreviated handshakes, a third cheaper than TLS 1.3 resumption with its X25519 exchange). wrk
resumes sessions on its new connections against either; "fairness" in the report shows, for each,
the version and cipher negotiated and whether a second connection resumed. Besides the
throughput ratio, "fender_tls_vs_fender_plain_cpu" is the same comparison at equal CPU (Fender's
CPU per cleartext request over its CPU per TLS request), which the load of the client and origin
on the other core does not move.

Proxies on core 0; the origin (nginx, plain and TLS ports) and wrk on core 1. Needs nginx and
wrk (Debian: nginx, wrk) and trustme (the test extra). Certificates are made in a temporary
directory and removed afterwards. Writes tests/bench/last-tls.json.
Usage: python tests/bench/tls.py [--seconds 5] [--rounds 3]
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.run import (  # noqa: E402
    BODY,
    ROOT,
    Procs,
    cpu_seconds,
    free_port,
    nginx_conf,
    taskset,
    wait_port,
)

TARGETS = {"fender_tls_vs_fender_plain": 0.60, "new_conn_cpu_fender_vs_nginx": 1.5}


def make_certs(workdir: Path) -> dict[str, str]:
    import trustme

    ca = trustme.CA(organization_name="Fender bench CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": workdir / "ca.pem", "cert": workdir / "tls.crt", "key": workdir / "tls.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    return {name: str(path) for name, path in paths.items()}


def origin_servers(plain: int, tls: int, certs: dict[str, str]) -> str:
    return f"""
    server {{ listen 127.0.0.1:{plain}; location / {{ return 200 "{BODY}"; }} }}
    server {{
        listen 127.0.0.1:{tls} ssl;
        ssl_certificate {certs["cert"]}; ssl_certificate_key {certs["key"]};
        ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:origin:1m;
        location / {{ return 200 "{BODY}"; }}
    }}"""


def nginx_tls_proxy(port: int, origin_tls: int, certs: dict[str, str]) -> str:
    return f"""
    upstream origin_tls {{ server 127.0.0.1:{origin_tls}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs["cert"]}; ssl_certificate_key {certs["key"]};
        ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:proxy:1m;
        location / {{
            proxy_pass https://origin_tls; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_ssl_verify on; proxy_ssl_trusted_certificate {certs["ca"]}; proxy_ssl_name localhost;
            proxy_ssl_server_name on; proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.2 TLSv1.3;
        }}
    }}"""


def fender_policy(
    workdir: Path, name: str, port: int, admin: int, upstream: str, server: str, tls: str
) -> Path:
    path = workdir / f"tls-{name}.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\n{server}"
        f"upstreams:\n  origin:\n    replicas: [{{url: '{upstream}'}}]\n{tls}"
        "routes:\n  - {name: pass, upstream: origin}\n"
    )
    return path


def wrk(url: str, seconds: float, connections: int, close: bool = False) -> dict:
    cmd = [*taskset(1), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"wrk failed against {url}: {out[-500:]}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(match.group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "errors": int(errors.group(1)) if errors else 0,
    }


def handshake_facts(port: int, ca: str) -> dict:
    """Two connections in a row: the version and cipher negotiated, and whether the second resumed."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    facts: dict = {}
    session = None
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while conn.recv(65536):  # bounded by the server's close and the timeout
                    pass
                facts.update(version=conn.version(), cipher=conn.cipher()[0])
                if attempt:
                    facts["resumed"] = conn.session_reused
                session = conn.session
    return facts


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
    parser.add_argument(
        "--new-connections", type=int, default=10, help="concurrency of the new-connection rows"
    )
    parser.add_argument("--json", default=str(ROOT / "tests" / "bench" / "last-tls.json"))
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"tls bench skipped: {tool} is not installed (apt-get install -y {tool})", file=sys.stderr)
            return 0
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-tls-"))
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir()
    results: dict[str, list[dict]] = {}
    fairness: dict[str, dict] = {}
    try:
        certs = make_certs(workdir)
        origin_plain, origin_tls = free_port(), free_port()
        conf = nginx_conf(workdir, "origin", origin_servers(origin_plain, origin_tls, certs))
        procs.start([*taskset(1), "nginx", "-c", str(conf), "-p", str(workdir)])
        nginx_port = free_port()
        conf = nginx_conf(workdir, "proxy", nginx_tls_proxy(nginx_port, origin_tls, certs))
        nginx = procs.start([*taskset(0), "nginx", "-c", str(conf), "-p", str(workdir)])
        server_tls = f"server: {{tls: {{cert_file: {certs['cert']}, key_file: {certs['key']}}}}}\n"
        upstream_tls = f"    tls: {{ca_file: {certs['ca']}, server_name: localhost}}\n"
        fenders = {}
        for name, upstream, server, tls in (
            ("fender_plain", f"http://127.0.0.1:{origin_plain}", "", ""),
            ("fender_tls", f"https://127.0.0.1:{origin_tls}", server_tls, upstream_tls),
        ):
            port, admin = free_port(), free_port()
            path = fender_policy(workdir, name, port, admin, upstream, server, tls)
            cmd = [*taskset(0), sys.executable, "-m", "proxy", "run", str(path), "--log-level", "warning"]
            fenders[name] = (port, admin, procs.start(cmd, cwd=ROOT))
        for port in (origin_plain, origin_tls, nginx_port, *(p for p, _, _ in fenders.values())):
            wait_port(port)
        urls = {
            "fender_plain": f"http://127.0.0.1:{fenders['fender_plain'][0]}/",
            "fender_tls": f"https://127.0.0.1:{fenders['fender_tls'][0]}/",
            "nginx_tls": f"https://127.0.0.1:{nginx_port}/",
        }
        pids = {"fender_plain": fenders["fender_plain"][2].pid, "fender_tls": fenders["fender_tls"][2].pid}
        pids["nginx_tls"] = nginx.pid
        fairness = {
            name: handshake_facts(port, certs["ca"])
            for name, port in (("fender_tls", fenders["fender_tls"][0]), ("nginx_tls", nginx_port))
        }
        for url in urls.values():
            wrk(url, 1.0, args.connections)  # warm-up
        tls_admin = fenders["fender_tls"][1]
        handshakes_before = metric(tls_admin, "fender_upstream_tls_handshakes_total")
        requests_before = metric(tls_admin, "fender_upstream_requests_total")
        for round_no in range(args.rounds):
            for name, url in urls.items():
                before = cpu_seconds(pids[name])
                result = wrk(url, args.seconds, args.connections)
                result["cpu_us_per_request"] = (
                    (cpu_seconds(pids[name]) - before) / max(result["requests"], 1) * 1e6
                )
                results.setdefault(name, []).append(result)
                print(f"round {round_no + 1}: {name:22s} {result['rps']:10.0f} req/s", file=sys.stderr)
        handshakes = metric(tls_admin, "fender_upstream_tls_handshakes_total") - handshakes_before
        upstream_requests = metric(tls_admin, "fender_upstream_requests_total") - requests_before
        for round_no in range(args.rounds):
            for name in ("fender_tls", "nginx_tls"):
                before = cpu_seconds(pids[name])
                result = wrk(urls[name], args.seconds, args.new_connections, close=True)
                result["cpu_us_per_request"] = (
                    (cpu_seconds(pids[name]) - before) / max(result["requests"], 1) * 1e6
                )
                results.setdefault(f"{name}_new_conn", []).append(result)
                print(
                    f"round {round_no + 1}: {name + '_new_conn':22s} {result['rps']:10.0f} conn/s",
                    file=sys.stderr,
                )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        name: {
            key: round(statistics.median(r[key] for r in rows), 2)
            for key in ("rps", "cpu_us_per_request", "errors")
        }
        for name, rows in results.items()
    }
    ratios = {
        "fender_tls_vs_fender_plain": round(summary["fender_tls"]["rps"] / summary["fender_plain"]["rps"], 3),
        "fender_tls_vs_fender_plain_cpu": round(
            summary["fender_plain"]["cpu_us_per_request"] / summary["fender_tls"]["cpu_us_per_request"], 3
        ),
        "fender_tls_vs_nginx_tls": round(summary["fender_tls"]["rps"] / summary["nginx_tls"]["rps"], 3),
        "new_conn_rate_fender_vs_nginx": round(
            summary["fender_tls_new_conn"]["rps"] / summary["nginx_tls_new_conn"]["rps"], 3
        ),
        "new_conn_cpu_fender_vs_nginx": round(
            summary["fender_tls_new_conn"]["cpu_us_per_request"]
            / summary["nginx_tls_new_conn"]["cpu_us_per_request"],
            3,
        ),
    }
    report = {
        "summary": summary,
        "ratios": ratios,
        "targets": TARGETS,
        "fairness": fairness,
        "upstream_handshakes_per_1000_requests": round(handshakes / max(upstream_requests, 1) * 1000, 3),
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
