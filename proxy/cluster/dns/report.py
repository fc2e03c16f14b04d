"""``fender validate --env``: look up every name of the policy once and say what each gave.

``fender validate`` without ``--env`` never does this: it stays offline (a CI job
has no access to the deployment's name servers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from proxy.clock import SYSTEM_CLOCK
from proxy.cluster.dns.entries import Dns, DnsEntries, DnsReplica, _Entry
from proxy.cluster.dns.resolver import DnsResolver, LookupFailed

if TYPE_CHECKING:
    from proxy.config.models import Policy, Replica

__all__ = ["lookup_report"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es"


async def lookup_report(policy: Policy) -> list[tuple[bool, str]]:
    """``(resolved, line)`` for every name in the policy, in upstream and entry order."""
    resolver = DnsResolver(policy.dns)
    offline = Dns(policy.dns, SYSTEM_CLOCK, None, resolver)  # no metrics: nothing runs but these lookups
    jobs: list[Awaitable[tuple[bool, str]]] = []
    for upstream_name, upstream in policy.upstreams.items():
        entries = None
        for spec in upstream.replicas:
            if spec.discovered:
                if entries is None:
                    entries = DnsEntries(upstream_name, upstream.replicas, offline, _ignore)
                entry = next(e for e in entries.entries if e.spec is spec)
                jobs.append(_entry_line(upstream_name, entries, entry))
            elif spec.needs_lookup:
                jobs.append(_plain_line(upstream_name, resolver, spec.host))
    return list(await asyncio.gather(*jobs))


async def _ignore(specs: list[Replica | DnsReplica], gate: bool) -> None:
    return None


async def _entry_line(upstream: str, entries: DnsEntries, entry: _Entry) -> tuple[bool, str]:
    try:
        targets, ttl = await entries._lookup_for(entry)()
    except LookupFailed as failure:
        return False, f"upstream {upstream}: {entry.what}: does not resolve: {failure}"
    limit = entries.dns.options.max_addresses
    note = f"; only the first {limit} would be used (dns.max_addresses)" if len(targets) > limit else ""
    if entry.kind == "srv":
        items = "; ".join(
            f"{t.address} ({t.label}), priority {t.priority}, weight {t.weight}"
            for t in sorted(targets, key=lambda t: (t.priority, t.label, t.host))
        )
    else:
        items = ", ".join(sorted(t.host for t in targets))
    return (
        True,
        f"upstream {upstream}: {entry.what}: {_plural(len(targets), 'address')} ({items}), ttl {ttl:g}s{note}",
    )


async def _plain_line(upstream: str, resolver: DnsResolver, host: str) -> tuple[bool, str]:
    try:
        answer = await resolver.addresses(host)
    except LookupFailed as failure:
        return False, f"upstream {upstream}: {host}: does not resolve: {failure}"
    return True, (
        f"upstream {upstream}: {host}: {_plural(len(answer.addresses), 'address')} "
        f"({', '.join(sorted(answer.addresses))}), ttl {answer.ttl:g}s"
    )
