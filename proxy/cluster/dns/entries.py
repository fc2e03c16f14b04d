"""The DNS side of one upstream: its ``resolve: true`` / ``srv:`` entries and the replicas they give.

:class:`DnsEntries` keeps, per entry of ``replicas:``, what it stands for now
(an entry from the policy stands for itself; a DNS entry for the addresses of
its last good answer) and hands the whole list to the upstream runtime
whenever a refresher sees a change (``apply(specs, gate)``), which applies it
like a reload of that upstream. An address two entries give is one replica
(the first entry's).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from proxy.clock import Clock
from proxy.cluster.dns.refresh import MAX_SRV_WEIGHT, NameCache, Refresher, Target
from proxy.cluster.dns.resolver import OUTCOMES, DnsResolver, LookupFailed

if TYPE_CHECKING:
    from proxy.config.models import Replica, Upstream
    from proxy.metrics import Metrics
from proxy.cluster.options import DnsOptions

log = logging.getLogger("fender")

__all__ = ["Dns", "DnsEntries", "DnsReplica", "uses_dns"]


def uses_dns(upstream: Upstream) -> bool:
    """Does this upstream's replica list need a name server (any entry with a host name)?"""
    return any(r.needs_lookup for r in upstream.replicas)


class Dns:
    """The resolver and the plain-name cache of one policy load (kept by reloads with equal ``dns:``)."""

    def __init__(
        self,
        options: DnsOptions,
        clock: Clock,
        metrics: Metrics | None = None,
        resolver: DnsResolver | None = None,
    ) -> None:
        self.options = options
        self.clock = clock
        self.metrics = metrics
        self.resolver = resolver or DnsResolver(options)
        self.cache = NameCache(self.resolver, clock, None if metrics is None else metrics.dns_lookups)


class DnsReplica:
    """One address a DNS entry gave, shaped like a policy replica for the runtime."""

    __slots__ = (
        "host",
        "port",
        "unix_path",
        "name",
        "address",
        "authority",
        "priority",
        "weight",
        "source",
        "tls",
        "server_name",
    )

    def __init__(
        self, target: Target, authority: str, source: str, tls: bool = False, server_name: str = ""
    ) -> None:
        self.host = target.host
        self.port = target.port
        self.unix_path = None
        self.address = target.address
        self.name = f"{target.address} ({target.label})"
        self.authority = authority  # the Host sent upstream: the name's, not the address
        self.priority = target.priority
        self.weight = target.weight
        self.source = source
        # An https:// entry's addresses speak TLS, verified against the name (SNI), not the address.
        self.tls = tls
        self.server_name = server_name

    @property
    def needs_lookup(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DnsReplica) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[str, int, str, int, int]:
        return (self.name, self.port, self.authority, self.priority, self.weight)


class _Entry:
    """One DNS entry of ``replicas:`` (by its position)."""

    refresher: Refresher  # set by DnsEntries right after

    def __init__(self, index: int, spec: Replica, upstream: str) -> None:
        self.index = index
        self.spec = spec
        if spec.srv is not None:
            self.kind, self.dns_name, self.port = "srv", spec.srv, 0
        else:
            self.kind, self.dns_name, self.port = "resolve", spec.host, spec.port
        self.what = f"{self.dns_name} ({self.kind})"
        self.source = f"{self.kind} {self.dns_name}"
        self.key = (self.kind, self.dns_name, self.port)
        self.replicas: list[DnsReplica] = []

    def replicas_for(self, targets: tuple[Target, ...]) -> list[DnsReplica]:
        if self.kind == "srv":
            return [DnsReplica(t, f"{t.label}:{t.port}", self.source) for t in targets]
        authority = self.spec.authority
        tls = self.spec.tls
        return [DnsReplica(t, authority, self.source, tls, self.dns_name) for t in targets]


class DnsEntries:
    """The entries of one upstream that DNS fills (see the module docstring)."""

    def __init__(
        self,
        upstream: str,
        replicas: Sequence[Replica],
        dns: Dns,
        apply: Callable[[list[Replica | DnsReplica], bool], Awaitable[None]],
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.dns = dns
        self.clock = dns.clock
        self._apply = apply
        self.live = False  # after start(): additions wait for their first health check
        self.slots: list[Replica | _Entry] = []  # per entry: a policy Replica, or an _Entry
        self.entries: list[_Entry] = []
        metrics = dns.metrics
        counters: dict[str, Counter] = {}
        self._replicas_gauge: Gauge | None = None
        if metrics is not None:
            counters = {outcome: metrics.dns_lookups.labels(upstream, outcome) for outcome in OUTCOMES}
            self._replicas_gauge = metrics.dns_replicas.labels(upstream)
        self._age_gauges: dict[str, Gauge] = {}
        for index, spec in enumerate(replicas):
            if not spec.discovered:
                self.slots.append(spec)
                continue
            entry = _Entry(index, spec, upstream)
            entry.refresher = Refresher(
                upstream,
                entry.what,
                self._lookup_for(entry),
                dns.options,
                self.clock,
                self._on_change(entry),
                counters,
                rng,
            )
            self.slots.append(entry)
            self.entries.append(entry)

    # -- lookups ---------------------------------------------------------------------------

    def _lookup_for(self, entry: _Entry) -> Callable[[], Awaitable[tuple[tuple[Target, ...], float]]]:
        resolver = self.dns.resolver
        spec = entry.spec

        if entry.kind == "resolve":

            async def lookup() -> tuple[tuple[Target, ...], float]:
                answer = await resolver.addresses(entry.dns_name)
                targets = tuple(
                    Target(address, entry.port, spec.priority, spec.weight, entry.dns_name)
                    for address in answer.addresses
                )
                return targets, answer.ttl

            return lookup

        async def lookup_srv() -> tuple[tuple[Target, ...], float]:
            answer = await resolver.srv(entry.dns_name)
            results = await asyncio.gather(
                *(resolver.addresses(r.target) for r in answer.records), return_exceptions=True
            )
            targets: list[Target] = []
            ttl = answer.ttl
            failures = []
            for record, result in zip(answer.records, results, strict=True):
                if isinstance(result, LookupFailed):
                    failures.append(f"{record.target}: {result}")
                    continue
                if isinstance(result, BaseException):
                    raise result
                ttl = min(ttl, result.ttl)
                weight = min(max(record.weight, 1), MAX_SRV_WEIGHT)
                targets.extend(
                    Target(address, record.port, record.priority, weight, record.target)
                    for address in result.addresses
                )
            if not targets:
                outcome = next((r.outcome for r in results if isinstance(r, LookupFailed)), "empty")
                raise LookupFailed(
                    outcome, f"no SRV target of {entry.dns_name} resolves ({'; '.join(failures)})"
                )
            if failures:
                log.warning(
                    "%s: %s: some SRV targets do not resolve: %s",
                    self.upstream,
                    entry.what,
                    "; ".join(failures),
                )
            return tuple(targets), ttl

        return lookup_srv

    # -- the set -----------------------------------------------------------------------------

    def specs(self) -> list[Replica | DnsReplica]:
        """What the upstream's replicas are now: policy replicas and DNS addresses, in entry order,
        each address once."""
        out: list[Replica | DnsReplica] = []
        seen: set[str] = set()
        for slot in self.slots:
            items: Sequence[Replica | DnsReplica] = slot.replicas if isinstance(slot, _Entry) else [slot]
            for item in items:
                if item.address in seen:
                    continue
                seen.add(item.address)
                out.append(item)
        return out

    def _on_change(self, entry: _Entry) -> Callable[[tuple[Target, ...]], Awaitable[None]]:
        async def changed(targets: tuple[Target, ...]) -> None:
            await self._changed(entry, targets)

        return changed

    async def _changed(self, entry: _Entry, targets: tuple[Target, ...]) -> None:
        entry.replicas = entry.replicas_for(targets)
        if self.live:
            await self._apply(self.specs(), True)
        self._export_count()

    def _export_count(self) -> None:
        if self._replicas_gauge is not None:
            self._replicas_gauge.set(sum(len(e.replicas) for e in self.entries))

    def adopt(self, old: DnsEntries) -> bool:
        """A reload kept some of these names: take their last answers (and schedules); True if any."""
        previous = {e.key: e for e in old.entries}
        adopted = False
        for entry in self.entries:
            was = previous.get(entry.key)
            if was is None or was.refresher is None or not was.refresher.state.answered:
                continue
            entry.refresher.adopt(was.refresher)
            targets = entry.refresher.state.targets
            if entry.kind == "resolve":  # this entry's priority and weight, which the reload may change
                targets = tuple(
                    replace(t, priority=entry.spec.priority, weight=entry.spec.weight) for t in targets
                )
                entry.refresher.state.targets = targets
            entry.replicas = entry.replicas_for(targets)
            adopted = True
        self._export_count()
        return adopted

    async def start(self) -> None:
        """First answers (entries a reload did not carry), then the refresh tasks.

        Bounded: each lookup by ``dns.timeout`` (an SRV entry: its targets after it); a name that does
        not resolve leaves its entry empty and is logged, Fender starts all the same.
        """
        first = [e for e in self.entries if not e.refresher.state.answered]
        if first:
            budget = self.dns.options.timeout * 2 + 1.0
            try:
                async with asyncio.timeout(budget):
                    results = await asyncio.gather(
                        *(e.refresher.refresh() for e in first), return_exceptions=True
                    )
                for entry, result in zip(first, results, strict=True):
                    if isinstance(result, Exception):  # pragma: no cover - a bug must not stop the start
                        log.error("%s: first lookup of %s failed: %r", self.upstream, entry.what, result)
            except TimeoutError:
                log.warning(
                    "%s: DNS answers did not all come within %.1fs; the rest follow", self.upstream, budget
                )
            await self._apply(self.specs(), False)
        self.live = True
        for entry in self.entries:
            entry.refresher.start()

    def all_answered(self) -> bool:
        return all(e.refresher.state.answered for e in self.entries)

    # -- introspection --------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock.now()
        out = []
        for entry in self.entries:
            state = entry.refresher.state
            age = state.age(now)
            out.append(
                {
                    "name": entry.dns_name,
                    "type": entry.kind,
                    "replicas": len(entry.replicas),
                    "last_outcome": state.outcome,
                    "last_error": state.message or None,
                    "failures_in_a_row": state.failures,
                    "answer_age_seconds": None if age is None else round(age, 3),
                    "next_lookup_in_seconds": round(max(entry.refresher.next_at - now, 0.0), 3),
                }
            )
        return out

    def export_gauges(self) -> None:
        """Age of each name's last good answer; called at scrape time."""
        metrics = self.dns.metrics
        if metrics is None:
            return
        now = self.clock.now()
        ages: dict[str, float] = {}
        for entry in self.entries:
            age = entry.refresher.state.age(now)
            if age is not None:
                ages[entry.dns_name] = max(ages.get(entry.dns_name, 0.0), age)
        for name, age in ages.items():
            gauge = self._age_gauges.get(name)
            if gauge is None:
                gauge = self._age_gauges[name] = metrics.dns_answer_age.labels(self.upstream, name)
            gauge.set(age)

    async def close(self) -> None:
        await asyncio.gather(*(e.refresher.close() for e in self.entries), return_exceptions=True)
