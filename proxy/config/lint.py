"""Warnings about a valid policy: parts that can never take effect.

A warning does not stop a policy (it is valid, and may be on its way to what
the user means), but says where it does not do what it seems to:

* a route that can never match (proxy/config/shadow.py);
* a limit another limit makes unreachable: a try deadline, a slow-call
  threshold or a queue wait not shorter than the route's timeout (the route's
  deadline always ends first); a replay buffer above the route's ``max_body``
  (larger bodies are refused before they could be kept); a bulkhead above what
  the upstream's pools admit at once (the pools refuse first); a rate limit of
  a route that another of its limits makes redundant: both local and enforced,
  the other counting every request this one counts (same key, or key: route)
  with a rate and a burst no larger. Admission is all-or-nothing (a request
  consumes from every bucket or from none), so whatever the stricter bucket
  admits conforms to the looser one, which therefore never refuses first.

Only values the user wrote are judged: a default that another value makes
moot is not worth a warning. Each warning is ``(location, message)``; the
loader turns it into ``FILE:LINE:COL``.
"""

from __future__ import annotations

from fractions import Fraction

from proxy.config.shadow import shadowed_routes
from proxy.options.units import format_duration, format_rate, format_size

__all__ = ["policy_warnings"]

Loc = tuple[str | int, ...]


def policy_warnings(policy) -> list[tuple[Loc, str]]:
    """Every warning about ``policy``, in file order of the routes."""
    out: list[tuple[Loc, str]] = []
    routes = policy.routes
    for index, takers in shadowed_routes(routes):
        route = routes[index]
        names = " and ".join(f'"{routes[i].name}" (routes[{i}])' for i in takers)
        which = f"route {names} takes" if len(takers) == 1 else f"routes {names} together take"
        out.append(
            (
                ("routes", index),
                f'route "{route.name}" can never match: {which} every request it would, first '
                "(routes are tried in file order: move it above, or narrow the earlier match)",
            )
        )
    for index, route in enumerate(routes):
        out += _route_limits(policy, index, route)
        out += _rate_limits(index, route)
    for name, upstream in policy.upstreams.items():
        tls = getattr(upstream, "tls", None)
        if tls is not None and not tls.verify:
            out.append(
                (
                    ("upstreams", name, "tls", "verify"),
                    f'upstream "{name}": TLS certificates are not verified (verify: false): anyone on the path '
                    "can read and change this traffic; give tls.ca_file instead",
                )
            )
    return out


def _written(model, name: str) -> bool:
    return model is not None and name in model.model_fields_set


def _route_limits(policy, index: int, route) -> list[tuple[Loc, str]]:
    out: list[tuple[Loc, str]] = []
    at = ("routes", index)
    timeout = format_duration(route.timeout)

    def within_timeout(section, name: str, what: str) -> None:
        value = getattr(section, name) if section is not None else None
        if value is not None and _written(section, name) and value >= route.timeout:
            out.append(
                (
                    (*at, _section_name(route, section), name),
                    f"{name} ({format_duration(value)}) is not shorter than the route's timeout ({timeout}): "
                    f"{what}, so it never takes effect",
                )
            )

    within_timeout(route.retry, "per_try_timeout", "the route's deadline ends every try first")
    within_timeout(
        route.circuit_breaker, "slow_call_duration", "a call that slow has already timed out (a failure)"
    )
    within_timeout(route.bulkhead, "queue_timeout", "the route's deadline ends every wait first")

    retry = route.retry
    if _written(retry, "max_replay_body") and 0 < route.max_body < retry.max_replay_body:
        out.append(
            (
                (*at, "retry", "max_replay_body"),
                f"max_replay_body ({format_size(retry.max_replay_body)}) is above the route's max_body "
                f"({format_size(route.max_body)}): a larger body is refused with 413 before it could be kept",
            )
        )

    bulkhead = route.bulkhead
    upstream = policy.upstreams.get(route.upstream)
    if _written(bulkhead, "max_concurrent") and upstream is not None:
        pool = upstream.pool
        admitted = len(upstream.replicas) * (pool.max_connections + pool.max_pending)
        if bulkhead.max_concurrent > admitted:
            out.append(
                (
                    (*at, "bulkhead", "max_concurrent"),
                    f"max_concurrent ({bulkhead.max_concurrent}) can never be reached: upstream "
                    f'"{route.upstream}" admits at most {admitted} requests at once '
                    f"({len(upstream.replicas)} replicas x (pool.max_connections {pool.max_connections} + "
                    f"pool.max_pending {pool.max_pending})); beyond that its pools answer 503 first",
                )
            )
    return out


def _rate_limits(index: int, route) -> list[tuple[Loc, str]]:
    limits = route.rate_limit or ()
    out: list[tuple[Loc, str]] = []
    for j, looser in enumerate(limits):
        for i, stricter in enumerate(limits):
            if i != j and _dominates(stricter, looser) and (not _dominates(looser, stricter) or i < j):
                out.append(
                    (
                        ("routes", index, "rate_limit", j),
                        f'rate limit "{looser.name}" ({format_rate(looser.rate)}, burst {looser.burst}) can '
                        f'never refuse first: rate limit "{stricter.name}" ({format_rate(stricter.rate)}, '
                        f"burst {stricter.burst}) counts every request it counts and is no looser",
                    )
                )
                break
    return out


def _per_second(limit) -> Fraction:
    return Fraction(limit.rate.count) / Fraction(repr(limit.rate.per_seconds))


def _dominates(stricter, looser) -> bool:
    """Does ``stricter`` refuse whenever ``looser`` would (so ``looser`` never decides)?"""
    return (
        not stricter.shadow
        and not looser.shadow
        and stricter.scope == "local"  # a global bucket's own fallbacks (Redis down) may admit all
        and looser.scope == "local"
        and (stricter.key == "route" or stricter.key == looser.key)
        and _per_second(stricter) <= _per_second(looser)
        and stricter.burst <= looser.burst
    )


def _section_name(route, section) -> str:
    for name in ("retry", "circuit_breaker", "bulkhead"):
        if getattr(route, name) is section:
            return name
    raise AssertionError("not a section of this route")
