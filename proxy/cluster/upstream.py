"""One upstream at run time: its replicas, their connection pools, the picker and the health checks.

Built once per policy load (reused whole by a reload that keeps the upstream's settings) and
shared by every route that names the upstream. The forwarder (proxy/dataplane/forward.py)
asks it for a replica per try and reports each try's outcome back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.cluster.dns.entries import Dns, DnsEntries, DnsReplica, uses_dns
from proxy.cluster.faultlog import FaultLog
from proxy.cluster.health import HealthChecker
from proxy.cluster.options import DnsOptions
from proxy.cluster.picker import Replica, ReplicaPicker, ReplicaState
from proxy.config.models import PoolOptions, Upstream
from proxy.config.models import Replica as ReplicaOptions
from proxy.kernel.exchange import Exchange
from proxy.metrics import Metrics, UpstreamMetrics
from proxy.options.base import PolicyModel
from proxy.options.tls import UpstreamTLSOptions
from proxy.upstream import UpstreamError, UpstreamPool
from proxy.upstream.alpn import AutoPool, auto_pools
from proxy.upstream.http2 import H2Pool, alpn_protocols
from proxy.upstream.tls import UpstreamTLS

log = logging.getLogger("fender")


class ReplicaRuntime:
    __slots__ = (
        "name",
        "host",
        "port",
        "unix_path",
        "priority",
        "weight",
        "pool",
        "authority",
        "address",
        "source",
        "resolve",
        "tls",
        "tls_name",
    )

    def __init__(
        self,
        replica: ReplicaOptions | DnsReplica,
        pool_options: PoolOptions,
        pool_class: type[UpstreamPool] = UpstreamPool,
        resolve: Callable[[], Awaitable[Sequence[str]]] | None = None,
        tls: UpstreamTLS | None = None,
        protocol: str = "http1",
    ) -> None:
        self.host: str = replica.host
        # The upstream's TLS settings for an https:// replica, else None.
        self.tls: UpstreamTLS | None = tls if getattr(replica, "tls", False) else None
        # The name its certificate is verified against (SNI): a DNS replica's name, not its address.
        self.tls_name: str = getattr(replica, "server_name", "") or replica.host
        self.port: int = replica.port
        self.unix_path: str | None = replica.unix_path
        self.name: str = replica.name  # host:port, unix:PATH, or address:port (dns name) for one from DNS
        self.address: str = replica.address  # host:port or unix:PATH: what checkpoints match by
        self.source: str = replica.source  # "policy", "resolve NAME" or "srv NAME"
        self.authority: bytes = replica.authority.encode()
        self.priority: int = replica.priority
        self.weight: int = replica.weight
        self.resolve = resolve  # a host name's addresses, from the DNS name cache
        # Only a host name's pool takes the resolver (test pool classes need not know it).
        extra: dict[str, Any] = {} if resolve is None else {"resolve": resolve}
        # protocol: h2 is prior knowledge on cleartext and ALPN h2 over TLS; auto is HTTP/1.1 on
        # cleartext and, over TLS, what the replica chooses by ALPN (h2 or http/1.1: AutoPool).
        self.pool: UpstreamPool | H2Pool | AutoPool
        options: dict[str, Any] = {
            "unix_path": replica.unix_path,
            "max_connections": pool_options.max_connections,
            "max_keepalive": pool_options.max_keepalive,
            "connect_timeout": pool_options.connect_timeout,
            "keepalive_idle_timeout": pool_options.idle_timeout,
            "max_pending": pool_options.max_pending,
        }
        client = None if self.tls is None else self.tls.client(self.tls_name)
        if protocol == "h2":
            self.pool = H2Pool(
                replica.host,
                replica.port,
                max_concurrent_streams=pool_options.max_concurrent_streams,
                tls=client,
                resolve=resolve,
                **options,
            )
        elif protocol == "auto" and client is not None:
            self.pool = auto_pools(
                replica.host,
                replica.port,
                client,
                resolve,
                pool_class,
                max_concurrent_streams=pool_options.max_concurrent_streams,
                **options,
            )
        else:
            self.pool = pool_class(replica.host, replica.port, tls=client, **options, **extra)


class UpstreamRuntime:
    """The replicas of one upstream, their pools, picker and health checks; built once per policy load.

    With DNS entries (``resolve: true``, ``srv:``) the replica list changes while it runs:
    :meth:`set_replicas` applies each new answer like a reload of this upstream.
    """

    def __init__(
        self,
        name: str,
        options: Upstream,
        metrics: Metrics,
        clock: Clock = SYSTEM_CLOCK,
        dns: Dns | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self.clock = clock
        # TLS settings for the https:// replicas (raises TLSFileError when a file cannot be used).
        self.tls = (
            UpstreamTLS(
                getattr(options, "tls", None) or UpstreamTLSOptions(),
                f"upstreams.{name}.tls",
                alpn_protocols(options.protocol),
            )
            if any(getattr(r, "tls", False) for r in options.replicas)
            else None
        )
        self._tls_handshakes = None
        if self.tls is not None:
            handshakes = metrics.upstream_tls_handshakes
            full, resumed = handshakes.labels(name, "full"), handshakes.labels(name, "resumed")

            def counted(again: bool) -> None:
                (resumed if again else full).inc()

            self._tls_handshakes = counted
        if dns is None and uses_dns(options):
            dns = Dns(DnsOptions(), clock, metrics)
        self.dns = dns
        self.discovery: DnsEntries | None = None
        if any(r.discovered for r in options.replicas):
            if dns is None:
                dns = self.dns = Dns(DnsOptions(), clock, metrics)
            self.discovery = DnsEntries(name, options.replicas, dns, self.set_replicas)
        specs = options.replicas if self.discovery is None else self.discovery.specs()
        self.replicas = [self._replica(r) for r in specs]
        self.metrics = UpstreamMetrics(metrics, name)
        self.faults = FaultLog(name, clock)  # the error log's lines for this upstream's faults
        self._pool_gauges = metrics.pool_connections
        self._stream_gauges = metrics.pool_streams
        health = options.health_check
        self.picker = ReplicaPicker(
            name,
            self.replicas,
            balance=options.balance,
            slow_start=getattr(options, "slow_start", None) or 0.0,
            panic_threshold=options.panic_threshold,
            outlier=options.outlier_detection,
            health_thresholds=None
            if health is None
            else (health.healthy_threshold, health.unhealthy_threshold),
            clock=clock,
            metrics=metrics,
        )
        self._state_of: dict[Replica, ReplicaState] = {state.replica: state for state in self.picker.states}
        self.health = None if health is None else HealthChecker(health, self.picker, clock)
        self._previous: UpstreamRuntime | None = None  # the one this replaces on a reload (take_over)
        self._given_pools: set[int] = set()  # pools a newer runtime took over: not closed here
        self._retiring: set[asyncio.Task[None]] = set()  # pools of replicas DNS removed, closing once idle
        self._restore: tuple[dict[str, Any], bool, bool] | None = (
            None  # checkpoint data for replicas DNS brings
        )

    def _replica(self, spec: Any) -> ReplicaRuntime:
        resolve = None
        if spec.needs_lookup and self.dns is not None:
            resolve = self.dns.cache.for_host(spec.host, self.name)
        replica = ReplicaRuntime(
            spec, self.options.pool, resolve=resolve, tls=self.tls, protocol=self.options.protocol
        )
        if self._tls_handshakes is not None and getattr(replica.pool, "tls", None) is not None:
            replica.pool.on_tls_handshake = self._tls_handshakes  # counted for replicas DNS adds too
        return replica

    def choose(self, ex: Exchange | None = None) -> Replica | None:
        """The replica for the next try, or None when none may take it (503 no_healthy_replica).

        Replicas named in ``ex.tried`` are avoided while another eligible one
        exists (same priority level first, then the next), so a retry lands elsewhere.
        """
        state = self.picker.choose(ex.tried if ex is not None else None)
        return None if state is None else state.replica

    def slow_start_note(self) -> str | None:
        """For Fender-Trace: the replicas in their slow start and the share each keeps, or None."""
        picker = self.picker
        if not picker._warming:
            return None
        now = self.clock.now()
        shares = sorted(
            f"{s.name} {share:.0%}" for s in picker._warming if (share := picker.share_of(s, now)) < 1.0
        )
        return "slow start: " + ", ".join(shares) if shares else None

    def observe(
        self,
        replica: Replica,
        status: int,
        error: UpstreamError | None,
        duration: float,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Outcome of one try, for passive health (outlier detection). status is 0 on a fault.

        A 429/503 carrying Retry-After also passes the replica over for that long (overload signal).
        """
        state = self._state_of.get(replica)
        if state is None:
            return  # a replica DNS removed while this try was under way: nothing left to learn about
        self.picker.observe(state, status, error)
        if (status == 503 or status == 429) and headers:
            for name, value in headers:
                if name == b"retry-after":
                    self.picker.overloaded(state, value)
                    break

    async def start(self) -> None:
        """First DNS answers (bounded; a name that does not resolve is logged, not fatal), then the
        health-check and DNS refresh tasks, once the runtime goes live."""
        if self.discovery is not None:
            await self.discovery.start()
        if self.health is not None:
            self.health.start()
        if self.tls is not None:
            self.tls.start()  # watch the certificate files

    async def set_replicas(self, specs: list[Any], gate: bool = True) -> None:
        """The replicas are now ``specs`` (a DNS answer changed): like a reload of this upstream.

        Replicas that stay (same name) keep their health, ejection and pool state; new ones are
        added (with active checks and ``gate``, out of rotation until their first passing probe);
        removed ones get no new request, their in-flight requests finish and their pools close.
        One INFO line says what changed.
        """
        current = {r.name: r for r in self.replicas}
        replicas = []
        for spec in specs:
            kept = current.get(spec.name)
            if kept is not None and (kept.priority, kept.weight) == (spec.priority, spec.weight):
                replicas.append(kept)
            else:
                replicas.append(self._replica(spec))
        before = len(self.replicas)
        new_ids = {id(r) for r in replicas}
        dropped = [r for r in self.replicas if id(r) not in new_ids]
        self.replicas = replicas
        added, removed = self.picker.set_replicas(replicas, gate)
        self._state_of = {state.replica: state for state in self.picker.states}
        if self.health is not None:
            await self.health.sync(added, removed)
        if self._restore is not None:
            data, health, outlier = self._restore
            if added:
                self.picker.import_state(data, health, outlier, added)
            if self.discovery is not None and self.discovery.all_answered():
                self._restore = None  # later additions are new replicas, not the ones saved
        names = {r.name for r in replicas}
        for replica in dropped:
            if replica.name not in names:
                self.metrics.forget(replica.name)
            task = asyncio.create_task(self._retire(replica.pool), name=f"retire {replica.name}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        if added or dropped:
            change = [f"+{s.name}" for s in added] + [f"-{r.name}" for r in dropped]
            log.info("%s: %d -> %d replicas (%s)", self.name, before, len(replicas), ", ".join(change))
        if not replicas and self.discovery is not None and self.discovery.live:
            log.warning("%s: no replicas left: requests get 503 no_healthy_replica", self.name)

    @staticmethod
    async def _retire(pool: UpstreamPool | H2Pool | AutoPool) -> None:
        """A replica DNS removed: idle connections close now, in-use ones when their request ends;
        requests already waiting for a connection get theirs (they wait at most connect_timeout)."""
        if pool.pending:
            await asyncio.sleep(pool.connect_timeout)
        await pool.close()

    def dns_snapshot(self) -> list[dict[str, Any]]:
        """The upstream's DNS entries: name, type, replicas, last outcome, age of the answer."""
        return [] if self.discovery is None else self.discovery.snapshot()

    def export_pool_gauges(self) -> None:
        """Copy pool sizes (and the age of DNS answers) into gauges; called at scrape time, not per request."""
        if self.discovery is not None:
            self.discovery.export_gauges()
        for replica in self.replicas:
            pool = replica.pool
            self._pool_gauges.labels(self.name, replica.name, "in_use").set(pool.in_use)
            self._pool_gauges.labels(self.name, replica.name, "idle").set(pool.idle)
            if not isinstance(pool, UpstreamPool):
                self._stream_gauges.labels(self.name, replica.name).set(pool.streams)

    # -- reload hand-over and checkpoints ---------------------------------------------------------
    # An upstream whose settings did not change is reused as a whole (runtime.keep). When they
    # changed, this new UpstreamRuntime takes over what still applies from the previous one.

    def carry_over(self, old: UpstreamRuntime) -> None:
        """While the new runtime is built: take the DNS answers of names both policies give, and copy
        the health/ejection state of remaining replicas."""
        if self.discovery is not None and old.discovery is not None and self.discovery.adopt(old.discovery):
            self.replicas = [self._replica(r) for r in self.discovery.specs()]
            self.picker.set_replicas(self.replicas, gate=False)
            self._state_of = {state.replica: state for state in self.picker.states}
            if self.options.health_check is not None:
                self.health = HealthChecker(self.options.health_check, self.picker, self.clock)
        self.picker.carry_over(old.picker)
        self.faults = old.faults  # a reload does not reopen the error log to a replica already muted
        self._previous = old

    async def take_over(self) -> None:
        """When the new runtime goes live: keep the pools of replicas whose URL and pool settings
        did not change (warm connections, no reconnect storm) and stop the old health checks."""
        old, self._previous = self._previous, None
        if old is None:
            return
        if (
            old.options.pool == self.options.pool
            and getattr(old.options, "tls", None) == getattr(self.options, "tls", None)
            and old.options.protocol == self.options.protocol
        ):
            pools = {r.name: r.pool for r in old.replicas}
            for replica in self.replicas:
                pool = pools.get(replica.name)
                if pool is not None and pool is not replica.pool:
                    unused, replica.pool = replica.pool, pool
                    if pool.tls is not None and self.tls is not None:
                        # The kept pool follows this runtime's TLS files (watched here from now on).
                        pool.tls.owner = self.tls
                        pool.tls.generation = -1
                    self._state_of[replica].pool = pool
                    old._given_pools.add(id(pool))
                    await unused.close()
        if old.health is not None:
            await old.health.close()

    def checkpoint_snapshot(self) -> dict[str, Any]:
        return {
            "health_check": _dump(self.options.health_check),
            "outlier_detection": _dump(self.options.outlier_detection),
            "replicas": self.picker.export_state(),
        }

    def checkpoint_restore(self, data: dict[str, Any]) -> None:
        """Restore replica state written by a previous process where the settings still match."""
        health = self.options.health_check is not None and data.get("health_check") == _dump(
            self.options.health_check
        )
        outlier = self.options.outlier_detection is not None and data.get("outlier_detection") == _dump(
            self.options.outlier_detection
        )
        if (health or outlier) and isinstance(data.get("replicas"), dict):
            self.picker.import_state(data["replicas"], health, outlier)
            if self.discovery is not None and not self.discovery.all_answered():
                # Replicas from DNS may come later than the restore: they take their state when they do.
                self._restore = (data["replicas"], health, outlier)

    async def close(self) -> None:
        if self.discovery is not None:
            await self.discovery.close()
        for task in list(self._retiring):
            task.cancel()
        if self.health is not None:
            await self.health.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.tls is not None:
            await self.tls.close()
        await asyncio.gather(
            *(r.pool.close() for r in self.replicas if id(r.pool) not in self._given_pools),
            return_exceptions=True,
        )


def _dump(options: PolicyModel | None) -> dict[str, Any] | None:
    return None if options is None else options.model_dump(mode="json")
