"""Asynchronous DNS lookups that return TTLs: A/AAAA for addresses, SRV for targets.

Built on dnspython's asyncio resolver (pure Python, no thread, no native
extension): a lookup is a few UDP datagrams on the event loop, bounded by
``dns.timeout`` for all name servers and retries together. With
``dns.resolvers`` empty Fender does what the system does: ``/etc/hosts``
first (re-read when it changes), then the name servers, search list and
ndots of ``/etc/resolv.conf``.

Every failure is one of a closed set of outcomes (the ``outcome`` label of
``fender_dns_lookups_total``): ``nxdomain`` and ``empty`` say the name has no
such records; ``timeout``, ``servfail``, ``refused``, ``unreachable`` and
``error`` say nothing about the name, only that no answer came.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.cluster.options import DnsOptions

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.resolver

__all__ = [
    "OUTCOMES",
    "NEGATIVE",
    "AddressAnswer",
    "DnsResolver",
    "HostsFile",
    "LookupFailed",
    "SrvRecord",
    "SrvAnswer",
]

OK = "ok"
# Every value of the outcome label, in the order the docs list them.
OUTCOMES = (OK, "nxdomain", "empty", "timeout", "servfail", "refused", "unreachable", "error")
# Answers that say the name has nothing: the last good set is kept for max_stale only.
NEGATIVE = frozenset(("nxdomain", "empty"))

HOSTS_PATH = "/etc/hosts"
_HOSTS_MAX_BYTES = 1024 * 1024


class LookupFailed(OSError):
    """No usable answer; ``outcome`` is one of :data:`OUTCOMES` (never ``ok``).

    An OSError, so a connection pool reports it like a failed connect (its words as the cause)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class AddressAnswer:
    addresses: tuple[str, ...]  # IPv4 first, then IPv6, each in the order the server gave
    ttl: float


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # without the trailing dot


@dataclass(frozen=True, slots=True)
class SrvAnswer:
    records: tuple[SrvRecord, ...]
    ttl: float


class HostsFile:
    """``/etc/hosts`` as a name -> addresses map, read again when its modification time changes."""

    def __init__(self, path: str = HOSTS_PATH) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._names: dict[str, tuple[str, ...]] = {}

    def lookup(self, name: str) -> tuple[str, ...]:
        try:
            st = os.stat(self.path)
        except OSError:
            return ()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            self._names = self._read()
        return self._names.get(name.rstrip(".").lower(), ())

    def _read(self) -> dict[str, tuple[str, ...]]:
        names: dict[str, list[str]] = {}
        try:
            with open(self.path, "rb") as f:
                data = f.read(_HOSTS_MAX_BYTES)
        except OSError:
            return {}
        for raw in data.decode("utf-8", "replace").splitlines():
            fields = raw.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            try:
                address = str(ipaddress.ip_address(fields[0].split("%", 1)[0]))
            except ValueError:
                continue
            for host in fields[1:]:
                found = names.setdefault(host.lower(), [])
                if address not in found:
                    found.append(address)
        # IPv4 first, as for answers from a name server.
        return {name: tuple(sorted(found, key=lambda a: ":" in a)) for name, found in names.items()}


class DnsResolver:
    """Lookups with the ``dns:`` settings of the policy; one per policy load (kept across reloads)."""

    def __init__(self, options: DnsOptions, hosts: HostsFile | None = None) -> None:
        self.options = options
        self.system = not options.resolvers
        self.hosts = (hosts or HostsFile()) if self.system else None
        # Made at the first lookup: a policy without names never reads resolv.conf (nor imports dnspython).
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _dns(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            import dns.asyncresolver
            import dns.nameserver

            if self.system:
                resolver = dns.asyncresolver.Resolver(configure=True)
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(address, port) for address, port in self.options.servers
                ]
            resolver.cache = None  # the refreshers and the name cache keep answers, with their TTLs
            resolver.lifetime = self.options.timeout
            resolver.timeout = self.options.timeout
            self._resolver = resolver
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        import dns.exception
        import dns.resolver

        try:
            resolver = self._dns()
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf, or one without name servers
            raise LookupFailed("error", f"no name server configured ({exc})") from None
        try:
            async with asyncio.timeout(self.options.timeout + 0.5):  # dnspython bounds it; belt and braces
                return await resolver.resolve(name, rdtype, search=self.system or None)
        except dns.resolver.NXDOMAIN:
            raise LookupFailed("nxdomain", f"{name} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise LookupFailed("empty", f"{name} has no {rdtype} records") from None
        except (dns.exception.Timeout, TimeoutError):
            raise LookupFailed("timeout", f"no answer for {name} within {self.options.timeout:g}s") from None
        except dns.resolver.NoNameservers as exc:
            outcome, detail = _server_failure(exc)
            raise LookupFailed(outcome, f"{name}: {detail}") from None
        except dns.exception.DNSException as exc:
            raise LookupFailed("error", f"{name}: {exc}") from None
        except OSError as exc:
            raise LookupFailed("unreachable", f"{name}: {exc.strerror or exc}") from None

    async def addresses(self, name: str) -> AddressAnswer:
        """The A and AAAA addresses of ``name`` with the smaller of their TTLs; LookupFailed if none."""
        if self.hosts is not None:
            found = self.hosts.lookup(name)
            if found:
                return AddressAnswer(found, self.options.max_ttl)
        try:
            return AddressAnswer((str(ipaddress.ip_address(name)),), self.options.max_ttl)
        except ValueError:
            pass
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        ttls = []
        failures: list[LookupFailed] = []
        for result in results:
            if isinstance(result, LookupFailed):
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                ttls.append(_ttl(result))
                addresses.extend(str(r.address) for r in result)
        if addresses:
            return AddressAnswer(tuple(dict.fromkeys(addresses)), float(min(ttls)))
        # Nothing found: a failure that says nothing about the name wins over "no such records".
        failures.sort(key=lambda f: f.outcome in NEGATIVE)
        first = failures[0] if failures else LookupFailed("empty", f"{name} has no A or AAAA records")
        if first.outcome == "empty":
            raise LookupFailed("empty", f"{name} has no A or AAAA records")
        raise first

    async def srv(self, name: str) -> SrvAnswer:
        """The SRV records of ``name`` (target "." means no service: no records)."""
        answer = await self._query(name, "SRV")
        records = []
        for r in answer:
            target = r.target.to_text(omit_final_dot=True)
            if target in ("", "."):
                continue
            records.append(SrvRecord(int(r.priority), int(r.weight), int(r.port), target.lower()))
        if not records:
            raise LookupFailed("empty", f"{name} has no SRV targets")
        records.sort(key=lambda r: (r.priority, -r.weight, r.target, r.port))
        return SrvAnswer(tuple(records), float(_ttl(answer)))


def _ttl(answer: dns.resolver.Answer) -> int:
    """The TTL of an answer's records (resolve() raises NoAnswer when there are none)."""
    return answer.rrset.ttl if answer.rrset is not None else 0


def _server_failure(exc: dns.resolver.NoNameservers) -> tuple[str, str]:
    """The outcome of dnspython's NoNameservers: what the servers said (SERVFAIL, REFUSED) or why
    none could be asked."""
    errors = exc.kwargs.get("errors") or []
    words = []
    outcome = "error"
    for err in errors:
        said = err[3] if len(err) > 3 else err
        text = str(said)
        words.append(f"{err[0]} {text}")
        if text == "SERVFAIL":
            outcome = "servfail"
        elif text == "REFUSED" and outcome != "servfail":
            outcome = "refused"
        elif isinstance(said, OSError) and outcome == "error":
            outcome = "unreachable"
    return outcome, "; ".join(words) or "no name server answered"
