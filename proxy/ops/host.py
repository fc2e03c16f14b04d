"""What the operations modules need from the process that runs them: a small protocol.

:class:`proxy.server.fender.Fender` implements these; the reloader (ops) and the admin API
(admin) depend on the protocols, never on the server module, so the dependency runs one way
(server -> admin -> ops). See docs/architecture.md.
"""

from __future__ import annotations

from typing import Protocol

from proxy.clock import Clock
from proxy.config.models import Policy
from proxy.dataplane.runtime import Runtime
from proxy.metrics import Metrics


class ReloadHost(Protocol):
    """The running policy and the means to swap it (what :class:`proxy.ops.reload.Reloader` uses)."""

    source: str
    policy: Policy
    started_policy: Policy  # what the listeners were set up with (some settings need a restart)
    metrics: Metrics
    clock: Clock
    runtime: Runtime

    def swap(self, runtime: Runtime) -> Runtime:
        """Make ``runtime`` the live one; returns the one it replaced."""
        ...

    def refresh_tls(self, policy: Policy) -> None:
        """Re-read the certificate files of the listeners and upstreams (a reload; files checked)."""
        ...
