"""The innermost layer: send the exchange to one replica of the route's upstream.

Each replica has its own connection pool (a bulkhead at the connection level:
one slow replica cannot take the connections of another). Replica choice,
health checks and outlier ejection live in proxy.cluster.picker and
proxy.cluster.health; UpstreamRuntime delegates to them.
"""

from __future__ import annotations

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.cluster.upstream import UpstreamRuntime
from proxy.grpc import format_timeout as format_grpc_timeout
from proxy.kernel.exchange import BodyTooLarge, Exchange, LocalReply, Reply, RequestBodyTimeout
from proxy.upstream import UpstreamError


class Forwarder:
    """Terminal layer: one try against one replica; faults become local replies."""

    __slots__ = ("upstream", "idle_timeout", "rewrite_host", "_host", "_metrics", "_clock", "_propagate")

    def __init__(self, upstream: UpstreamRuntime, route, clock: Clock = SYSTEM_CLOCK) -> None:
        self.upstream = upstream
        self.idle_timeout = route.idle_timeout
        # true: the replica's host:port; a name: that Host for every replica (a unix socket has none).
        rewrite = route.rewrite_host
        self.rewrite_host = rewrite is not False
        self._host = rewrite.encode() if isinstance(rewrite, str) else None
        self._metrics = upstream.metrics
        self._clock = clock
        self._propagate = getattr(route, "propagate_deadline", False)

    async def __call__(self, ex: Exchange) -> Reply:
        started = self._clock.now()
        head_timeout = ex.deadline - started
        if ex.try_timeout is not None and ex.try_timeout < head_timeout:
            head_timeout = ex.try_timeout
        if head_timeout <= 0:
            return LocalReply("timeout", "no time left before the route's deadline")
        upstream = self.upstream
        replica = upstream.choose(ex)
        if replica is None:
            return LocalReply("no_healthy_replica", status=503, headers=[(b"retry-after", b"1")])
        ex.upstream_name = upstream.name
        ex.replica_name = replica.name
        ex.tried.append(replica.name)
        if ex.trace is not None and upstream.picker._warming:
            warming = upstream.slow_start_note()
            if warming is not None:
                ex.note(warming)
        host = self._host or (replica.authority if (self.rewrite_host or ex.host is None) else ex.host)
        headers = [(b"host", host), *ex.headers]
        if self._propagate and head_timeout < 1e9:
            # Deadline propagation: how long this try will wait, so the upstream can give up with us.
            headers.append((b"fender-deadline-ms", b"%d" % int(head_timeout * 1000)))
        if ex.grpc_deadline:
            headers.append((b"grpc-timeout", format_grpc_timeout(head_timeout)))
        metrics = self._metrics
        try:
            response = await replica.pool.request(
                ex.method_bytes,
                ex.upstream_target or ex.target,
                headers,
                body=ex.body,
                body_stream=ex.body_stream,
                content_length=ex.content_length,
                head_timeout=head_timeout,
                idle_timeout=self.idle_timeout,
                hooks=ex,  # the upgrade it asks for, and where 1xx answers go (Exchange.relay_interim)
            )
        except UpstreamError as error:
            metrics.error(error.reason).inc()
            metrics.outcome(replica.name, error.reason).inc()
            upstream.observe(replica, 0, error, self._clock.now() - started)
            upstream.faults.report(replica.name, ex.route_name, error, ex.request_id)
            ex.note(f"try {replica.name} {error.reason}")
            return LocalReply.from_upstream_error(error)
        except BodyTooLarge:
            return LocalReply("body_too_large", close=True)
        except RequestBodyTimeout:
            return LocalReply("request_body_timeout", close=True)
        elapsed = self._clock.now() - started
        metrics.duration.observe(elapsed)
        metrics.outcome(replica.name, _STATUS_OUTCOME[min(max(response.status // 100, 1), 5)]).inc()
        upstream.observe(replica, response.status, None, elapsed, response.headers)
        if ex.trace is not None:
            ex.note(f"try {replica.name} {response.status} {elapsed * 1000:.1f}ms")
        return response


_STATUS_OUTCOME = ("", "1xx", "2xx", "3xx", "4xx", "5xx")
