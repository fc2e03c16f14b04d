"""Upstream cluster settings owned by the cluster package: health checks, outlier detection, balancing.

Imported by the config models (an upstream's `health_check:`, `outlier_detection:`, `balance`);
nothing here imports the mechanisms.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from proxy.options.base import Count, PolicyModel, Text, keep_ordered
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
