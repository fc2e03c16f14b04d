"""Fault injection settings: the route's `fault:` section (delays and aborts for drills)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from proxy.options.base import Count, Flag, HeaderName, PolicyModel, Text
from proxy.options.units import Duration, Percent, policy_error


class FaultDelay(PolicyModel):
    """Latency added before a try goes upstream, as a slow upstream would add it."""

    fixed: Annotated[Duration, Field(gt=0, le=3600)] = Field(
        description="How long a delayed try waits before it is sent (within the try's timeout and the route's deadline).",
    )
    percent: Percent = Field(
        default="100%",
        validate_default=True,
        description="Share of the route's eligible tries that are delayed, chosen at random per try.",
    )


class FaultAbort(PolicyModel):
    """A local answer instead of the upstream's, as a failing upstream would give it."""

    status: Count = Field(
        default=503,
        ge=200,
        le=599,
        description=(
            "Status of the injected answer (it carries X-Fender-Error: fault_injected). The other layers judge it "
            "by this status as they would the upstream's: retry_on, failure_on and stale-if-error apply."
        ),
    )
    percent: Percent = Field(
        default="100%",
        validate_default=True,
        description="Share of the route's eligible tries that are aborted, chosen at random per try.",
    )


class FaultOptions(PolicyModel):
    """Fault injection for chaos drills: delays and aborts on some of a route's tries."""

    enabled: Flag = Field(
        default=True,
        description=(
            "false arms the section without injecting anything, so a drill can switch it on through "
            "`POST /admin/routes/NAME/fault` without a policy edit."
        ),
    )
    delay: FaultDelay | None = Field(
        default=None,
        description="Add latency to some tries (applied before an abort, so a try may be both delayed and aborted).",
    )
    abort: FaultAbort | None = Field(
        default=None,
        description="Answer some tries locally with a chosen status instead of forwarding them.",
    )
    only_if_header: dict[HeaderName, Text] | None = Field(
        default=None,
        description=(
            "Only requests carrying each of these headers with exactly this value are eligible (names are "
            "case-insensitive), so a drill touches marked requests only. Absent: every request of the route."
        ),
        json_schema_extra={"additionalProperties": False},
    )
    max_active: Count | None = Field(
        default=None,
        ge=1,
        description=(
            "Most tries being delayed at once; a try that would exceed it goes through unfaulted. Absent: no cap."
        ),
    )
    seed: Count | None = Field(
        default=None,
        ge=0,
        description="Seed of the random choices, so a drill (or a test) is repeatable. Absent: seeded from the system.",
    )

    @model_validator(mode="after")
    def _something_to_inject(self) -> FaultOptions:
        if self.delay is None and self.abort is None:
            raise policy_error("a fault section needs a delay, an abort, or both")
        return self
