"""Which replica serves each try: priority levels, balancing, ejection, panic.

State per replica (owned here, fed by the data path and the health checker):

* active health (``health_check``): unhealthy after ``unhealthy_threshold``
  failed probes in a row, healthy again after ``healthy_threshold`` passes;
* outlier ejection (``outlier_detection``): after ``consecutive_failures``
  failed tries in a row a replica is ejected for ``ejection_time`` x the number
  of its ejections (capped), never more than ``max_ejected`` of a level at
  once; with active checks it returns early after ``healthy_threshold`` passes
  (Envoy's ``successful_active_health_check_uneject_host``);
* overload: a 429 or 503 with ``Retry-After`` passes the replica over for
  that long (at most ``MAX_RETRY_AFTER``);
* slow start (``slow_start``): a replica that comes back (un-ejected, healthy
  again, undrained, new in a reload) takes a share of its picks that grows
  linearly from ``SLOW_START_FLOOR`` to all of them over the window; a pick
  it declines goes to a replica of the same plan that is not warming.

A replica is *eligible* when healthy, not ejected and not passed over. Traffic
goes to the lowest priority level with an eligible replica, spread by the
``balance`` policy and the weights. When every level has fewer eligible
replicas than ``panic_threshold`` of its size, the picker panics and spreads
over all replicas regardless of health (Envoy's ``healthy_panic_threshold``);
with ``panic_threshold: 0%`` it answers 503 instead.

Per request the picker does constant work: the eligible sets, the smooth
weighted round-robin order and cumulative weights are recomputed only when a
replica's state changes (or a timed ejection/pass-over runs out).
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from itertools import accumulate
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from proxy.clock import Clock
from proxy.cluster.options import RESULTS, SLOW_START_FLOOR, OutlierDetectionOptions
from proxy.kernel.classify import OUTLIER
from proxy.kernel.reasons import MAX_RETRY_AFTER, NOT_REPLICA_FAULTS, parse_retry_after
from proxy.metrics import Metrics
from proxy.upstream import UpstreamError, UpstreamPool
from proxy.upstream.alpn import AutoPool
from proxy.upstream.http2 import H2Pool
from proxy.upstream.tls import UpstreamTLS

__all__ = ["Replica", "ReplicaPicker", "ReplicaState"]


class Replica(Protocol):
    """One replica as the picker and the health checker see it (proxy.cluster.upstream.ReplicaRuntime)."""

    name: str
    host: str
    port: int
    unix_path: str | None
    authority: bytes
    priority: int
    weight: int
    pool: UpstreamPool | H2Pool | AutoPool
    address: str  # host:port or unix:PATH (checkpoints match by it; a DNS replica's name adds the name)
    source: str  # "policy", "resolve NAME" or "srv NAME"
    resolve: Callable[[], Awaitable[Sequence[str]]] | None  # a host name's addresses (DNS name cache)
    tls: UpstreamTLS | None  # https replicas: the upstream's TLS settings (health checks use them)
    tls_name: str  # the name its certificate is verified against


class ReplicaState:
    """What the picker knows about one replica."""

    __slots__ = (
        "replica",
        "name",
        "index",
        "level",
        "weight",
        "pool",
        "active_healthy",
        "passes",
        "fails",
        "last_check",
        "last_result",
        "last_duration",
        "failures",
        "ejected_until",
        "ejections",
        "ejection_count",
        "returned_at",
        "overloaded_until",
        "healthy_gauge",
        "ejections_counter",
        "check_counters",
        "drained",
        "health_word",
        "changed_at",
        "warming_since",
        "slow_starts_counter",
        "probation",
    )

    def __init__(self, replica: Replica, index: int, level: int) -> None:
        self.replica = replica
        self.name: str = replica.name
        self.index = index
        self.level = level
        self.weight: int = replica.weight
        self.pool: UpstreamPool | H2Pool | AutoPool = replica.pool
        self.active_healthy = True  # until active checks say otherwise (traffic flows from the start)
        self.passes = 0  # consecutive passing probes
        self.fails = 0  # consecutive failing probes
        self.last_check: float | None = None
        self.last_result: str | None = None
        self.last_duration: float | None = None
        self.failures = 0  # consecutive failed tries (passive)
        self.ejected_until = 0.0  # 0: not ejected
        self.ejections = 0  # total ejections (for the admin view)
        self.ejection_count = 0  # multiplier of ejection_time (decays while in rotation)
        self.returned_at = 0.0
        self.overloaded_until = 0.0
        self.healthy_gauge: Gauge | None = None
        self.ejections_counter: Counter | None = None
        self.check_counters: dict[str, Counter] = {}
        self.drained = False  # an operator took it out of rotation (POST .../drain)
        self.health_word = "healthy"  # last state seen by _rebuild, for "time since last change"
        self.changed_at = 0.0
        self.warming_since = 0.0  # when slow start began (0: at full share)
        self.slow_starts_counter: Counter | None = None
        # Added by DNS while active checks run: out of rotation (and of panic) until its first probe
        # passes; a failed first probe leaves it unhealthy (healthy_threshold passes bring it in).
        self.probation = False

    @property
    def health(self) -> str:
        if self.ejected_until:
            return "ejected"
        if not self.active_healthy:
            return "unhealthy"
        if self.overloaded_until:
            return "overloaded"
        return "healthy"

    @property
    def in_flight(self) -> int:
        pool = self.pool
        return pool.in_use + pool.pending

    def is_ejected(self) -> bool:
        return self.ejected_until > 0.0


class _Plan:
    """The replicas one pick chooses among, with everything precomputed."""

    __slots__ = ("label", "level", "replicas", "order", "cumulative", "total")

    def __init__(self, label: str, level: int | None, replicas: list[ReplicaState]) -> None:
        self.label = label
        self.level = level
        self.replicas = replicas
        self.order = _smooth_weighted_order(replicas)
        self.cumulative = list(accumulate(r.weight for r in replicas))
        self.total = self.cumulative[-1] if replicas else 0


def _smooth_weighted_order(replicas: list[ReplicaState]) -> list[ReplicaState]:
    """nginx's smooth weighted round robin unrolled into one period (gcd-reduced, bounded)."""
    if not replicas:
        return []
    weights = [r.weight for r in replicas]
    divisor = weights[0]
    for w in weights[1:]:
        while w:
            divisor, w = w, divisor % w
    weights = [w // divisor for w in weights]
    total = sum(weights)
    current = [0] * len(replicas)
    order: list[ReplicaState] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(replicas)), key=current.__getitem__)
        current[best] -= total
        order.append(replicas[best])
    return order


# The plan before the first _rebuild (which then sets the real one without counting a failover).
_NO_PLAN = _Plan("", None, [])


class ReplicaPicker:
    """Replica choice and replica state for one upstream; built once per policy load."""

    def __init__(
        self,
        upstream: str,
        replicas: Sequence[Replica],
        *,
        balance: str = "round_robin",
        slow_start: float = 0.0,
        panic_threshold: float = 0.5,
        outlier: OutlierDetectionOptions | None = None,
        health_thresholds: tuple[int, int] | None = None,
        clock: Clock,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.balance = balance
        self.slow_start = slow_start  # seconds; 0: off
        self._warming: set[ReplicaState] = set()  # replicas in their slow start (empty: nothing to do)
        self.panic_threshold = panic_threshold
        self.outlier = outlier
        # (healthy_threshold, unhealthy_threshold) when active checks run, else None.
        self.health_thresholds = health_thresholds
        self.clock = clock
        self._rng = rng or random.Random()
        self.states: list[ReplicaState] = []
        self._index_states([ReplicaState(r, i, 0) for i, r in enumerate(replicas)])
        self._level_plans: list[_Plan] = []
        self._plan = _NO_PLAN  # set by the first _rebuild below
        self._position = 0
        self._next_expiry = float("inf")
        self.failovers_seen: list[tuple[str, str]] = []  # bounded: last 32 transitions (admin/tests)
        self._bind_metrics(metrics)
        for state in self.states:
            state.changed_at = clock.now()
        self._rebuild(clock.now())

    def _index_states(self, states: list[ReplicaState]) -> None:
        """Levels, indexes and lookups for ``states`` (at build time, and when DNS changes the set)."""
        self.priorities = sorted({s.replica.priority for s in states})
        level_of = {p: i for i, p in enumerate(self.priorities)}
        self.levels: list[list[ReplicaState]] = [[] for _ in self.priorities]
        for index, state in enumerate(states):
            state.index = index
            state.level = level_of[state.replica.priority]
            state.weight = state.replica.weight
            self.levels[state.level].append(state)
        self.states = states
        self._by_name = {s.name: s for s in states}
        self._eject_limit = [self._limit(len(level)) for level in self.levels]

    def set_replicas(
        self, replicas: Sequence[Replica], gate: bool = True
    ) -> tuple[list[ReplicaState], list[ReplicaState]]:
        """DNS changed the set: keep the state of replicas that stay (by name), add the new ones (in
        probation until their first passing probe when active checks run and ``gate``), forget the
        removed ones. Returns ``(added, removed)`` states."""
        now = self.clock.now()
        previous = self._by_name
        states = []
        added = []
        for replica in replicas:
            state = previous.get(replica.name)
            if state is None or state.replica is not replica:
                state = ReplicaState(replica, 0, 0)
                state.changed_at = now
                if gate and self.health_thresholds is not None:
                    state.active_healthy = False
                    state.probation = True
                    state.health_word = "unhealthy"
                added.append(state)
            states.append(state)
        kept = {id(s) for s in states}
        removed = [s for s in self.states if id(s) not in kept]
        self._index_states(states)
        self._bind_states(added)
        self._unbind_states(removed)
        self._rebuild(now)
        return added, removed

    # -- metrics -----------------------------------------------------------------------------

    def _bind_metrics(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        self._failover_counters: dict[tuple[str, str], Counter] = {}
        self._active_gauge: Gauge | None
        self._panic_gauge: Gauge | None
        self.check_duration: Histogram | None
        if metrics is None:
            self._active_gauge = None
            self._panic_gauge = None
            self.check_duration = None
            return
        up = self.upstream
        self._active_gauge = metrics.upstream_active_priority.labels(up)
        self._panic_gauge = metrics.upstream_panic.labels(up)
        self.check_duration = metrics.health_check_duration.labels(up)
        self._bind_states(self.states)

    def _bind_states(self, states: list[ReplicaState]) -> None:
        metrics = self._metrics
        if metrics is None:
            return

        up = self.upstream
        for state in states:
            state.healthy_gauge = metrics.replica_healthy.labels(up, state.name)
            state.ejections_counter = metrics.replica_ejections.labels(up, state.name)
            if self.slow_start:
                state.slow_starts_counter = metrics.replica_slow_starts.labels(up, state.name)
                # The share in force, computed at scrape time (nothing per request).
                metrics.replica_slow_start_share.labels(up, state.name).set_function(
                    functools.partial(self.share_of, state)
                )
            if self.health_thresholds is not None:
                state.check_counters = {
                    result: metrics.health_checks.labels(up, state.name, result) for result in RESULTS
                }

    def _unbind_states(self, states: list[ReplicaState]) -> None:
        """Series of replicas DNS removed go away: pod addresses come and go, series must not pile up."""
        metrics = self._metrics
        if metrics is None:
            return
        up = self.upstream
        for state in states:
            if state.name in self._by_name:
                continue  # replaced by a replica of the same name (its weight changed): same series
            for family, labels in (
                (metrics.replica_healthy, (up, state.name)),
                (metrics.replica_ejections, (up, state.name)),
                *((metrics.health_checks, (up, state.name, r)) for r in RESULTS),
            ):
                with contextlib.suppress(KeyError):
                    family.remove(*labels)

    def _failover_counter(self, source: str, target: str) -> Counter | None:
        key = (source, target)
        child = self._failover_counters.get(key)
        if child is None and self._metrics is not None:
            # Labels are level numbers from the policy or "panic"/"none": a small closed set.
            child = self._failover_counters[key] = self._metrics.failovers.labels(
                self.upstream, source, target
            )
        return child

    # -- the pick (per try) ----------------------------------------------------------------------

    def choose(self, tried: list[str] | None = None) -> ReplicaState | None:
        """The replica for the next try, avoiding ``tried`` while another eligible one exists."""
        if self.clock.now() >= self._next_expiry:
            self._rebuild(self.clock.now())
        plan = self._plan
        replicas = plan.replicas
        if not replicas:
            return None
        balance = self.balance
        if balance == "round_robin":
            order = plan.order
            position = self._position % len(order)
            self._position = position + 1
            picked = order[position]
        elif len(replicas) == 1:
            picked = replicas[0]
        elif balance == "least_request":
            first = self._weighted(plan)
            second = self._weighted(plan)
            if second is first:
                # Two distinct candidates: the next one in the plan stands in for a repeat draw.
                second = replicas[(replicas.index(first) + 1) % len(replicas)]
            # Lower in-flight per unit of weight wins (Envoy's active_request_bias = 1).
            if second.in_flight * first.weight < first.in_flight * second.weight:
                picked = second
            else:
                picked = first
        else:
            picked = self._weighted(plan)
        if self._warming and picked.warming_since:
            picked = self._slow_start(plan, picked)
        if tried and picked.name in tried:
            return self._untried(plan, tried) or picked
        return picked

    # -- slow start --------------------------------------------------------------------------------

    def share_of(self, state: ReplicaState, now: float | None = None) -> float:
        """The share of its picks a replica keeps now: 1.0 unless it is in its slow start."""
        if not state.warming_since:
            return 1.0
        elapsed = (self.clock.now() if now is None else now) - state.warming_since
        if elapsed >= self.slow_start:
            return 1.0
        return max(SLOW_START_FLOOR, elapsed / self.slow_start)

    def _slow_start(self, plan: _Plan, picked: ReplicaState) -> ReplicaState:
        """A warming replica keeps a pick with probability share_of; otherwise a warm one takes it."""
        share = self.share_of(picked)
        if share >= 1.0:
            picked.warming_since = 0.0
            self._warming.discard(picked)
            return picked
        if self._rng.random() < share:
            return picked
        warm = [r for r in plan.replicas if not r.warming_since]
        if not warm:
            return picked  # all warming together: nobody to hand the pick to
        if len(warm) == 1:
            return warm[0]
        total = sum(r.weight for r in warm)
        point = self._rng.random() * total
        for r in warm:
            point -= r.weight
            if point < 0:
                return r
        return warm[-1]

    def _warm(self, state: ReplicaState, now: float) -> None:
        """``state`` comes back into rotation: start its slow start (when configured)."""
        if self.slow_start:
            state.warming_since = now or 1e-9  # never 0.0, which means "not warming"
            self._warming.add(state)
            if state.slow_starts_counter is not None:
                state.slow_starts_counter.inc()

    def _weighted(self, plan: _Plan) -> ReplicaState:
        return plan.replicas[bisect_right(plan.cumulative, self._rng.random() * plan.total)]

    def _untried(self, plan: _Plan, tried: list[str]) -> ReplicaState | None:
        """Retry path: an eligible replica not tried yet, same level first, then the next levels."""
        candidates = [r for r in plan.replicas if r.name not in tried]
        if not candidates and plan.level is not None:
            for later in self._level_plans[plan.level + 1 :]:
                candidates = [r for r in later.replicas if r.name not in tried]
                if candidates:
                    break
        if not candidates:
            return None
        if self.balance == "least_request":
            return min(candidates, key=lambda r: r.in_flight / r.weight)
        total = sum(r.weight for r in candidates)
        point = self._rng.random() * total
        for r in candidates:
            point -= r.weight
            if point < 0:
                return r
        return candidates[-1]

    # -- what happened (data path and health checker) ---------------------------------------------

    def observe(self, state: ReplicaState, status: int, error: UpstreamError | None) -> None:
        """Outcome of one try on ``state``: status 0 with ``error`` on a fault."""
        outlier = self.outlier
        if outlier is None:
            return
        if error is None:
            if status not in OUTLIER.statuses:
                state.failures = 0
                return
        elif error.reason in NOT_REPLICA_FAULTS:
            return  # Fender's own pool limit says nothing about the replica; any other fault does
        if state.ejected_until:
            return
        state.failures += 1
        if state.failures >= outlier.consecutive_failures:
            self._eject(state, self.clock.now())

    def overloaded(self, state: ReplicaState, retry_after: bytes) -> None:
        """A 429/503 with Retry-After: pass the replica over for that long (bounded)."""
        seconds = parse_retry_after(retry_after)
        if not seconds:
            return
        now = self.clock.now()
        until = now + min(seconds, MAX_RETRY_AFTER)
        if until > state.overloaded_until:
            already = state.overloaded_until > now
            state.overloaded_until = until
            if not already:
                # Only a replica leaving rotation changes the plans; extending a pass-over does not
                # (the rebuild at the old expiry sees the new one and reschedules itself).
                self._rebuild(now)

    def record_check(self, index: int | ReplicaState, result: str, duration: float, now: float) -> None:
        """One active probe result (from :class:`~proxy.cluster.health.HealthChecker`), for the
        replica at ``index`` or the given state."""
        state = self.states[index] if isinstance(index, int) else index
        if self._by_name.get(state.name) is not state:
            return  # DNS removed it while the probe ran
        state.last_check = now
        state.last_result = result
        state.last_duration = duration
        if self.check_duration is not None:
            self.check_duration.observe(duration)
            state.check_counters[result].inc()
        healthy_threshold, unhealthy_threshold = self.health_thresholds or (1, 1)
        changed = False
        if state.probation:
            state.probation = False
            if result == "pass":
                state.passes = healthy_threshold  # its first probe passed: it takes traffic now
        if result == "pass":
            state.passes += 1
            state.fails = 0
            if not state.active_healthy and state.passes >= healthy_threshold:
                state.active_healthy = True
                changed = True
                self._warm(state, now)
            if state.ejected_until and state.passes >= healthy_threshold:
                # Envoy's successful_active_health_check_uneject_host: no need to wait out the ejection.
                self._return(state, now)
                changed = True
        else:
            state.fails += 1
            state.passes = 0
            if state.active_healthy and state.fails >= unhealthy_threshold:
                state.active_healthy = False
                changed = True
        if changed:
            self._rebuild(now)

    # -- ejection ----------------------------------------------------------------------------------

    @staticmethod
    def _limit_for(fraction: float, size: int) -> int:
        if fraction <= 0:
            return 0
        return max(1, int(fraction * size + 1e-9))

    def _limit(self, size: int) -> int:
        return self._limit_for(self.outlier.max_ejected, size) if self.outlier is not None else 0

    def _eject(self, state: ReplicaState, now: float) -> None:
        outlier = self.outlier
        level = self.levels[state.level]
        if outlier is None:
            return  # observe() ejects only with outlier detection on
        if sum(1 for r in level if r.ejected_until) >= self._eject_limit[state.level]:
            return  # max_ejected reached: keep it in rotation, keep counting
        if state.ejection_count and state.returned_at:
            # One step of forgiveness for every ejection_time spent back in rotation.
            calm = int((now - state.returned_at) // outlier.ejection_time)
            state.ejection_count = max(0, state.ejection_count - calm)
        state.ejection_count += 1
        state.ejections += 1
        state.ejected_until = now + min(
            outlier.ejection_time * state.ejection_count, outlier.max_ejection_time
        )
        state.failures = 0
        state.passes = 0
        if state.ejections_counter is not None:
            state.ejections_counter.inc()
        self._rebuild(now)

    def _return(self, state: ReplicaState, now: float) -> None:
        state.ejected_until = 0.0
        state.returned_at = now
        state.failures = 0
        self._warm(state, now)

    # -- plans -------------------------------------------------------------------------------------

    def _rebuild(self, now: float) -> None:
        """Recompute eligible sets and the active plan; runs on state changes only."""
        next_expiry = float("inf")
        for state in self.states:
            if state.ejected_until:
                if state.ejected_until <= now:
                    self._return(state, now)
                else:
                    next_expiry = min(next_expiry, state.ejected_until)
            if state.overloaded_until:
                if state.overloaded_until <= now:
                    state.overloaded_until = 0.0
                else:
                    next_expiry = min(next_expiry, state.overloaded_until)
            if state.healthy_gauge is not None:
                state.healthy_gauge.set(1 if state.active_healthy and not state.ejected_until else 0)
            word = state.health
            if word != state.health_word:
                state.health_word = word
                state.changed_at = now
        self._next_expiry = next_expiry
        plans = []
        for index, level in enumerate(self.levels):
            eligible = [
                r
                for r in level
                if r.active_healthy and not r.ejected_until and not r.overloaded_until and not r.drained
            ]
            plans.append(_Plan(str(self.priorities[index]), index, eligible))
        self._level_plans = plans
        threshold = self.panic_threshold
        # Replicas DNS added that wait for their first probe count neither way (never checked yet).
        panic = (
            threshold > 0
            and bool(self.states)
            and all(
                len(p.replicas) < threshold * sum(1 for r in self.levels[i] if not r.probation)
                for i, p in enumerate(plans)
            )
        )
        if panic:
            plan = _Plan("panic", None, [s for s in self.states if not s.drained and not s.probation])
        else:
            plan = next((p for p in plans if p.replicas), None) or _Plan("none", None, [])
        previous = self._plan
        if previous is _NO_PLAN:
            self._plan = plan
            previous = plan
        elif (plan.label, [id(r) for r in plan.replicas]) != (
            previous.label,
            [id(r) for r in previous.replicas],
        ):
            self._plan = plan
            self._position = 0
        if plan.label != previous.label:
            self.failovers_seen.append((previous.label, plan.label))
            del self.failovers_seen[:-32]
            counter = self._failover_counter(previous.label, plan.label)
            if counter is not None:
                counter.inc()
        if self._active_gauge is not None and self._panic_gauge is not None:
            self._active_gauge.set(self.priorities[plan.level] if plan.level is not None else -1)
            self._panic_gauge.set(1 if panic else 0)

    # -- reload hand-over and checkpoints ------------------------------------------------------------

    def carry_over(self, old: ReplicaPicker) -> None:
        """A reload changed this upstream: take over the state of replicas that remain (by host:port).

        Active-health state (up/down, consecutive probe results) carries when both policies run
        health checks, ejections when both run outlier detection (the settings may differ: what
        was learned about the replica still holds); a Retry-After pass-over always carries.
        """
        previous = {state.name: state for state in old.states}
        health = self.health_thresholds is not None and old.health_thresholds is not None
        outlier = self.outlier is not None and old.outlier is not None
        now = self.clock.now()
        for state in self.states:
            was = previous.get(state.name)
            if was is None:
                self._warm(state, now)  # new in this reload: it joins replicas that carry traffic
                continue
            state.overloaded_until = was.overloaded_until
            if was.warming_since and self.slow_start:
                state.warming_since = was.warming_since
                self._warming.add(state)
            if health:
                state.active_healthy, state.passes, state.fails = was.active_healthy, was.passes, was.fails
                state.last_check, state.last_result = was.last_check, was.last_result
                state.last_duration = was.last_duration
            if outlier:
                state.failures, state.ejected_until = was.failures, was.ejected_until
                state.ejections, state.ejection_count = was.ejections, was.ejection_count
                state.returned_at = was.returned_at
        self._rebuild(self.clock.now())

    def export_state(self) -> dict[str, dict[str, Any]]:
        """Replica health and ejections for a checkpoint, by address (host:port, also for a replica
        from DNS: its name may differ next time), times on the wall clock."""
        now, wall = self.clock.now(), time.time()

        def to_wall(t: float) -> float:
            return wall + (t - now) if t else 0.0

        return {
            s.replica.address: {
                "active_healthy": s.active_healthy,
                "passes": s.passes,
                "fails": s.fails,
                "failures": s.failures,
                "ejected_until": to_wall(s.ejected_until),
                "ejections": s.ejections,
                "ejection_count": s.ejection_count,
                "returned_at": to_wall(s.returned_at),
            }
            for s in self.states
        }

    def import_state(
        self, data: dict[str, Any], health: bool, outlier: bool, states: list[ReplicaState] | None = None
    ) -> list[str]:
        """Restore :meth:`export_state` output of a previous process; returns the replicas restored.

        Only replicas still in the upstream are touched (only ``states`` when given: those DNS just
        added); ``health`` / ``outlier`` say whether the health check / outlier detection settings
        are the same as when it was written.
        """
        now, wall = self.clock.now(), time.time()

        def from_wall(t: float) -> float:
            return now + (t - wall) if t else 0.0

        restored = []
        for state in self.states if states is None else states:
            saved = data.get(state.replica.address)
            if not isinstance(saved, dict):
                continue
            if health:
                state.probation = False  # what the previous process learned stands for a first probe
                state.active_healthy = bool(saved["active_healthy"])
                state.passes, state.fails = int(saved["passes"]), int(saved["fails"])
            if outlier:
                until = from_wall(float(saved["ejected_until"]))
                state.ejected_until = until if until > now else 0.0
                state.failures = int(saved["failures"])
                state.ejections, state.ejection_count = int(saved["ejections"]), int(saved["ejection_count"])
                state.returned_at = from_wall(float(saved["returned_at"]))
            restored.append(state.name)
        self._rebuild(now)
        return restored

    # -- introspection ------------------------------------------------------------------------------

    @property
    def active_label(self) -> str:
        """The level serving now ("0", "1", ...), "panic" or "none"."""
        if self.clock.now() >= self._next_expiry:
            self._rebuild(self.clock.now())
        return self._plan.label

    def state_of(self, name: str) -> ReplicaState:
        return self._by_name[name]

    def set_drained(self, name: str, drained: bool) -> ReplicaState:
        """Take a replica out of rotation (or put it back) by operator decision; KeyError if unknown."""
        state = self._by_name[name]
        if state.drained != drained:
            state.drained = drained
            if not drained:
                self._warm(state, self.clock.now())
            self._rebuild(self.clock.now())
        return state

    def snapshot(self) -> dict[str, Any]:
        now = self.clock.now()
        if now >= self._next_expiry:
            self._rebuild(now)
        replicas = []
        for s in self.states:
            state = s.health
            replicas.append(
                {
                    "name": s.name,
                    "address": s.replica.address,
                    "source": s.replica.source,
                    "priority": s.replica.priority,
                    "weight": s.weight,
                    "state": state,
                    "state_for_seconds": round(now - s.changed_at, 3),
                    "drained": s.drained,
                    "slow_start_share": None
                    if self.share_of(s, now) >= 1.0
                    else round(self.share_of(s, now), 3),
                    "serving": any(r is s for r in self._plan.replicas),
                    "in_flight": s.in_flight,
                    "last_check": None
                    if s.last_check is None
                    else {
                        "result": s.last_result,
                        "seconds_ago": round(now - s.last_check, 3),
                        "duration_seconds": round(s.last_duration or 0.0, 6),
                    },
                    "consecutive_passes": s.passes,
                    "consecutive_fails": s.fails,
                    "consecutive_failures": s.failures,
                    "ejections": s.ejections,
                    "ejected_for_seconds": round(s.ejected_until - now, 3) if s.ejected_until else 0,
                    "overloaded_for_seconds": round(s.overloaded_until - now, 3) if s.overloaded_until else 0,
                }
            )
        plan = self._plan
        return {
            "balance": self.balance,
            "slow_start_seconds": self.slow_start or None,
            "active_priority": self.priorities[plan.level] if plan.level is not None else None,
            "panic": plan.label == "panic",
            "health_checks": self.health_thresholds is not None,
            "outlier_detection": self.outlier is not None,
            "replicas": replicas,
        }
