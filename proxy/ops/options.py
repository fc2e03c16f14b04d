"""Policy sections for operations: reload, drain, checkpoint, admin token.

Imports only ``proxy.options.base`` and ``proxy.options.units`` (the models
import this module, not the other way round).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from proxy.options.base import Flag, PolicyModel, Text
from proxy.options.units import Duration, policy_error

__all__ = ["ReloadOptions", "DrainOptions", "CheckpointOptions", "AdminAuthOptions"]


class ReloadOptions(PolicyModel):
    """How Fender picks up a changed policy file, and when it undoes a bad change by itself."""

    watch: Flag = Field(
        default=True,
        description=(
            "Reload when the policy file changes on disk (checked by polling, which also sees Kubernetes "
            "ConfigMap symlink swaps). SIGHUP and POST /admin/reload work either way."
        ),
    )
    watch_interval: Annotated[Duration, Field(ge=0.1, le=60)] = Field(
        default="1s",
        validate_default=True,
        description=(
            "How often the file is checked. A change must look the same on two checks in a row before it "
            "is read, so an editor's half-written file is not loaded."
        ),
    )
    rollback_grace: Annotated[Duration, Field(ge=0, le=600)] = Field(
        default="0s",
        validate_default=True,
        description=(
            "Automatic rollback: for this long after a reload, Fender probes (TCP connect) the replicas of "
            "every upstream the reload added or changed; if all replicas of such an upstream stay unreachable "
            "for the whole period, the previous policy is restored. 0s (the default) turns it off."
        ),
    )


class DrainOptions(PolicyModel):
    """What SIGTERM does: leave the load balancer first, then finish the work in hand."""

    delay: Annotated[Duration, Field(ge=0, le=600)] = Field(
        default="5s",
        validate_default=True,
        description=(
            "After SIGTERM, /readyz answers 503 at once but Fender keeps accepting and serving for this long, "
            "so load balancers and Kubernetes endpoints stop sending before the listener closes."
        ),
    )
    timeout: Annotated[Duration, Field(gt=0, le=3600)] = Field(
        default="30s",
        validate_default=True,
        description=(
            "Once the listener is closed, the longest Fender waits for in-flight requests to finish before "
            "cutting them and exiting. Keep delay + timeout below the orchestrator's kill grace period "
            "(Kubernetes terminationGracePeriodSeconds defaults to 30s)."
        ),
    )


class CheckpointOptions(PolicyModel):
    """Where and how often Fender saves what it learned (breaker states, replica health) across restarts."""

    path: Text = Field(
        description=(
            "File the checkpoint is written to (atomically: temporary file, fsync, rename). Its directory "
            "must exist and be writable, e.g. /var/lib/fender/state.json on a volume."
        ),
        min_length=1,
    )
    interval: Annotated[Duration, Field(ge=1, le=3600)] = Field(
        default="10s",
        validate_default=True,
        description="How often the checkpoint is written while running; it is also written at shutdown.",
    )


class AdminAuthOptions(PolicyModel):
    """Bearer token for the /admin/* endpoints. Required whenever the admin listener is not on loopback."""

    token_env: Text | None = Field(
        default=None,
        description="Name of an environment variable holding the token (read at start).",
    )
    token_file: Text | None = Field(
        default=None,
        description=(
            "Path of a file holding the token (surrounding whitespace ignored), e.g. a mounted Kubernetes Secret. "
            "Read at start."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> AdminAuthOptions:
        if (self.token_env is None) == (self.token_file is None):
            raise policy_error("give exactly one of token_env and token_file")
        return self
