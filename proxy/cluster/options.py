"""Upstream cluster settings owned by the cluster package: health checks, outlier detection, balancing,
and the ``dns:`` section (replicas from DNS).

Imported by the config models (an upstream's `health_check:`, `outlier_detection:`, `balance`);
nothing here imports the mechanisms.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from proxy.options.base import (
    Count,
    HeaderName,
    PolicyModel,
    Text,
    check_host_port,
    keep_ordered,
)
from proxy.options.units import Duration, Percent, describe_value, format_duration, policy_error

_RANGE_RE = re.compile(r"([1-5][0-9]{2})(?:-([1-5][0-9]{2}))?")


def parse_status_ranges(items: tuple[Any, ...]) -> tuple[tuple[int, int], ...]:
    """``[200, "300-399"]`` -> ``((200, 200), (300, 399))``; refuses anything else with a hint."""
    out = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            text = str(item)
        elif isinstance(item, str):
            text = item.strip()
        else:
            raise policy_error(
                f"expected a status like 200 or a range like 200-299, got {describe_value(item)}"
            )
        match = _RANGE_RE.fullmatch(text)
        if match is None:
            raise policy_error(f"{describe_value(item)} is not a status (100-599) or a range like 200-299")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if high < low:
            raise policy_error(f"{describe_value(item)}: the range is backwards (write {high}-{low})")
        out.append((low, high))
    return tuple(out)


StatusRange = Annotated[
    int | Text,
    Field(json_schema_extra={"examples": [200, "200-299"]}),
]


# Fields a probe's `headers:` may not set: framing and connection handling are the client's, and
# Host has its own knob.
_PROBE_FIELDS_REFUSED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
     "proxy-connection"}
)  # fmt: skip
# Bytes of a probe's response body searched for expect_body (the rest is read and dropped).
MAX_EXPECT_BODY = 64 * 1024


def _check_probe_host(value: str) -> str:
    """A Host value: ``name``, ``name:port``, ``1.2.3.4[:port]`` or ``[v6][:port]``."""
    return check_host_port(value, "write it like app.internal or app.internal:8000")


class HealthCheckOptions(PolicyModel):
    """Active health checks: Fender probes each replica in the background."""

    path: Text = Field(
        default="/healthz",
        json_schema_extra={"pattern": "^/"},
        description="Path probed with GET on each replica (the query string may be included).",
    )
    interval: Annotated[Duration, Field(gt=0)] = Field(
        default="2s",
        validate_default=True,
        description=(
            "Time between two probes of one replica (HAProxy's inter, 2s). Detection of a dead replica takes "
            "about interval x unhealthy_threshold; failback about interval x healthy_threshold."
        ),
    )
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="1s",
        validate_default=True,
        description=(
            "A probe with no complete response head within this long fails (connect included); this is "
            "what catches a black hole that accepts connections but never answers. Must not exceed interval; "
            "when only interval is written and it is shorter than 1s, the timeout defaults to it (and a "
            "written timeout above the default interval raises the interval to it)."
        ),
    )
    jitter: Percent = Field(
        default="10%",
        validate_default=True,
        description=(
            "Each wait is interval +/- this share, chosen at random, and the first probe waits a random part "
            "of jitter x interval (at least 5%), so a fleet of sidecars does not probe in lockstep."
        ),
    )
    healthy_threshold: Count = Field(
        default=2,
        ge=1,
        le=100,
        description="Passing probes in a row that bring an unhealthy (or ejected) replica back (HAProxy's rise).",
    )
    unhealthy_threshold: Count = Field(
        default=3,
        ge=1,
        le=100,
        description="Failing probes in a row that take a healthy replica out of rotation (HAProxy's fall).",
    )
    expect_status: tuple[StatusRange, ...] = Field(
        default=("200-299",),
        min_length=1,
        description='Statuses that count as a pass: single codes (204) or ranges ("200-299"). Anything else fails.',
    )

    grpc: bool = Field(
        default=False,
        description=(
            "Probe with the standard gRPC health protocol (grpc.health.v1.Health/Check over HTTP/2, "
            "whatever the upstream's protocol) instead of GET path: a pass is the status SERVING; "
            "path and expect_status are then unused."
        ),
    )
    service: Text = Field(
        default="",
        max_length=200,
        description='With grpc: true, the service name asked about; "" (the default) is the server as a whole.',
    )

    method: Literal["GET", "HEAD", "OPTIONS"] = Field(
        default="GET",
        description="Method of the probe request. HEAD asks for no body (so expect_body cannot be used with it).",
    )
    host: Text | None = Field(
        default=None,
        description=(
            "Host header of the probe (app.internal or app.internal:8000), for replicas that route on it. "
            "Unset: the replica's own host:port."
        ),
    )
    headers: dict[HeaderName, Text] = Field(
        default_factory=dict,
        description=(
            "Extra request headers of the probe, name to value (e.g. an API key the health endpoint wants). "
            "Host has its own knob; framing and connection headers are Fender's."
        ),
        json_schema_extra={"additionalProperties": False},
    )
    expect_body: Text | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description=(
            "Text the response body must contain for a pass (a plain substring, case-sensitive, in the first "
            "64KiB of the body), on top of expect_status. Unset: the body is not looked at."
        ),
    )

    @field_validator("host")
    @classmethod
    def _probe_host(cls, value: str | None) -> str | None:
        return None if value is None else _check_probe_host(value)

    @field_validator("headers", mode="before")
    @classmethod
    def _probe_headers(cls, value: Any) -> Any:
        # Before the names are lowercased, so a problem is reported at the key as written.
        if not isinstance(value, dict):
            return value
        for name, text in value.items():
            if not isinstance(name, str):
                continue
            if name.lower() in _PROBE_FIELDS_REFUSED:
                hint = "use health_check.host" if name.lower() == "host" else "Fender frames the probe itself"
                raise policy_error(f'a probe cannot set "{name}" ({hint})', name)
            if isinstance(text, str) and any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
                raise policy_error("a header value cannot contain control characters (CR, LF, NUL ...)", name)
        return value

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in " \t\r\n#"):
            raise policy_error(f'{describe_value(value)} must start with "/" and contain no spaces or "#"')
        return value

    @field_validator("expect_status")
    @classmethod
    def _check_statuses(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        parse_status_ranges(value)
        return value

    @model_validator(mode="after")
    def _body_needs_a_body(self) -> HealthCheckOptions:
        if self.expect_body is not None and self.method == "HEAD":
            raise policy_error("expect_body needs a response body: HEAD gets none (use GET)", "expect_body")
        return self

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthCheckOptions:
        keep_ordered(
            self,
            "timeout",
            "interval",
            f"timeout ({format_duration(self.timeout)}) cannot exceed interval "
            f"({format_duration(self.interval)}): probes of one replica would overlap",
            "timeout",
        )
        return self


# Probe results, also the `result` label of fender_health_checks_total.
PASS, FAIL, TIMEOUT, ERROR = "pass", "fail", "timeout", "error"
RESULTS = (PASS, FAIL, TIMEOUT, ERROR)


Balance = Literal["round_robin", "least_request", "random"]

# slow_start: a replica back in rotation starts at this share of its weight, growing linearly to
# all of it over the window (Envoy's min_weight_percent, 10%).
SLOW_START_FLOOR = 0.10
SLOW_START_DESCRIPTION = (
    "Ramp a replica that comes back (un-ejected, healthy again after failing checks, undrained, or new "
    "in a reload) from 10% of its share of traffic to all of it over this long, instead of its full "
    "weight at once; cold caches and JIT-less starts get time. Unset: full share at once."
)


class OutlierDetectionOptions(PolicyModel):
    """Passive health: learn from real traffic and eject replicas that keep failing."""

    consecutive_failures: Count = Field(
        default=5,
        ge=1,
        le=1000,
        description=(
            "Failed tries in a row (connect failure or timeout, reset, bad response, or a 5xx status) that "
            "eject a replica. 5 is Envoy's consecutive_5xx default."
        ),
    )
    ejection_time: Annotated[Duration, Field(gt=0)] = Field(
        default="30s",
        validate_default=True,
        description=(
            "How long the first ejection lasts; the n-th ejection of the same replica lasts n times this "
            "(up to max_ejection_time). The count goes down by one for every ejection_time the replica "
            "stays in rotation."
        ),
    )
    max_ejection_time: Annotated[Duration, Field(gt=0)] = Field(
        default="300s",
        validate_default=True,
        description="Upper bound on one ejection however often the replica was ejected (Envoy's default, 300s).",
    )
    max_ejected: Percent = Field(
        default="50%",
        validate_default=True,
        description=(
            "Most replicas of one priority level ejected at the same time, as a share of the level (rounded "
            "down, but at least one unless 0%). Protects against ejecting a whole level on a shared fault."
        ),
    )

    @model_validator(mode="after")
    def _ejection_bounds(self) -> OutlierDetectionOptions:
        keep_ordered(
            self,
            "ejection_time",
            "max_ejection_time",
            f"max_ejection_time ({format_duration(self.max_ejection_time)}) cannot be shorter than "
            f"ejection_time ({format_duration(self.ejection_time)})",
            "max_ejection_time",
        )
        return self


# --------------------------------------------------------------------------- dns


def parse_resolver(text: str) -> tuple[str, int]:
    """``"127.0.0.1:53"`` / ``"10.0.0.10"`` / ``"[::1]:5353"`` -> ``(address, port)``; port 53 by default.

    A name server is given by address: a name would need a name server to be found.
    """
    value = text.strip()
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{describe_value(text)} is not host:port (write it like [fd00::10]:53)")
        host, port_text = inner, rest[1:] if rest else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"{describe_value(text)}: a name server is an IP address (and an optional port), like "
            "10.96.0.10:53 or [fd00::10]:53; a host name would need a name server to be found"
        ) from None
    if port_text == "":
        if value.endswith(":"):
            raise ValueError(f"{describe_value(text)}: the port is empty")
        return address, 53
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{describe_value(text)}: the port must be a number from 1 to 65535")
    return address, int(port_text)


class DnsOptions(PolicyModel):
    """How replicas given by name are looked up (``resolve: true``, ``srv:`` and plain host names)."""

    resolvers: tuple[Text, ...] = Field(
        default=(),
        max_length=8,
        description=(
            "Name servers as IP:PORT (port 53 when left out), asked in order. Empty: the system's, "
            "that is /etc/hosts first, then the name servers, search list and ndots of /etc/resolv.conf."
        ),
        json_schema_extra={"examples": [["10.96.0.10:53"], ["127.0.0.1:5353", "[fd00::10]:53"]]},
    )
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="2s",
        validate_default=True,
        description=(
            "Longest one lookup may take, all name servers and retries included; a slower lookup counts "
            "as a failure (outcome timeout) and the last good answer stays in use."
        ),
    )
    min_ttl: Annotated[Duration, Field(gt=0)] = Field(
        default="1s",
        validate_default=True,
        description="Refresh a name no more often than this, even if its records say TTL 0.",
    )
    max_ttl: Annotated[Duration, Field(gt=0)] = Field(
        default="60s",
        validate_default=True,
        description=(
            "Refresh a name at least this often, whatever its records' TTL says. Each refresh is also "
            "delayed by a random 0-10% so a fleet of sidecars does not query in lockstep."
        ),
    )
    max_addresses: Count = Field(
        default=64,
        ge=1,
        le=1024,
        description=(
            "Most replicas one name (a resolve entry, or one SRV name with all its targets) may give; "
            "further addresses are ignored with a warning. Which ones are kept is a per-process choice that "
            "stays the same from answer to answer (so a fleet of sidecars spreads over all of them)."
        ),
    )
    max_stale: Annotated[Duration, Field(gt=0)] = Field(
        default="5m",
        validate_default=True,
        description=(
            "When a name's answer turns into NXDOMAIN or an empty answer, its last good set stays in use "
            "until that set is this old; then the entry has no replicas until the name resolves again. "
            "Other failures (timeout, SERVFAIL, refused) keep the last good set for as long as they last."
        ),
    )

    @field_validator("resolvers")
    @classmethod
    def _check_resolvers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: dict[tuple[str, int], int] = {}
        for index, text in enumerate(value):
            try:
                key = parse_resolver(text)
            except ValueError as exc:
                raise policy_error(str(exc), index) from None
            if key in seen:
                raise policy_error(
                    f"{describe_value(text)} is listed twice (also resolvers[{seen[key]}])", index
                )
            seen[key] = index
        return value

    @model_validator(mode="after")
    def _ttl_bounds(self) -> DnsOptions:
        keep_ordered(
            self,
            "min_ttl",
            "max_ttl",
            f"min_ttl ({format_duration(self.min_ttl)}) cannot exceed max_ttl ({format_duration(self.max_ttl)})",
            "min_ttl",
        )
        return self

    @property
    def servers(self) -> list[tuple[str, int]]:
        return [parse_resolver(text) for text in self.resolvers]
