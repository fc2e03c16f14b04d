"""`make bench` row for replicas from DNS: what a lookup, a cache hit and an applied change cost.

Against a dnsmasq started here (127.0.0.1, a free port; tests/support/dnsmasq.py), in one process:

* ``lookup``: CPU per A+AAAA lookup of a name with 3 addresses through Fender's resolver
  (dnspython's asyncio resolver), and, when aiodns is installed, per A lookup with aiodns for
  comparison (the measurement behind the library choice in docs/dns.md);
* ``cache_hit``: CPU per address lookup a connection to a plain host name pays while the answer
  is fresh (NameCache);
* ``apply_64``: CPU to apply a changed answer of 64 addresses (half of them new) to an upstream
  with health checks: picker, health tasks, pools, one log line.

Usage: python tests/bench/dns.py [--lookups 500]. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.clock import SYSTEM_CLOCK  # noqa: E402
from proxy.cluster.dns.entries import DnsReplica  # noqa: E402
from proxy.cluster.dns.refresh import NameCache, Target  # noqa: E402
from proxy.cluster.dns.resolver import DnsResolver  # noqa: E402
from proxy.cluster.options import DnsOptions  # noqa: E402
from proxy.cluster.upstream import UpstreamRuntime  # noqa: E402
from proxy.config import parse_policy  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402
from tests.support.dnsmasq import Dnsmasq  # noqa: E402


def cpu() -> float:
    return time.process_time()


async def main(lookups: int) -> dict:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with Dnsmasq(Path(tmp), {"svc.test": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]}) as dns:
            options = DnsOptions(resolvers=[f"127.0.0.1:{dns.port}"])
            resolver = DnsResolver(options)
            await resolver.addresses("svc.test")
            started = cpu()
            for _ in range(lookups):
                await resolver.addresses("svc.test")
            out["lookup_dnspython_a_aaaa_us"] = (cpu() - started) / lookups * 1e6
            try:
                import aiodns
            except ImportError:
                pass
            else:
                other = aiodns.DNSResolver(nameservers=[f"127.0.0.1:{dns.port}"])
                query = getattr(other, "query_dns", None) or other.query
                await query("svc.test", "A")
                started = cpu()
                for _ in range(lookups):
                    await query("svc.test", "A")
                out["lookup_aiodns_a_us"] = (cpu() - started) / lookups * 1e6
            cache = NameCache(resolver, SYSTEM_CLOCK)
            await cache.addresses("svc.test", "up")
            started = cpu()
            for _ in range(lookups * 20):
                await cache.addresses("svc.test", "up")
            out["cache_hit_us"] = (cpu() - started) / (lookups * 20) * 1e6
    policy = parse_policy(
        "upstreams: {up: {replicas: [{url: http://svc.test:8080, resolve: true}], "
        "health_check: {interval: 1h}}}\nroutes: [{name: r, upstream: up}]\n",
        "bench.yaml",
    )
    logging.getLogger("fender").setLevel(logging.WARNING)
    upstream = UpstreamRuntime("up", policy.upstreams["up"], Metrics(), SYSTEM_CLOCK)

    def specs(first: int) -> list:
        return [
            DnsReplica(
                Target(f"127.9.{n // 250}.{n % 250 + 1}", 8080, 0, 1, "svc.test"), "svc.test:8080", "resolve"
            )
            for n in range(first, first + 64)
        ]

    await upstream.set_replicas(specs(0), False)
    rounds = 20
    started = cpu()
    for i in range(rounds):
        await upstream.set_replicas(specs(32 * (i + 1)), True)
    out["apply_64_ms"] = (cpu() - started) / rounds * 1e3
    await upstream.close()
    return {k: round(v, 2) for k, v in out.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=500)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.lookups)), indent=2))
