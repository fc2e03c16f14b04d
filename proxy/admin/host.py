"""What the admin API reads from the process it serves: a protocol that Fender implements.

The admin modules depend on this, never on :mod:`proxy.server`, so the server can build the
admin app without an import cycle. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Protocol

from proxy.dataplane.app import DataPlane
from proxy.ops.checkpoint import Checkpointer
from proxy.ops.history import TrafficHistory
from proxy.ops.host import ReloadHost
from proxy.ops.reload import Reloader


class AdminHost(ReloadHost, Protocol):
    """The running Fender as the admin API sees it."""

    dataplane: DataPlane
    reloader: Reloader
    checkpointer: Checkpointer | None
    history: TrafficHistory
    draining: bool  # SIGTERM received: /readyz answers 503
    admin_token: str | None  # None: the admin API takes no token (loopback only)
