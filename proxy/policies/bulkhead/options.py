"""Bulkhead settings: the route's `bulkhead:` section (concurrent requests and a short queue)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from proxy.options.base import Count, PolicyModel
from proxy.options.units import Duration


class BulkheadOptions(PolicyModel):
    """Isolation of one route: how many of its requests may be in flight upstream, and how many may wait."""

    max_concurrent: Count = Field(
        default=100,
        ge=1,
        description=(
            "Most requests of this route in flight upstream at once (a slot is held until the upstream's "
            "response body has arrived whole). Size it to what the upstream can serve concurrently for this route."
        ),
    )
    max_queued: Count = Field(
        default=100,
        ge=0,
        description=(
            "Most requests waiting (first in, first out) for a slot; beyond it requests get 503 "
            "bulkhead_full at once. 0 means never wait."
        ),
    )
    queue_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="200ms",
        validate_default=True,
        description=(
            "Longest wait in the queue; a request still waiting then gets 503 bulkhead_timeout (the route's "
            "timeout also bounds the wait). Short, so a saturated upstream sheds load instead of building latency."
        ),
    )
    retry_after: Annotated[Duration, Field(ge=0)] = Field(
        default="1s",
        validate_default=True,
        description="Retry-After sent with the 503 (whole seconds, rounded up).",
    )
